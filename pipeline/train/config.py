"""Settings of one training job: :class:`TrainJobConfig` (field names are ``jobs/train_upsampler.py``'s flags) and
the files and constants a run writes beside its checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from featup_ops.config import DownsamplerConfig, JBUConfig, JitterConfig, LossConfig, TrainConfig
from pipeline.cli import flag
from pipeline.errors import ConfigError
from pipeline.io.storage import join

__all__ = [
    "TrainJobConfig",
    "METRICS_FILE",
    "METRIC_COLUMNS",
    "EXPORT_DIR",
    "STATE_FILE",
    "VAL_SEED",
    "VAL_VIEWS",
]

_METHOD = TrainConfig()
_OPT = "optimisation (defaults: the method's)"  # the flag group of the method's optimisation settings

#: Metrics CSV written by rank 0 beside the checkpoints (``<output>/<name>/metrics.csv``); rewritten whole at every
#: log step because object stores cannot append (it stays small: one row per ``log_every`` steps).
METRICS_FILE = "metrics.csv"
#: Folder under ``<output>/<name>`` that receives the final upsampler (``upsampler.safetensors`` + ``.json``).
EXPORT_DIR = "upsampler"
#: Training state beside the upsampler files in each checkpoint: objectives, optimizer, step.
STATE_FILE = "train_state.pt"
#: Columns of the metrics CSV, in order. ``split`` is "train" (loss rows) or "val" (validation rows, one per
#: backbone). ``val_err_*``: held-out relative multi-view reconstruction error (FeatUp's fixed box downsampler, the
#: same views for every upsampler); ``val_ratio`` = upsampler / bilinear, ``val_ratio_bilateral`` = upsampler /
#: fixed joint bilateral (below 1 = better than the baseline); ``*_learned_ds``: the same through the run's learned
#: downsampler.
METRIC_COLUMNS: tuple[str, ...] = (
    "step", "split", "backbone", "loss", "lr", "images_per_s", "elapsed_s",
    "val_err_upsampler", "val_err_bilinear", "val_err_bilateral", "val_ratio", "val_ratio_bilateral",
    "val_err_upsampler_learned_ds", "val_err_bilinear_learned_ds",
)  # fmt: skip
#: Seed of the validation views: the same jittered views at every validation, so errors are comparable over time
#: and the upsampler and bilinear are always measured on identical views.
VAL_SEED = 20_240_601
#: Default jittered views per held-out image at validation (the identity + 9 jitters: FeatUp's 5 jitters per
#: training image, doubled for a steadier figure).
VAL_VIEWS = 10


@dataclass(frozen=True)
class TrainJobConfig:
    """Everything one training job needs; flag names of ``jobs/train_upsampler.py`` match these field names.

    Method defaults (batch, lr, jitters, projection, steps, cadence) come from :class:`featup_ops.config.TrainConfig`.

    Attributes:
        input: images, local path or ``s3://`` (COCO root with ``split``, a folder, tar shards or parquet files).
        output: storage path for checkpoints and metrics, local folder or ``s3://bucket/prefix``.
        name: run name; checkpoints go to ``<output>/<name>/``; the same name resumes.
        kind / split / limit: passed to :func:`pipeline.io.sources.build_manifest`.
        val_images: the last this-many manifest rows are held out for validation (never trained on).
        val_views: fixed views per held-out image at validation (the identity first).
        input_size: training crop, square (Resize + CenterCrop, FeatUp's transform); a multiple of every stride.
        backbone: backbone preset; ignored when ``backbones`` is given.
        backbones: several backbones for feature-agnostic training (one per step, round-robin).
        weights: backbone weights (see :func:`featup_ops.load_backbone`); None = the preset's default.
        feature_agnostic: JBU without the final channel mix (works for any backbone); False = backbone-specific
            (FeatUp's final residual 1x1 mix over the backbone's channels).
        steps / batch_size / lr / jitters / proj_dim: the method's optimisation settings; batch size is per worker.
        grad_clip_steps / grad_clip_norm: clip the gradient norm for the first steps (FeatUp's warm-up).
        seed: seeds the initialisation (identical on every worker) and the jitter draws (per worker and step).
        checkpoint_every / val_every / log_every: cadence in steps (the last step always checkpoints and validates).
        keep_checkpoints: how many checkpoints to keep in storage (newest first); None keeps all.
        workers: Ray Train workers (DDP ranks).
        use_gpu: one GPU per worker (NCCL); otherwise CPU workers (gloo).
        cpus_per_worker: CPUs reserved per worker; leave some CPUs free for the Ray Data decode tasks.
        decode_cpus: CPUs per Ray Data decode task.
        cache_images: keep each worker's decoded shard in memory after the first pass (uint8, 150 KB per 224 px
            image: COCO train2017 over 8 workers is ~2.2 GB each); False streams every epoch from storage.
        max_failures: worker-failure restarts from the last checkpoint (Ray Train ``FailureConfig``; -1 = no limit).
        fixup: FeatUp's kernel fix-up MLP in the JBU layers; None = ``jbu.fixup``; given, it sets ``jbu.fixup``.
        address: the Ray cluster to join (None = ``RAY_ADDRESS`` or a local Ray).
        jbu / jitter / loss / downsampler: nested method configs (not flags).
        storage_options: fsspec options for ``s3://`` input and output (endpoint, credentials).
    """

    input: str = flag(help="images: local folder / s3:// prefix, COCO root (with --split), tar shards or parquet "
                      "files", group="data", path="input")
    output: str = flag(help="storage path for checkpoints and metrics (local or s3://)", group="run", path="output")
    name: str = flag("jbu", "run name; the same --output/--name resumes", group="run")
    kind: Literal["auto", "coco", "folder", "tar", "parquet"] = flag("auto", "input kind (default: detect)",
                                                                     group="data")
    split: str | None = flag(None, "COCO split, e.g. train2017", group="data")
    limit: int | None = flag(None, "use only the first N images of the input", group="data")
    val_images: int = flag(2, "hold out the last N images for validation", group="data")
    val_views: int = flag(VAL_VIEWS, "fixed jittered views per held-out image at validation, the identity first",
                          group="data")
    input_size: int = flag(_METHOD.image_size, "square training crop in px, a multiple of the backbone stride",
                           group="data")
    backbone: str = flag("efficientnet_lite0", "backbone preset", group="model")
    backbones: tuple[str, ...] = flag((), "several backbones for feature-agnostic training (one per step, "
                                      "round-robin)", group="model")
    weights: str | None = flag(None, "backbone weights: default/timm/packaged/random or a local or s3:// file",
                               group="model", path="input")
    feature_agnostic: bool = flag(True, "upsampler without the final channel mix, usable with any backbone "
                                  "(default on)", group="model")
    fixup: bool | None = flag(None, "FeatUp's kernel fix-up MLP in every JBU layer (default: the method's, on, as "
                              "FeatUp's code trains it; off = normalised kernels only, which the fused inference "
                              "kernel can run); sets jbu.fixup", group="model")
    steps: int = flag(_METHOD.steps, "optimizer steps", group=_OPT)
    batch_size: int = flag(_METHOD.batch_size, "images per step per worker", group=_OPT)
    lr: float = flag(_METHOD.lr, "NAdam learning rate", group=_OPT)
    jitters: int = flag(_METHOD.n_jitters, "jittered views per image per step", group=_OPT)
    proj_dim: int = flag(_METHOD.projection_dim, "random projection dim of the features in the loss", group=_OPT)
    grad_clip_steps: int = flag(_METHOD.grad_clip_steps, "clip the gradient norm for the first N steps, FeatUp's "
                                "warm-up (0 for very short runs)", group=_OPT)
    grad_clip_norm: float = flag(_METHOD.grad_clip_norm, "the gradient norm clipped to in those steps", group=_OPT)
    seed: int = flag(0, "initialisation and jitter seed", group=_OPT)
    checkpoint_every: int = flag(_METHOD.ckpt_every, "checkpoint interval in steps", group="run")
    val_every: int = flag(_METHOD.val_every, "validation interval in steps", group="run")
    log_every: int = flag(10, "console/CSV interval in steps", group="run")
    keep_checkpoints: int | None = flag(3, "checkpoints kept in storage", group="run")
    workers: int = flag(1, "Ray Train workers / DDP ranks", group="run")
    use_gpu: bool = flag(False, "one GPU per worker (default: CPU workers with gloo)", group="run")
    cpus_per_worker: float = flag(1.0, "CPUs per worker; leave some free for the decode tasks", group="run")
    decode_cpus: float = flag(0.5, "CPUs per Ray Data decode task", group="run")
    cache_images: bool = flag(True, "keep each worker's decoded shard in memory after the first epoch (default on)",
                              group="data")
    max_failures: int = flag(0, "restart failed workers from the last checkpoint this many times (-1: always)",
                             group="run")
    address: str | None = flag(None, "Ray address (default: RAY_ADDRESS or a local Ray)", group="run", compare=False)
    jbu: JBUConfig = field(default_factory=lambda: _METHOD.jbu)
    jitter: JitterConfig = field(default_factory=lambda: _METHOD.jitter)
    loss: LossConfig = field(default_factory=lambda: _METHOD.loss)
    downsampler: DownsamplerConfig = field(default_factory=lambda: _METHOD.downsampler)
    storage_options: dict[str, Any] | None = flag(
        None, 'fsspec options for s3:// input/output as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
        '"http://127.0.0.1:9000"}}\' (default: AWS_* environment variables)', group="run", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.fixup is None:
            object.__setattr__(self, "fixup", self.jbu.fixup)
        elif self.fixup != self.jbu.fixup:
            object.__setattr__(self, "jbu", dataclasses.replace(self.jbu, fixup=self.fixup))
        positive = {
            "steps": self.steps, "batch_size": self.batch_size, "jitters": self.jitters, "proj_dim": self.proj_dim,
            "checkpoint_every": self.checkpoint_every, "val_every": self.val_every, "log_every": self.log_every,
            "workers": self.workers, "input_size": self.input_size, "val_views": self.val_views,
        }  # fmt: skip
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value} (flag --{key.replace('_', '-')})")
        if self.val_images < 0:
            raise ConfigError(f"val_images must be >= 0, got {self.val_images} (flag --val-images)")
        if self.grad_clip_steps < 0:
            raise ConfigError(f"grad_clip_steps must be >= 0, got {self.grad_clip_steps} (flag --grad-clip-steps)")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr} (flag --lr)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 or None, got {self.keep_checkpoints}")
        if len(self.backbone_names) > 1 and not self.feature_agnostic:
            raise ConfigError(
                f"training on several backbones {list(self.backbone_names)} needs a feature-agnostic upsampler; "
                "drop --no-feature-agnostic or give one backbone"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty folder name without '/', got {self.name!r} (flag --name)")

    @property
    def backbone_names(self) -> tuple[str, ...]:
        """The backbones trained on: ``backbones`` if given, else ``(backbone,)``."""
        return tuple(self.backbones) if self.backbones else (self.backbone,)

    @property
    def run_uri(self) -> str:
        """``<output>/<name>``: where Ray Train keeps this run's checkpoints, and the metrics CSV lives."""
        return join(self.output, self.name)

    @property
    def export_uri(self) -> str:
        """``<output>/<name>/upsampler``: the final upsampler folder for ``featurize_coco.py --upsampler``."""
        return join(self.run_uri, EXPORT_DIR)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (nested configs become dicts); :meth:`from_dict` rebuilds it (the worker loop does)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("jbu", "jitter", "loss", "downsampler"):
            out[key] = out[key].to_dict()
        out["backbones"] = list(self.backbones)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJobConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"TrainJobConfig: unknown keys {unknown}")
        kw = dict(data)
        nested = {"jbu": JBUConfig, "jitter": JitterConfig, "loss": LossConfig, "downsampler": DownsamplerConfig}
        for key, klass in nested.items():
            if isinstance(kw.get(key), dict):
                kw[key] = klass.from_dict(kw[key])
        if "backbones" in kw:
            kw["backbones"] = tuple(kw["backbones"] or ())
        return cls(**kw)

    def method_config(self) -> TrainConfig:
        """This job's settings as the method's :class:`TrainConfig`."""
        return dataclasses.replace(
            _METHOD,
            batch_size=self.batch_size, lr=self.lr, n_jitters=self.jitters, projection_dim=self.proj_dim,
            steps=self.steps, grad_clip_steps=self.grad_clip_steps, grad_clip_norm=self.grad_clip_norm,
            image_size=self.input_size, val_every=self.val_every, ckpt_every=self.checkpoint_every,
            jbu=self.jbu, jitter=self.jitter, loss=self.loss, downsampler=self.downsampler,
        )  # fmt: skip


