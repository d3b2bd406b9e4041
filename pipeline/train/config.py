"""Settings of one training job: :class:`TrainJobConfig` (field names are ``jobs/train_upsampler.py``'s flags) and
the files and constants a run writes beside its checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from featup_ops.config import DownsamplerConfig, JBUConfig, JitterConfig, LossConfig, TrainConfig
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
        jbu / jitter / loss / downsampler: nested method configs.
        storage_options: fsspec options for ``s3://`` input and output (endpoint, credentials).
    """

    input: str
    output: str
    name: str = "jbu"
    kind: str = "auto"
    split: str | None = None
    limit: int | None = None
    val_images: int = 2
    val_views: int = VAL_VIEWS
    input_size: int = _METHOD.image_size
    backbone: str = "efficientnet_lite0"
    backbones: tuple[str, ...] = ()
    weights: str | None = None
    feature_agnostic: bool = True
    steps: int = _METHOD.steps
    batch_size: int = _METHOD.batch_size
    lr: float = _METHOD.lr
    jitters: int = _METHOD.n_jitters
    proj_dim: int = _METHOD.projection_dim
    grad_clip_steps: int = _METHOD.grad_clip_steps
    grad_clip_norm: float = _METHOD.grad_clip_norm
    seed: int = 0
    checkpoint_every: int = _METHOD.ckpt_every
    val_every: int = _METHOD.val_every
    log_every: int = 10
    keep_checkpoints: int | None = 3
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    decode_cpus: float = 0.5
    cache_images: bool = True
    max_failures: int = 0
    jbu: JBUConfig = field(default_factory=lambda: _METHOD.jbu)
    jitter: JitterConfig = field(default_factory=lambda: _METHOD.jitter)
    loss: LossConfig = field(default_factory=lambda: _METHOD.loss)
    downsampler: DownsamplerConfig = field(default_factory=lambda: _METHOD.downsampler)
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
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


