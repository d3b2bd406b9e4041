"""The featurize job: config -> :class:`pipeline.featurize.resolve.PlanJob` -> one Ray Data plan -> feature store.

The plan (one row = one work unit = one store shard of S consecutive manifest rows)::

    ray.data.from_items(pending units)                       # units whose rows are all done are skipped (resume)
      .map_batches(decode_units, num_cpus=decode_cpus)       # CPU tasks: read bytes, decode, resize -> uint8
      .map_batches(Featurizer, compute=ActorPoolStrategy,    # GPU actors (num_gpus=1) or CPU actors
                   num_gpus=1 | num_cpus=actor_cpus)         #   backbone -> upsampler [-> PCA] -> store dtype
      .map_batches(ImplicitFitter, ...)                      # --implicit: per-image fits, own actor pool
      .write_datasink(ZarrFeatureDatasink)                   # creates/validates the store; whole shards, status last

The second implicit pass (``jobs/fit_implicit.py``) is the same plan without the featurizer. Everything that can fail
fast does so on the driver before Ray starts work (:mod:`pipeline.featurize.resolve`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from pipeline.cli import init_ray
from pipeline.errors import PipelineError, StoreError
from pipeline.featurize.config import FeaturizeConfig
from pipeline.featurize.progress import Progress, start_board
from pipeline.featurize.resolve import PlanJob, counts_before, resolve_featurize
from pipeline.featurize.stages import Featurizer, decode_units
from pipeline.fmt import fmt_bytes, fmt_time
from pipeline.store import FeatureStoreSchema, Status, open_store, status_counts, store_summary
from pipeline.store.implicit import IMPLICIT_STATUS
from pipeline.store.failures import write_errors
from pipeline.store.lock import store_lock

__all__ = ["run_featurize", "run_plan", "plan_sizes", "main_from_config", "PlanFailed"]

def plan_sizes(schema: FeatureStoreSchema, codec: str, input_size: tuple[int, int] | None = None) -> str:
    """The line printed before a job starts: bytes per image and in total, uncompressed. (What the codec saves
    depends on the backbone, the upsampler and the size; the store summary at the end reports the measured ratio.)
    With ``input_size``, also both store modes' bytes (materialized vs on-read, :mod:`pipeline.store.compact`)."""
    per = schema.row_bytes
    total = per * schema.n_rows
    c, (h, w), (hh, ww) = schema.channels, schema.lowres_size, schema.output_size
    if schema.on_read:
        gh, gw = schema.input_size
        what = f"guidance {gh}x{gw}x3 uint8, hires {c}x{hh}x{ww} on read"
    else:
        what = f"hires {c}x{hh}x{ww}"
    modes = ""
    if input_size is not None:
        from pipeline.store.compact import modes_size_text

        modes = "; " + modes_size_text(schema, input_size)
    return (
        f"featurize: {schema.n_rows} images -> per image {fmt_bytes(per)} ({schema.dtype}: lowres {c}x{h}x{w} + "
        f"{what}); total {fmt_bytes(total)} uncompressed before {codec} compression; "
        f"{schema.rows_per_shard} images per shard, {schema.num_shards} shards{modes}"
    )


ACTOR_START_S: float = 1800.0
"""Seconds the plan waits for its actor pools to start before running (Ray Data's ``wait_for_min_actors_s``)."""


class PlanFailed(PipelineError, RuntimeError):
    """The Ray plan failed (a worker, a write, the cluster); the store stays resumable."""


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def run_featurize(cfg: FeaturizeConfig) -> dict[str, Any]:
    """Run (or resume) one featurize job.

    Returns:
        Counts: ``rows``, ``complete``, ``failed``, ``pending``, ``units_run``, ``units_skipped``, ``seconds``,
        ``images_per_s`` (rows finished by this run / its wall time), ``steady_images_per_s`` (after the first
        unit finished: excludes start-up; present when 2+ units ran), ``store``, ``resumed``, ``implicit``
        (``{"pending", "units", "fitted", "failed", "skipped"}`` with ``--implicit``, else None).

    Raises:
        InputNotFoundError, UnknownBackboneError, WeightsNotFoundError, CheckpointError, StoreMismatchError,
        StorageAccessError, ConfigError: see :func:`pipeline.featurize.resolve.resolve_featurize`.
        PlanFailed: the plan itself failed (one line; rerun to resume).
    """
    t_start = time.monotonic()
    job = resolve_featurize(cfg)
    schema = job.schema
    _say(cfg.quiet, plan_sizes(schema, cfg.codec, cfg.input_hw))
    before = counts_before(job)
    if job.resumed:
        _say(cfg.quiet, f"featurize: resuming {cfg.output}: {before['complete'] + before['failed']} rows done, "
                        f"{len(job.units)} of {schema.num_shards} shards to go")
    written = run_plan(job)
    source = job.extra_attrs.get("upsampler_source")  # the file or folder the job loaded (None: bilinear...)
    if schema.on_read and source:  # the compact store keeps its own copy of the weights (issue 14)
        from pipeline.store.compact import store_upsampler

        store_upsampler(open_store(cfg.output, mode="r+", storage_options=cfg.storage_options), cfg.output,
                        source, job.settings["upsampler_checkpoint_hash"], spec=job.settings["upsampler_spec"],
                        storage_options=cfg.storage_options)
    counts = status_counts(open_store(cfg.output, storage_options=cfg.storage_options))
    seconds = time.monotonic() - t_start
    new = counts["complete"] + counts["failed"] - before["complete"] - before["failed"]
    implicit = None
    if job.fitter is not None:
        implicit = {"pending": job.pending_fits, "units": sum(1 for u in job.units if json.loads(u["meta"]).get(
            "fit_rows")), "fitted": int(written.get("fitted", 0)), "failed": int(written.get("fit_failed", 0)),
            "skipped": 0}
    result = {
        "rows": schema.n_rows, **counts, "units_run": len(job.units), "units_skipped": schema.num_shards - len(job.units),
        "seconds": round(seconds, 2), "images_per_s": round(new / seconds, 3) if seconds > 0 else 0.0,
        "store": cfg.output, "resumed": job.resumed, "implicit": implicit,
    }
    if "steady_images_per_s" in written:
        result["steady_images_per_s"] = round(written["steady_images_per_s"], 3)
    _say(cfg.quiet, f"featurize: done in {fmt_time(seconds)}: {counts['complete']} complete, {counts['failed']} "
                    f"failed, {counts['pending']} pending")
    return result


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _stage_counts(job: PlanJob, before: dict[str, tuple[int, int]]) -> Any:
    """The :class:`Progress` callback: ``{stage: (done, failed, total, done_before)}`` read from the store."""
    import numpy as np

    def counts() -> dict[str, tuple[int, int, int, int]]:
        try:
            group = open_store(job.uri, storage_options=job.storage_options)
        except StoreError:  # a new store: the sink creates it once the first unit reaches it (nothing written)
            group = None
        out = {}
        if job.model is not None:
            c = status_counts(group) if group is not None else {"complete": 0, "failed": 0}
            out["featurize"] = (c["complete"] + c["failed"], c["failed"], job.schema.n_rows, before["featurize"])
        if job.fitter is not None and group is not None and IMPLICIT_STATUS in group:
            st = np.asarray(group[IMPLICIT_STATUS][:])
            done = int((st != Status.PENDING).sum())
            out["implicit"] = (done, int((st == Status.FAILED).sum()), before["implicit"] + job.pending_fits,
                               before["implicit"])
        return out

    return counts


def run_plan(job: PlanJob) -> dict[str, Any]:
    """Build and run the one plan of a resolved job: decode -> [featurizer] -> [implicit fitter] -> sink.

    With no units the sink only creates or validates the store. Returns the sink's totals.

    Raises:
        PlanFailed: the plan failed (one line naming the store and the first error; rerun to resume).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.featurize.implicit import actor_resources, default_implicit_gpus, ImplicitFitter
    from pipeline.store.sink import ZarrFeatureDatasink

    sink = ZarrFeatureDatasink(
        job.uri, job.schema if job.create else None, job.settings, extra_attrs=job.extra_attrs,
        implicit=job.implicit, storage_options=job.storage_options,
    )
    if not job.units:
        sink.on_write_start()  # nothing to run: the store and its arrays are still created or validated
        return {}
    init_ray()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    saved_wait = ctx.wait_for_min_actors_s
    if job.fitter is not None and saved_wait <= 0:
        # With fitters, start the actor pools before execution: a slow actor start (model load, a GPU node scaling
        # up) then never counts against Ray Data's no-progress window, which is left to the fits and their
        # heartbeats; a pool that cannot start in this time ends the job with one line. (Without fitters the
        # featurizer's start overlaps the first decode tasks, as before.)
        ctx.wait_for_min_actors_s = max(ACTOR_START_S, ctx.execution_no_progress_timeout_s)
    res = job.resources
    # With fitters, one unit per block: a fitter's heartbeat row must leave its task at once instead of waiting in
    # an output buffer for 128 MiB of rows (units are whole shards, MBs, so nothing else changes much). Datasets
    # keep the context they were created with, so these settings are this plan's only.
    saved = ctx.target_max_block_size
    if job.fitter is not None:
        ctx.target_max_block_size = 1
    try:
        ds = ray.data.from_items(job.units, override_num_blocks=len(job.units))
    finally:
        ctx.target_max_block_size, ctx.wait_for_min_actors_s = saved, saved_wait
    ds = ds.map_batches(
        decode_units, fn_kwargs={"spec": job.decode}, batch_size=1, batch_format="numpy", num_cpus=res.decode_cpus
    )
    board = start_board()  # rows the featurizers finish and the fitters' steps, for the progress lines
    if job.model is not None:
        gpus = _cluster_gpus() if res.num_gpus is None else res.num_gpus
        if gpus > 0:
            resources: dict[str, Any] = {"num_gpus": 1}
            pool = ActorPoolStrategy(size=gpus)
        else:
            resources = {"num_cpus": res.actor_cpus}
            pool = ActorPoolStrategy(size=res.num_actors)
        ds = ds.map_batches(
            Featurizer,
            fn_constructor_kwargs={"spec": job.model, "keep": job.fitter is not None, "board": board},
            # units per call: enough rows for one forward batch (a unit may hold fewer rows than batch_size)
            batch_size=max(1, res.batch_size // job.schema.rows_per_shard),
            batch_format="numpy",
            compute=pool,
            **resources,
        )
    if job.fitter is not None:
        stage, fitter = job.stage, job.fitter
        if stage.gpus is None:
            stage = dataclasses.replace(stage, gpus=default_implicit_gpus())
            fitter = dataclasses.replace(fitter, use_gpu=stage.gpus > 0)
        ds = ds.map_batches(
            ImplicitFitter, fn_constructor_kwargs={"spec": fitter, "board": board}, batch_size=1,
            batch_format="numpy", **actor_resources(stage),
        )
    before = counts_before(job)
    done_before = {"featurize": before["complete"] + before["failed"], "implicit": before.get("implicit_done", 0)}
    progress = Progress(_stage_counts(job, done_before), job.progress_interval_s,
                        lambda line: _say(job.quiet, line), board)
    try:
        with progress, write_errors(job.uri):  # a storage failure: one line, its fix
            ds.write_datasink(sink, ray_remote_args={"num_cpus": res.decode_cpus})
    except PipelineError:
        raise
    except Exception as exc:
        raise PlanFailed(_one_line(job.uri, exc)) from exc
    return sink.result


def _one_line(uri: str, exc: BaseException) -> str:
    """``the plan writing <uri> failed (<first line of the root error>); rerun the same command to resume``."""
    root = exc
    while getattr(root, "cause", None) is not None or root.__cause__ is not None:
        root = getattr(root, "cause", None) or root.__cause__
    first = next((line for line in str(root).splitlines() if line.strip()), type(root).__name__)
    return (f"the plan writing {uri} failed ({type(root).__name__}: {first.strip()[:300]}); the store is "
            f"resumable: rerun the same command")


def main_from_config(cfg: FeaturizeConfig) -> int:
    """Run a job from a config and print the store summary; exit code 0 when every row is done, 1 if some are pending.
    Bad input raises (the job entry points print it as one line, see :func:`pipeline.cli.run_job`)."""
    with store_lock(cfg.output, cfg.storage_options):  # one driver per store (pipeline/store/lock.py)
        result = run_featurize(cfg)
    if not cfg.quiet:
        print(store_summary(cfg.output, cfg.storage_options))
        print(json.dumps(result))
    return 0 if result["pending"] == 0 else 1
