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
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from pipeline.cli import json_object
from pipeline.decode import MAX_PIXELS, check_size, decode_image, size_hw
from pipeline.errors import ConfigError, DecodeError
from pipeline.pca import PCABasis, fit_pca
from pipeline.sources import Manifest, build_manifest, read_many
from pipeline.storage import check_writable
from pipeline.stages import DecodeSpec, Featurizer, ModelSpec, build_models, decode_units
from pipeline.store import (
    DEFAULT_CODEC,
    DTYPE_BYTES,
    FeatureStoreSchema,
    create_or_open_store,
    pending_shards,
    read_attrs,
    rows_per_shard_for,
    status_counts,
    store_summary,
)

__all__ = ["FeaturizeConfig", "run_featurize", "init_ray", "plan_sizes"]

#: Compression ratios measured here (``python -m pipeline.bench --codecs``: EfficientNet-Lite0 ImageNet features,
#: fixed bilateral upsampling to 112^2, fp16, one chunk per image); only used to print the expected size on disk
#: before a job starts. Bilinearly upsampled (smoother) maps compress more: 2.09x / 1.68x / 1.46x (DESIGN.md).
MEASURED_RATIO: dict[str, float] = {"blosc-zstd": 1.44, "blosc-lz4": 1.20, "zstd": 1.10, "none": 1.0}


@dataclass(frozen=True)
class FeaturizeConfig:
    """Settings of one featurize job (the jobs' flags map 1:1 onto these fields).

    Attributes:
        input: COCO root, folder/prefix of images, tar shard(s) or parquet file(s); local or ``s3://``.
        output: the store's local path or ``s3://`` URI.
        kind: source kind (``auto``, ``coco``, ``folder``, ``tar``, ``parquet``).
        split: COCO split (``val2017``).
        limit: featurize only the first ``limit`` manifest rows.
        backbone: ``featup_ops`` backbone name.
        weights: backbone weights (None = the preset's default; ``random``; a path or URI).
        upsampler: upsampler checkpoint (path or URI); None = ``featup_ops.default_upsampler_for(backbone)``.
        input_size: the backbone input, one side (square) or ``(H, W)``; each a multiple of the backbone stride.
        output_size: the high-res features, one side (square) or ``(H, W)``; None = ``input_size``.
        dtype: store dtype of features: ``float16``, ``bfloat16`` or ``float32``.
        pca: keep k PCA channels (basis fitted on ``pca_fit_images`` images first), or None for all channels.
        pca_fit_images: images (the first ones of the manifest) the PCA basis is fitted on.
        policy: ``crop`` (cover + centre crop, as FeatUp) or ``pad`` (fit + pad, ``valid_size`` stored).
        batch_size: images per forward pass in a featurizer actor.
        num_gpus: GPU actors (one GPU each); None = one per GPU in the cluster; 0 = CPU actors.
        num_actors: CPU featurizer actors when no GPU is used.
        actor_cpus: CPUs reserved per CPU featurizer actor (Ray scheduling; torch uses ``torch_threads``).
        decode_cpus: CPUs reserved per decode task (decode is light; fractional packs several per core).
        torch_threads: torch intra-op threads per CPU actor; None = the node's cores minus one (see
            :func:`pipeline.stages.default_torch_threads`).
        codec: compressor (``blosc-zstd``, ``blosc-lz4``, ``zstd``, ``none``).
        rows_per_shard: override S (normally derived from the row size; see :mod:`pipeline.store`).
        max_pixels: decompression-bomb limit, in pixels.
        storage_options: fsspec options for ``s3://`` input, output, weights and checkpoint.
        progress_interval_s: seconds between progress lines.
        quiet: print nothing.
        implicit: also fit per-image implicit features (``pipeline.implicit_stage``) in their own actor pool.
        implicit_size / implicit_gpus / implicit_preset / implicit_actors / implicit_cpus: their ``(H, W)`` (None =
            the output size), GPUs per actor (None = 1 if the cluster has GPUs, else 0), preset name (or an
            ``ImplicitConfig``), pool size, CPUs per actor.
    """

    input: str
    output: str
    kind: Literal["auto", "coco", "folder", "tar", "parquet"] = "auto"
    split: str | None = None
    limit: int | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    upsampler: str | None = None
    input_size: int | tuple[int, int] = 224
    output_size: int | tuple[int, int] | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    pca: int | None = None
    pca_fit_images: int = 32
    policy: Literal["crop", "pad"] = "crop"
    batch_size: int = 8
    num_gpus: int | None = None
    num_actors: int = 1
    actor_cpus: float = 1.0
    decode_cpus: float = 0.25
    torch_threads: int | None = None
    codec: str = DEFAULT_CODEC
    rows_per_shard: int | None = None
    max_pixels: int = MAX_PIXELS
    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    progress_interval_s: float = 10.0
    quiet: bool = False
    implicit: bool = False
    implicit_size: tuple[int, int] | None = None
    implicit_gpus: float | None = None
    implicit_preset: str = "fast"
    implicit_actors: int = 1
    implicit_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.policy not in ("crop", "pad"):
            raise ConfigError(f"--policy {self.policy!r} is not 'crop' or 'pad'")
        for name in ("input_size", "output_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_size(value, f"--{name.replace('_', '-')}"))
        for name in ("batch_size", "num_actors", "pca_fit_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.pca is not None and self.pca < 1:
            raise ConfigError(f"--pca must be >= 1 channels, got {self.pca}")

    @property
    def input_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the backbone input."""
        return size_hw(self.input_size)

    @property
    def output_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the high-res features."""
        return self.input_hw if self.output_size is None else size_hw(self.output_size)


def _size_text(hw: tuple[int, int]) -> str:
    """How the flags spell a size: ``224`` when square, else ``224 448``."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]} {hw[1]}"


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray on 127.0.0.1.

    The local Ray has no dashboard and binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's job API
    and dashboard have no authentication, so a local head must not listen on the network).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plan_sizes(schema: FeatureStoreSchema, codec: str) -> str:
    """The line printed before a job starts: bytes per image and in total (uncompressed and expected on disk)."""
    per = schema.row_bytes
    total = per * schema.n_rows
    ratio = MEASURED_RATIO.get(codec, 1.0)
    c, (h, w), (hh, ww) = schema.channels, schema.lowres_size, schema.output_size
    return (
        f"featurize: {schema.n_rows} images -> per image {_fmt_bytes(per)} ({schema.dtype}: lowres {c}x{h}x{w} + "
        f"hires {c}x{hh}x{ww}); total {_fmt_bytes(total)} uncompressed, ~{_fmt_bytes(total / ratio)} on disk with "
        f"{codec} (~{ratio:.2f}x measured); {schema.rows_per_shard} images per shard, {schema.num_shards} shards"
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

    from pipeline.decode import normalize

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
            f"ETA {_fmt_time(eta)} | {_fmt_time(dt)} elapsed"
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
    )
    backbone, upsampler = build_models(spec)  # validates names, weights and checkpoint on the driver
    stride = backbone.stride
    input_hw = cfg.input_hw
    if input_hw[0] % stride or input_hw[1] % stride:
        from featup_ops.backbones import nearest_valid_sizes

        lower, upper = zip(*(nearest_valid_sizes(side, stride) for side in input_hw))
        options = " or ".join(dict.fromkeys(_size_text(hw) for hw in (lower, upper)))
        raise ConfigError(
            f"--input-size {_size_text(input_hw)} is not a multiple of the stride {stride} of {cfg.backbone!r}; "
            f"use {options}"
        )
    if cfg.pca is not None and cfg.pca > backbone.dim:
        raise ConfigError(f"--pca {cfg.pca} is more than the {backbone.dim} channels of {cfg.backbone!r}")
    lowres_hw = (input_hw[0] // stride, input_hw[1] // stride)
    channels = cfg.pca or backbone.dim
    probe = FeatureStoreSchema(
        n_rows=len(manifest), channels=channels, lowres_size=lowres_hw, output_size=spec.output_size,
        dtype=cfg.dtype, codec=cfg.codec,
    )
    schema = replace(probe, rows_per_shard=cfg.rows_per_shard or rows_per_shard_for(probe.hires_row_bytes))
    import featup_ops

    ckpt = cfg.upsampler or featup_ops.default_upsampler_for(cfg.backbone)
    ckpt_hash = featup_ops.checkpoint_hash(ckpt, storage_options=cfg.storage_options) if ckpt else None
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
            "pca": None if cfg.pca is None else _fit_pca_basis(cfg, manifest, backbone, input_hw).to_dict()
        },
    )
    attrs = read_attrs(group)
    spec = replace(spec, pca=attrs.get("pca"))
    del backbone, upsampler
    _say(cfg, plan_sizes(schema, cfg.codec))
    implicit = None
    if cfg.implicit:  # its own plan and actors, beside the main plan (pipeline/implicit_stage.py)
        from pipeline.implicit_stage import start_featurize_implicit

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
    _say(cfg, f"featurize: done in {_fmt_time(seconds)}: {counts['complete']} complete, {counts['failed']} failed, "
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

    from pipeline.sink import ZarrFeatureDatasink

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


def add_featurize_args(parser: Any) -> Any:
    """Add the flags shared by the featurize jobs (names match :class:`FeaturizeConfig` fields)."""
    import argparse

    d = FeaturizeConfig(input="", output="")
    a = parser.add_argument
    a("--output", help="store path or s3:// URI (Zarr v3 group)")
    a("--limit", type=int, default=None, help="featurize only the first N images")
    a("--backbone", default=d.backbone, help="featup_ops backbone name (default %(default)s)")
    a("--weights", default=None, help="backbone weights: default for the preset, 'random', or a path / s3:// URI")
    a("--upsampler", default=None, help="upsampler checkpoint dir (path or s3://); default: the backbone's "
      "(featup_ops.default_upsampler_for: the shipped JBU for efficientnet_lite0, bilinear for ViTs)")
    a("--input-size", type=int, nargs="+", default=d.input_size, metavar="SIDE",
      help="backbone input: one side (square) or H W, multiples of the stride (default %(default)s)")
    a("--output-size", type=int, nargs="+", default=None, metavar="SIDE",
      help="hires features: one side (square) or H W (default: the input size)")
    a("--dtype", default=d.dtype, choices=list(DTYPE_BYTES), help="feature dtype in the store")
    a("--pca", type=int, default=None, help="keep k PCA channels (basis fitted on the first images)")
    a("--pca-fit-images", type=int, default=d.pca_fit_images, help="images to fit the PCA basis on")
    a("--policy", default=d.policy, choices=["crop", "pad"], help="resize policy: crop (FeatUp) or pad")
    a("--batch-size", type=int, default=d.batch_size, help="images per forward pass")
    a("--num-gpus", type=int, default=None, help="GPU actors (default: all GPUs of the cluster; 0 = CPU)")
    a("--num-actors", type=int, default=d.num_actors, help="CPU featurizer actors (without GPUs)")
    a("--actor-cpus", type=float, default=d.actor_cpus, help="CPUs reserved per CPU featurizer actor")
    a("--decode-cpus", type=float, default=d.decode_cpus, help="CPUs reserved per decode/write task")
    a("--torch-threads", type=int, default=None, help="torch threads per CPU actor (default: cores - 1)")
    a("--codec", default=d.codec, choices=list(MEASURED_RATIO), help="compressor (default %(default)s)")
    a("--rows-per-shard", type=int, default=None, help="override images per shard (default: ~64 MiB shards)")
    a("--storage-options", type=json_object, default=None, help='fsspec options as JSON, e.g. \'{"anon": true}\'')
    a("--progress-interval-s", type=float, default=d.progress_interval_s, help="seconds between progress lines")
    a("--quiet", action=argparse.BooleanOptionalAction, default=False, help="print nothing")
    from pipeline.implicit_stage import add_implicit_args

    add_implicit_args(parser)
    return parser


def config_from_args(args: Any, **overrides: Any) -> FeaturizeConfig:
    """Build a :class:`FeaturizeConfig` from parsed flags (``overrides`` win)."""
    names = FeaturizeConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return FeaturizeConfig(**values)


def main_from_config(cfg: FeaturizeConfig) -> int:
    """Run a job from a config and print the store summary; exit code 0 when every row is done, 1 if some are pending.
    Bad input raises (the job entry points print it as one line, see :func:`pipeline.cli.run_job`)."""
    result = run_featurize(cfg)
    if not cfg.quiet:
        print(store_summary(cfg.output, cfg.storage_options))
        print(json.dumps(result))
    return 0 if result["pending"] == 0 else 1
