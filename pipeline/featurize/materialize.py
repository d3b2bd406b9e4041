"""The materialize plan: an on-read (compact) store -> a materialized store with the same settings, for readers
outside this project (xarray, tensorstore, other languages) that cannot run the upsampler.

Plan (one row = one work unit = one shard of the TARGET store)::

    ray.data.from_items(pending target shards)              # resume: shards whose rows are all done are skipped
      .map_batches(Materializer, compute=ActorPoolStrategy)  # read lowres + guidance, upsample -> hires
      .write_datasink(ZarrFeatureDatasink)                   # the featurize plan's sink: whole shard, status last

The target carries the source's settings (so its fingerprint is the one a materialized featurize run with the same
settings writes), its PCA basis, and ``hires`` computed exactly as :class:`pipeline.read.dataset.FeatureDataset`
produces it from the source. Failed rows stay failed (error kept); a source with pending rows is refused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.cli import flag
from pipeline.errors import ConfigError
from pipeline.store.schema import FeatureStoreSchema, Status, to_store_dtype

__all__ = ["MaterializeConfig", "Materializer", "run_materialize"]


class Materializer:
    """Ray actor stage: target shards in, materialized units out (the :class:`pipeline.featurize.stages.Featurizer`
    output format, so the same sink writes them).

    Args:
        source: the on-read store's URI.
        target_rows_per_shard: S of the target store.
        storage_options: fsspec options.
        batch_size: rows per upsampler call.
        torch_threads: intra-op threads (None: torch's default).
    """

    def __init__(
        self,
        source: str,
        target_rows_per_shard: int,
        storage_options: dict[str, Any] | None = None,
        batch_size: int = 16,
        torch_threads: int | None = None,
    ) -> None:
        import torch

        from pipeline.read.on_read import OnReadHires
        from pipeline.store import open_store, read_attrs

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.group = open_store(source, storage_options=storage_options)
        attrs = read_attrs(self.group)
        self.schema = FeatureStoreSchema.from_dict(attrs)
        self.s = int(target_rows_per_shard)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.hires = OnReadHires(source, attrs, storage_options=storage_options, device=device, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``shard (U,)`` target shards -> ``shard``, ``n``, ``orig_size``, ``valid_size``, ``meta``, ``lowres``,
        ``hires`` (store dtype, failed rows zero), ``status`` padded to S rows per unit."""
        import torch

        sc, s = self.schema, self.s
        out: dict[str, list[Any]] = {k: [] for k in
                                     ("shard", "n", "orig_size", "valid_size", "meta", "lowres", "hires", "status")}
        g = self.group
        for shard in np.asarray(batch["shard"]).tolist():
            start, stop = shard * s, min(sc.n_rows, (shard + 1) * s)
            n = stop - start
            status = np.asarray(g["status"][start:stop])
            low = np.asarray(g["lowres"][start:stop])
            hires = torch.zeros((n, sc.channels, *sc.output_size), dtype=getattr(torch, sc.dtype))
            good = np.flatnonzero(status == Status.COMPLETE)
            if good.size:
                guid = np.asarray(g["guidance"][start:stop])
                hires[torch.from_numpy(good)] = self.hires(low[good], guid[good]).cpu().to(hires.dtype)
            pad = s - n

            def padded(a: np.ndarray) -> np.ndarray:
                return np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)]) if pad else a

            meta = {k: [str(v) for v in np.asarray(g[k][start:stop]).tolist()] for k in ("image_id", "uri", "error")}
            out["shard"].append(shard)
            out["n"].append(n)
            out["orig_size"].append(padded(np.asarray(g["orig_size"][start:stop])))
            out["valid_size"].append(padded(np.asarray(g["valid_size"][start:stop])))
            out["meta"].append(json.dumps(meta))
            out["lowres"].append(padded(low))
            out["hires"].append(padded(to_store_dtype(hires, sc.dtype)))
            out["status"].append(padded(status.astype(np.uint8)))
        return {k: (np.asarray(v, dtype=object) if k == "meta" else np.stack(v) if k not in ("shard", "n")
                    else np.asarray(v, dtype=np.int64)) for k, v in out.items()}


@dataclass(frozen=True)
class MaterializeConfig:
    """Settings of ``jobs/materialize.py`` (its flags are these fields); :func:`run_materialize` takes them as
    keywords."""

    source: str = flag(help="the on-read store (path or s3:// URI)", path="input")
    output: str = flag(help="the materialized store to write (path or s3:// URI)", path="output")
    rows_per_shard: int | None = flag(None, "target images per shard (default ~64 MiB)")
    num_actors: int = flag(1, "materializer actors (one GPU each when present)")
    actor_cpus: float = flag(1.0, "CPUs per CPU actor")
    batch_size: int = flag(16, "rows per upsampler call")
    torch_threads: int | None = flag(None, "torch threads per actor")
    storage_options: dict[str, Any] | None = flag(None, "fsspec options as JSON", compare=False)
    quiet: bool = flag(False, "print nothing")

    def __post_init__(self) -> None:
        for name in ("num_actors", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def run_materialize(cfg: MaterializeConfig) -> dict[str, Any]:
    """Turn an on-read store into a materialized one (or resume doing so).

    Args:
        cfg: source and output store (local or ``s3://``; rerunning resumes), the target S (default: derived from
            the ``hires`` row size, as featurize does), actors, batch and threads (:class:`MaterializeConfig`).

    Returns:
        ``rows``, ``complete``, ``failed``, ``pending`` of the target, ``units_run``, ``units_skipped``, ``seconds``,
        ``store``, ``resumed``.

    Raises:
        ConfigError: the source is not an on-read store, or has pending rows.
        pipeline.errors.StoreError: the source's upsampler is missing / corrupt / foreign (one line).
        pipeline.errors.StoreMismatchError: ``output`` holds a store with other settings.
        pipeline.featurize.plan.PlanFailed: the Ray plan failed (one line; rerun to resume).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.cli import init_ray
    from pipeline.io.storage import check_writable
    from pipeline.featurize.plan import PlanFailed, _one_line
    from pipeline.store import open_store, pending_shards, read_attrs, status_counts
    from pipeline.store.zarr_store import check_store
    from pipeline.store.compact import load_store_upsampler
    from pipeline.store.sink import ZarrFeatureDatasink

    t0 = time.monotonic()
    src = open_store(cfg.source, storage_options=cfg.storage_options)
    attrs = read_attrs(src)
    schema = FeatureStoreSchema.from_dict(attrs)
    if not schema.on_read:
        raise ConfigError(f"store {cfg.source!r} is already materialized (it stores hires); nothing to do")
    counts = status_counts(src)
    if counts["pending"]:
        raise ConfigError(
            f"store {cfg.source!r} has {counts['pending']} pending rows; rerun its featurize job to finish it first"
        )
    load_store_upsampler(cfg.source, attrs, storage_options=cfg.storage_options)  # refuse a bad upsampler before any work
    check_writable(cfg.output, cfg.storage_options)
    target = schema.materialized()
    if cfg.rows_per_shard:
        target = replace(target, rows_per_shard=int(cfg.rows_per_shard))
    keys = attrs.get("settings_keys") or []
    if not keys:
        raise ConfigError(f"store {cfg.source!r} does not record its settings_keys (made by an older version); featurize "
                          "again with --hires materialized")
    settings = {k: attrs.get(k) for k in keys}
    existing = check_store(cfg.output, target, settings, storage_options=cfg.storage_options)  # refuses other settings
    resumed = existing is not None
    todo = pending_shards(existing) if resumed else list(range(target.num_shards))
    # the featurize plan's sink creates (or validates) the target on the driver, then writes whole shards
    sink = ZarrFeatureDatasink(
        cfg.output, target, settings, storage_options=cfg.storage_options,
        extra_attrs={"pca": attrs.get("pca"), "settings_keys": keys, "materialized_from": cfg.source},
    )
    if not cfg.quiet:
        print(f"materialize: {cfg.source} -> {cfg.output}: {len(todo)} of {target.num_shards} shards to write "
              f"({target.rows_per_shard} rows per shard)", flush=True)
    if not todo:
        sink.on_write_start()
    else:
        init_ray()
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        resources: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": cfg.actor_cpus}
        ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            Materializer,
            fn_constructor_kwargs=dict(source=cfg.source, target_rows_per_shard=target.rows_per_shard,
                                       storage_options=cfg.storage_options, batch_size=cfg.batch_size,
                                       torch_threads=cfg.torch_threads),
            batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=min(cfg.num_actors, gpus) if gpus
                                                                          else cfg.num_actors),
            **resources,
        )
        try:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
        except PlanFailed:
            raise
        except Exception as exc:
            raise PlanFailed(_one_line(cfg.output, exc)) from exc
    done = status_counts(open_store(cfg.output, storage_options=cfg.storage_options))
    result = {"rows": target.n_rows, **done, "units_run": len(todo), "units_skipped": target.num_shards - len(todo),
              "seconds": round(time.monotonic() - t0, 2), "store": cfg.output, "resumed": resumed}
    if not cfg.quiet:
        print(f"materialize: done: {done['complete']} complete, {done['failed']} failed, {done['pending']} pending",
              flush=True)
    return result
