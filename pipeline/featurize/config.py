"""The featurize job's settings: :class:`FeaturizeConfig` (its fields are the jobs' flags) and the flags themselves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from featup_ops.config import DEFAULT_IMPLICIT_PRESET
from pipeline.cli import json_object
from pipeline.errors import ConfigError
from pipeline.io.decode import MAX_PIXELS, check_size, size_hw
from pipeline.store.schema import CODECS, DEFAULT_CODEC, DTYPE_BYTES, HIRES_MODES

if TYPE_CHECKING:
    from featup_ops.config import ImplicitConfig

__all__ = ["FeaturizeConfig", "add_featurize_args", "config_from_args", "size_text"]

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
        upsampler: upsampler checkpoint (path, URI or FeatUp ``.ckpt``); None = ``featup_ops.default_upsampler_for(backbone)``.
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
            :func:`pipeline.featurize.stages.default_torch_threads`).
        codec: compressor (``blosc-zstd``, ``blosc-lz4``, ``zstd``, ``none``).
        rows_per_shard: override S (normally derived from the row size; see :mod:`pipeline.store`).
        max_pixels: decompression-bomb limit, in pixels.
        storage_options: fsspec options for ``s3://`` input, output, weights and checkpoint.
        progress_interval_s: seconds between progress lines.
        quiet: print nothing.
        implicit: also fit per-image implicit features (``pipeline.featurize.implicit``) in their own actor pool.
        implicit_size / implicit_gpus / implicit_preset / implicit_actors / implicit_cpus / implicit_seed: their
            ``(H, W)`` (None = the output size), GPUs per actor (None = 1 if the cluster has GPUs, else 0), preset
            name (or, through the API, a ``featup_ops.ImplicitConfig``), pool size, CPUs per actor, fitting seed.
        hires: ``materialized`` (store ``hires``) or ``on-read`` (compact: store ``lowres`` + the guidance image + the
            upsampler; readers produce ``hires``, see :mod:`pipeline.store.compact`).
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
    implicit_preset: str | ImplicitConfig = DEFAULT_IMPLICIT_PRESET
    implicit_actors: int = 1
    implicit_cpus: float = 1.0
    implicit_seed: int = 0
    hires: Literal["materialized", "on-read"] = "materialized"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.hires not in HIRES_MODES:
            raise ConfigError(f"--hires {self.hires!r} is not one of {', '.join(HIRES_MODES)}")
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


def size_text(hw: tuple[int, int]) -> str:
    """How the flags spell a size: ``224`` when square, else ``224 448``."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]} {hw[1]}"


def add_featurize_args(parser: Any) -> Any:
    """Add the flags shared by the featurize jobs (names match :class:`FeaturizeConfig` fields)."""
    import argparse

    d = FeaturizeConfig(input="", output="")
    a = parser.add_argument
    a("--output", help="store path or s3:// URI (Zarr v3 group)")
    a("--limit", type=int, default=None, help="featurize only the first N images")
    a("--backbone", default=d.backbone, help="featup_ops backbone name (default %(default)s)")
    a("--weights", default=None, help="backbone weights: default for the preset, 'random', or a path / s3:// URI")
    a("--upsampler", default=None, help="upsampler checkpoint dir or FeatUp .ckpt (path or s3://); default: the "
      "backbone's (featup_ops.default_upsampler_for: the shipped JBU for stride-32 presets, else bilinear)")
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
    a("--codec", default=d.codec, choices=list(CODECS), help="compressor (default %(default)s)")
    a("--rows-per-shard", type=int, default=None, help="override images per shard (default: ~64 MiB shards)")
    a("--storage-options", type=json_object, default=None, help='fsspec options as JSON, e.g. \'{"anon": true}\'')
    a("--progress-interval-s", type=float, default=d.progress_interval_s, help="seconds between progress lines")
    a("--hires", default=d.hires, choices=list(HIRES_MODES),
      help="materialized: store hires; on-read: store lowres + guidance image + upsampler, hires computed by the "
           "reader (~100x smaller; default %(default)s)")
    a("--quiet", action=argparse.BooleanOptionalAction, default=False, help="print nothing")
    from pipeline.featurize.implicit import add_implicit_args

    add_implicit_args(parser)
    return parser


def config_from_args(args: Any, **overrides: Any) -> FeaturizeConfig:
    """Build a :class:`FeaturizeConfig` from parsed flags (``overrides`` win)."""
    names = FeaturizeConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return FeaturizeConfig(**values)


