"""The featurize job: manifest -> Ray Data plan (decode tasks -> featurizer actors -> Zarr sink) -> feature store.

Plan (one row = one work unit = one store shard of S consecutive manifest rows)::

    ray.data.from_items(pending units)                       # units whose rows are all done are skipped (resume)
      .map_batches(decode_units, num_cpus=decode_cpus)       # CPU tasks: read bytes, decode, resize -> uint8
      .map_batches(Featurizer, compute=ActorPoolStrategy,    # GPU actors (num_gpus=1) or CPU actors
                   num_gpus=1 | num_cpus=actor_cpus)         #   backbone -> upsampler [-> PCA] -> store dtype
      .write_datasink(ZarrFeatureDatasink)                   # each unit writes its whole shard, status last

Everything that can fail fast does so on the driver before Ray starts work: the input is listed, the backbone and
upsampler are loaded once (unknown name, missing weights), and an existing store's settings are compared.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from featup_ops.pca import PCABasis, fit_pca
from pipeline.cli import init_ray
from pipeline.errors import ConfigError, DecodeError
from pipeline.featurize.config import MEASURED_RATIO, FeaturizeConfig, size_text
from pipeline.featurize.stages import DecodeSpec, Featurizer, ModelSpec, build_models, decode_units
from pipeline.fmt import fmt_bytes, fmt_time
from pipeline.io.decode import decode_image
from pipeline.io.sources import Manifest, build_manifest, read_many
from pipeline.io.storage import check_writable
from pipeline.store import (
    FeatureStoreSchema,
    create_or_open_store,
    pending_shards,
    read_attrs,
    rows_per_shard_for,
    status_counts,
    store_summary,
)

__all__ = ["run_featurize", "plan_sizes", "main_from_config"]

def plan_sizes(schema: FeatureStoreSchema, codec: str, input_size: tuple[int, int] | None = None) -> str:
    """The line printed before a job starts: bytes per image and in total (uncompressed and expected on disk); with
    ``input_size``, also both store modes' bytes (materialized vs on-read)."""
    per = schema.row_bytes
    total = per * schema.n_rows
    ratio = MEASURED_RATIO.get(codec, 1.0)
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
        f"{what}); total {fmt_bytes(total)} uncompressed, ~{fmt_bytes(total / ratio)} on disk with "
        f"{codec} (~{ratio:.2f}x measured); {schema.rows_per_shard} images per shard, {schema.num_shards} shards{modes}"
    )


def _say(cfg: FeaturizeConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def _fit_pca_basis(
    cfg: FeaturizeConfig, manifest: Manifest, backbone: Any, input_hw: tuple[int, int]
) -> PCABasis:
    """Fit the PCA basis on the low-res features of the first ``pca_fit_images`` decodable images.

    Low-res features suffice: the bilateral/JBU upsamplers output per-pixel convex combinations of low-res
    features, so high-res features lie in the span (and near the mean) of the low-res ones.
    """
    import torch

    from pipeline.io.decode import normalize

    pixels = []
    uris = list(manifest.uris[: max(cfg.pca_fit_images * 2, cfg.pca_fit_images + 8)])
    for data in read_many(uris, cfg.storage_options, return_exceptions=True):
        if isinstance(data, BaseException):
            continue
        try:
            pixels.append(
                decode_image(data, size=input_hw, policy=cfg.policy, min_side=backbone.stride,
                             max_pixels=cfg.max_pixels).pixels
            )
        except DecodeError:
            continue
        if len(pixels) == cfg.pca_fit_images:
            break
    if not pixels:
        raise ConfigError("--pca: none of the first images could be decoded to fit the PCA basis")
    feats = []
    with torch.inference_mode():
        for start in range(0, len(pixels), cfg.batch_size):
            x = normalize(np.stack(pixels[start : start + cfg.batch_size]), backbone.mean, backbone.std)
            feats.append(backbone(x))
    return fit_pca(torch.cat(feats), cfg.pca)


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


class _Progress:
    """Prints ``rows done / total, rate, ETA`` every ``interval`` seconds by reading the store's ``status``."""

    def __init__(self, cfg: FeaturizeConfig, group: Any, total: int, done_before: int) -> None:
        self.cfg, self.group, self.total, self.done_before = cfg, group, total, done_before
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _line(self) -> str:
        counts = status_counts(self.group)
        done = counts["complete"] + counts["failed"]
        new = done - self.done_before
        dt = time.monotonic() - self.t0
        rate = new / dt if dt > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return (
            f"featurize: {done}/{self.total} rows ({counts['failed']} failed) | {rate:.2f} img/s | "
            f"ETA {fmt_time(eta)} | {fmt_time(dt)} elapsed"
        )

    def _run(self) -> None:
        while not self.stop.wait(self.cfg.progress_interval_s):
            try:
                _say(self.cfg, self._line())
            except Exception:  # progress is best effort; never kill the job over it
                pass

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def run_featurize(cfg: FeaturizeConfig) -> dict[str, Any]:
    """Run (or resume) one featurize job.

    Args:
        cfg: the :class:`FeaturizeConfig`.

    Returns:
        Counts: ``rows``, ``complete``, ``failed``, ``pending``, ``units_run``, ``units_skipped``, ``seconds``,
        ``images_per_s`` (rows finished by this run / its wall time), ``steady_images_per_s`` (after the first
        unit finished: excludes start-up; present when 2+ units ran), ``store``, ``resumed``.

    Raises:
        InputNotFoundError: missing/unreadable input, or no images.
        featup_ops.errors.UnknownBackboneError / WeightsNotFoundError / CheckpointError: bad model settings.
        StoreMismatchError: the output store exists with other settings.
        StorageAccessError: the output cannot be written (no credentials, missing bucket, read-only folder).
        ConfigError: invalid settings (e.g. input size not a multiple of the stride).
    """
    t_start = time.monotonic()
    manifest = build_manifest(
        cfg.input, kind=cfg.kind, split=cfg.split, limit=cfg.limit, storage_options=cfg.storage_options
    )
    check_writable(cfg.output, cfg.storage_options)  # before the models load
    spec = ModelSpec(
        backbone=cfg.backbone,
        weights=cfg.weights,
        upsampler=cfg.upsampler,
        output_size=cfg.output_hw,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        storage_options=cfg.storage_options,
        torch_threads=cfg.torch_threads,
        hires_mode=cfg.hires,
    )
    backbone, upsampler = build_models(spec)  # validates names, weights and checkpoint on the driver
    stride = backbone.stride
    input_hw = cfg.input_hw
    if input_hw[0] % stride or input_hw[1] % stride:
        from featup_ops.backbones import nearest_valid_sizes

        lower, upper = zip(*(nearest_valid_sizes(side, stride) for side in input_hw))
        options = " or ".join(dict.fromkeys(size_text(hw) for hw in (lower, upper)))
        raise ConfigError(
            f"--input-size {size_text(input_hw)} is not a multiple of the stride {stride} of {cfg.backbone!r}; "
            f"use {options}"
        )
    if cfg.pca is not None and cfg.pca > backbone.dim:
        raise ConfigError(f"--pca {cfg.pca} is more than the {backbone.dim} channels of {cfg.backbone!r}")
    on_read = cfg.hires == "on-read"  # compact store mode (pipeline/featurize/compact.py)
    if on_read:
        from pipeline.featurize.compact import check_on_read

        check_on_read(upsampler, cfg.pca)
    lowres_hw = (input_hw[0] // stride, input_hw[1] // stride)
    channels = cfg.pca or backbone.dim
    probe = FeatureStoreSchema(
        n_rows=len(manifest), channels=channels, lowres_size=lowres_hw, output_size=spec.output_size,
        dtype=cfg.dtype, codec=cfg.codec, hires_mode=cfg.hires, input_size=input_hw if on_read else None,
    )
    shard_row_bytes = probe.row_bytes if on_read else probe.hires_row_bytes
    schema = replace(probe, rows_per_shard=cfg.rows_per_shard or rows_per_shard_for(shard_row_bytes))
    ckpt_hash = None
    if cfg.upsampler:
        from featup_ops.checkpoint import checkpoint_hash

        ckpt_hash = checkpoint_hash(cfg.upsampler, storage_options=cfg.storage_options)
    settings = {
        "backbone": cfg.backbone,
        "weights_hash": backbone.weights_hash,
        "stride": stride,
        "upsampler": upsampler.config_dict(),
        "upsampler_checkpoint_hash": ckpt_hash,
        "input_size": list(input_hw),
        "normalization": {"mean": list(backbone.mean), "std": list(backbone.std)},
        "resize_policy": cfg.policy,
        "pca_spec": None if cfg.pca is None else {"k": cfg.pca, "fit_images": cfg.pca_fit_images},
        "max_pixels": cfg.max_pixels,
        "manifest": {"input": manifest.input, "kind": manifest.kind, "rows": len(manifest),
                     "digest": manifest.digest()},
    }
    group, resumed = create_or_open_store(
        cfg.output,
        schema,
        settings,
        storage_options=cfg.storage_options,
        extra_attrs=lambda: {
            "pca": None if cfg.pca is None else _fit_pca_basis(cfg, manifest, backbone, input_hw).to_dict(),
            "settings_keys": sorted(settings),  # what jobs/materialize.py carries over into a materialized store
        },
    )
    if on_read and cfg.upsampler:  # the compact store keeps its own copy of the checkpoint
        from pipeline.store.compact import store_upsampler

        store_upsampler(group, cfg.output, cfg.upsampler, ckpt_hash, storage_options=cfg.storage_options)
    attrs = read_attrs(group)
    spec = replace(spec, pca=attrs.get("pca"))
    del backbone, upsampler
    _say(cfg, plan_sizes(schema, cfg.codec, input_hw))
    implicit = None
    if cfg.implicit:  # its own plan and actors, beside the main plan (pipeline/featurize/implicit.py)
        from pipeline.featurize.implicit import start_featurize_implicit

        implicit = start_featurize_implicit(cfg, manifest)

    todo = pending_shards(group) if resumed else list(range(schema.num_shards))
    skipped = schema.num_shards - len(todo)
    before = status_counts(group)
    if resumed:
        _say(cfg, f"featurize: resuming {cfg.output}: {before['complete'] + before['failed']} rows done, "
                  f"{len(todo)} of {schema.num_shards} shards to go")
    written = _run_plan(cfg, manifest, schema, spec, todo, group, before) if todo else {}
    counts = status_counts(group)
    seconds = time.monotonic() - t_start
    implicit_counts = implicit.wait() if implicit is not None else None  # after the main plan's timing
    new = counts["complete"] + counts["failed"] - before["complete"] - before["failed"]
    result = {
        "rows": schema.n_rows, **counts, "units_run": len(todo), "units_skipped": skipped,
        "seconds": round(seconds, 2), "images_per_s": round(new / seconds, 3) if seconds > 0 else 0.0,
        "store": cfg.output, "resumed": resumed, "implicit": implicit_counts,
    }
    if "steady_images_per_s" in written:
        result["steady_images_per_s"] = round(written["steady_images_per_s"], 3)
    _say(cfg, f"featurize: done in {fmt_time(seconds)}: {counts['complete']} complete, {counts['failed']} failed, "
              f"{counts['pending']} pending")
    return result


def _run_plan(
    cfg: FeaturizeConfig,
    manifest: Manifest,
    schema: FeatureStoreSchema,
    spec: ModelSpec,
    todo: list[int],
    group: Any,
    before: dict[str, int],
) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.store.sink import ZarrFeatureDatasink

    init_ray()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    units = []
    for k in todo:
        start, stop = schema.shard_rows(k)
        meta = {"image_id": list(manifest.image_ids[start:stop]), "uri": list(manifest.uris[start:stop])}
        units.append({"shard": k, "start": start, "meta": json.dumps(meta)})
    dspec = DecodeSpec(
        input_size=cfg.input_hw,
        policy=cfg.policy,
        min_side=int(read_attrs(group)["stride"]),  # images smaller than one feature cell are refused
        rows_per_shard=schema.rows_per_shard,
        max_pixels=cfg.max_pixels,
        storage_options=cfg.storage_options,
    )
    gpus = _cluster_gpus() if cfg.num_gpus is None else cfg.num_gpus
    # Units per featurizer call: enough rows for one forward batch (a unit may hold fewer rows than batch_size).
    units_per_call = max(1, cfg.batch_size // schema.rows_per_shard)
    if gpus > 0:
        resources: dict[str, Any] = {"num_gpus": 1}
        pool = ActorPoolStrategy(size=gpus)
    else:
        resources = {"num_cpus": cfg.actor_cpus}
        pool = ActorPoolStrategy(size=cfg.num_actors)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        decode_units, fn_kwargs={"spec": dspec}, batch_size=1, batch_format="numpy", num_cpus=cfg.decode_cpus
    )
    ds = ds.map_batches(
        Featurizer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=units_per_call,
        batch_format="numpy",
        compute=pool,
        **resources,
    )
    sink = ZarrFeatureDatasink(cfg.output, storage_options=cfg.storage_options)
    with _Progress(cfg, group, schema.n_rows, before["complete"] + before["failed"]):
        ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.decode_cpus})
    return sink.result


def main_from_config(cfg: FeaturizeConfig) -> int:
    """Run a job from a config and print the store summary; exit code 0 when every row is done, 1 if some are pending.
    Bad input raises (the job entry points print it as one line, see :func:`pipeline.cli.run_job`)."""
    result = run_featurize(cfg)
    if not cfg.quiet:
        print(store_summary(cfg.output, cfg.storage_options))
        print(json.dumps(result))
    return 0 if result["pending"] == 0 else 1
