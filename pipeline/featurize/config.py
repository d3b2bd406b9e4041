"""The featurize job's settings: :class:`FeaturizeConfig`, whose fields are the featurize jobs' flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.cli import flag
from pipeline.errors import ConfigError
from pipeline.featurize.implicit_config import ImplicitFlags
from pipeline.io.decode import MAX_PIXELS, check_size, size_hw
from pipeline.store.schema import CODECS, DEFAULT_CODEC, DTYPE_BYTES, HIRES_MODES

__all__ = ["FeaturizeConfig", "size_text"]


@dataclass(frozen=True)
class FeaturizeConfig(ImplicitFlags):
    """Settings of one featurize job; its fields are the featurize jobs' flags (``jobs/flags.py`` builds them), the
    ``implicit_*`` ones shared with ``jobs/fit_implicit.py`` through :class:`ImplicitFlags`.

    Sizes are one side (square) or ``(H, W)``; ``input_size`` a multiple of the backbone stride, ``output_size``
    None = ``input_size``. ``num_gpus`` None = one GPU actor per GPU of the cluster, 0 = CPU actors.
    ``torch_threads`` None = the node's cores minus one (:func:`pipeline.featurize.stages.default_torch_threads`).
    ``hires``: ``materialized`` stores ``hires``; ``on-read`` stores ``lowres`` + the guidance image + the upsampler
    and readers produce ``hires`` (:mod:`pipeline.store.compact`).
    """

    input: str = flag(help="COCO root, folder/prefix of images, tar shard(s) or parquet file(s); local or s3://",
                      path="input")
    output: str = flag(help="store path or s3:// URI (Zarr v3 group)", path="output")
    kind: Literal["auto", "coco", "folder", "tar", "parquet"] = flag("auto", "input kind (default: detect)")
    split: str | None = flag(None, "COCO split, e.g. val2017 (with --kind coco)")
    limit: int | None = flag(None, "featurize only the first N images")
    backbone: str = flag("efficientnet_lite0", "featup_ops backbone name")
    weights: str | None = flag(None, "backbone weights: default for the preset, 'random', or a path / s3:// URI",
                               path="input")
    upsampler: str | None = flag(
        None, "upsampler spec: bilinear, bilateral, jbu, KIND:VARIANT (publisher's weights, fetched once; "
        "featup_ops.list_upsamplers()), KIND:VARIANT=PATH_OR_URI (that file), or a checkpoint dir / FeatUp .ckpt; "
        "default: the backbone's (featup_ops.default_upsampler_for; docs/upsamplers.md)", path="input")
    input_size: int | tuple[int, int] = flag(
        224, "backbone input: one side (square) or H W, multiples of the stride", metavar="SIDE")
    output_size: int | tuple[int, int] | None = flag(
        None, "hires features: one side (square) or H W (default: the input size)", metavar="SIDE")
    dtype: Literal["float16", "bfloat16", "float32"] = flag("float16", "feature dtype in the store")
    pca: int | None = flag(None, "keep k PCA channels (basis fitted on the first --pca-fit-images images)")
    pca_fit_images: int = flag(32, "images to fit the PCA basis on")
    policy: Literal["crop", "pad"] = flag("crop", "resize policy: crop (cover + centre crop, FeatUp) or pad "
                                          "(fit + pad, valid_size stored)")
    batch_size: int = flag(8, "images per forward pass")
    num_gpus: int | None = flag(None, "GPU actors (default: all GPUs of the cluster; 0 = CPU)")
    num_actors: int = flag(1, "CPU featurizer actors (without GPUs)")
    actor_cpus: float = flag(1.0, "CPUs reserved per CPU featurizer actor")
    decode_cpus: float = flag(0.25, "CPUs reserved per decode/write task")
    torch_threads: int | None = flag(None, "torch threads per CPU actor (default: cores - 1)")
    codec: str = flag(DEFAULT_CODEC, "compressor", choices=tuple(CODECS))
    rows_per_shard: int | None = flag(None, "override images per shard (default: ~64 MiB shards)")
    max_pixels: int = flag(MAX_PIXELS, "decompression-bomb limit, in pixels")
    storage_options: dict[str, Any] | None = flag(
        None, 'fsspec options as JSON for s3:// input, output, weights and checkpoint, e.g. \'{"anon": true}\'',
        compare=False)
    progress_interval_s: float = flag(10.0, "seconds between progress lines")
    quiet: bool = flag(False, "print nothing")
    implicit: bool = flag(False, "also fit per-image implicit features (slow; own actors; --implicit-* flags)")
    hires: Literal["materialized", "on-read"] = flag(
        "materialized", "materialized: store hires; on-read: store lowres + guidance image + upsampler, hires "
        "computed by the reader (~100x smaller)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.hires not in HIRES_MODES:
            raise ConfigError(f"--hires {self.hires!r} is not one of {', '.join(HIRES_MODES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec {self.codec!r} is not one of {', '.join(CODECS)}")
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
