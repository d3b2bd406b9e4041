"""Ray Train wiring around featup_ops' multi-view training step: distributed JBU upsampler training.

One job = one :class:`TrainJobConfig`. :func:`build_datasets` lists the input with the featurize job's sources
(:func:`pipeline.sources.build_manifest`), holds out the last ``val_images`` rows for validation and decodes the rest
with the "crop" policy in Ray Data tasks. :func:`build_trainer` returns a ``TorchTrainer`` whose workers each run
:func:`train_loop_per_worker`:

- a frozen backbone (:func:`featup_ops.load_backbone`, one per name for feature-agnostic multi-backbone training),
  a :class:`featup_ops.JBUUpsampler` and one :class:`featup_ops.multiview.MultiViewObjective` per backbone (the
  downsampler and the uncertainty head), optimised together with NAdam under DDP (gloo on CPU, NCCL on GPU);
- images from this worker's shard of the "train" dataset (``get_dataset_shard("train").iter_torch_batches``);
- every ``val_every`` steps rank 0 measures the multi-view reconstruction error of the upsampler *and* of bilinear
  upsampling on the same held-out images, the same jittered views and the same downsampler, and logs them side by
  side (console, ``metrics.csv`` beside the checkpoints, TensorBoard when installed);
- every ``checkpoint_every`` steps (and at the last step) rank 0 writes the upsampler with
  :func:`featup_ops.save_upsampler` plus the rest of the training state into a temporary folder and reports it with
  ``ray.train.report(..., checkpoint=Checkpoint.from_directory(...))``.

A rerun with the same ``output`` and ``name`` continues from the last reported checkpoint (the step counter carries
on); ``max_failures`` restarts failed workers from it. :func:`run_training` fits the trainer and exports the final
checkpoint's upsampler as a plain folder ``<output>/<name>/upsampler`` that ``jobs/featurize_coco.py --upsampler``
loads with :func:`featup_ops.load_upsampler`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from featup_ops import (
    BilateralUpsampler, BilinearUpsampler, JBUUpsampler, load_backbone, load_upsampler, save_upsampler,
)
from featup_ops.config import DownsamplerConfig, JBUConfig, JitterConfig, LossConfig, TrainConfig
from featup_ops.errors import CheckpointError
from featup_ops.multiview import MultiViewObjective, fixed_views, reconstruction_error
from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.storage import check_writable, filesystem, is_remote, join

if TYPE_CHECKING:
    import ray.data
    from ray.train.torch import TorchTrainer

__all__ = [
    "TrainJobConfig",
    "build_datasets",
    "build_trainer",
    "run_training",
    "train_loop_per_worker",
    "export_upsampler",
    "read_metrics",
    "METRICS_FILE",
    "EXPORT_DIR",
    "STATE_FILE",
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
        kind / split / limit: passed to :func:`pipeline.sources.build_manifest`.
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


# ----------------------------------------------------------------------------------------------------------------
# Data: manifest -> held-out split -> Ray Data decode
# ----------------------------------------------------------------------------------------------------------------


def _decode_batch(
    batch: dict[str, np.ndarray], *, size: int, storage_options: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """Ray Data stage: manifest rows (``row``, ``uri``) -> ``row`` int64 and ``image (B, H, W, 3) uint8``.

    Images are read with :func:`pipeline.sources.read_many` and decoded with the "crop" policy (FeatUp's Resize +
    CenterCrop). Unreadable or undecodable images are dropped: training has no use for error rows.
    """
    from pipeline.decode import decode_image
    from pipeline.errors import DecodeError
    from pipeline.sources import read_many

    datas = read_many(list(batch["uri"]), storage_options, return_exceptions=True)
    rows, images = [], []
    for row, data in zip(batch["row"], datas):
        if isinstance(data, BaseException):
            continue
        try:
            images.append(decode_image(data, size=(size, size), policy="crop").pixels)
        except DecodeError:
            continue
        rows.append(int(row))
    if not images:
        return {"row": np.zeros((0,), np.int64), "image": np.zeros((0, size, size, 3), np.uint8)}
    return {"row": np.asarray(rows, np.int64), "image": np.stack(images)}


def split_rows(n_rows: int, val_images: int, workers: int) -> tuple[list[int], list[int]]:
    """Training and held-out manifest rows: the last ``val_images`` rows are held out.

    Args:
        n_rows: manifest length.
        val_images: rows held out.
        workers: each worker needs at least one training image.

    Returns:
        ``(train_rows, val_rows)``.

    Raises:
        ConfigError: fewer training rows than workers.
    """
    n_train = n_rows - val_images
    if n_train < workers:
        raise ConfigError(
            f"{n_rows} images with {val_images} held out leave {max(n_train, 0)} for training, fewer than "
            f"{workers} workers; give more images or lower --val-images / --workers"
        )
    return list(range(n_train)), list(range(n_train, n_rows))


def build_datasets(cfg: TrainJobConfig) -> dict[str, ray.data.Dataset]:
    """The "train" dataset (split across workers, decoded by Ray Data tasks) and the "val" dataset (the held-out
    rows, decoded here and held in memory; read whole by rank 0).

    Rows: ``row`` int64 (manifest row), ``image`` ``(H, W, 3) uint8`` at ``input_size`` (decoded with the "crop"
    policy, FeatUp's Resize + CenterCrop).

    Args:
        cfg: the job.

    Returns:
        ``{"train": ds}`` plus ``"val"`` when ``val_images`` > 0.

    Raises:
        InputNotFoundError: the input holds no images.
        ConfigError: too few images for the workers and the held-out set.
    """
    import ray.data

    from pipeline.sources import build_manifest

    manifest = build_manifest(
        cfg.input,
        kind=cfg.kind,  # type: ignore[arg-type]
        split=cfg.split,
        limit=cfg.limit,
        storage_options=cfg.storage_options,
    )
    train_rows, val_rows = split_rows(len(manifest), cfg.val_images, cfg.workers)

    def dataset(rows: list[int]) -> ray.data.Dataset:
        items = [{"row": r, "uri": manifest.uris[r]} for r in rows]
        # One block per ~8 rows: decode tasks stay small enough to overlap with training on few cores.
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / 8)))
        return ds.map_batches(
            _decode_batch,
            fn_kwargs={"size": cfg.input_size, "storage_options": cfg.storage_options},
            batch_size=8,
            num_cpus=cfg.decode_cpus,
        )

    out = {"train": dataset(train_rows)}
    if val_rows:
        # The held-out set is small by design: decode it here once and hand it over in memory, so rank 0 reads it
        # without launching decode tasks.
        decoded = _decode_batch(
            {"row": np.asarray(val_rows), "uri": np.asarray([manifest.uris[r] for r in val_rows])},
            size=cfg.input_size,
            storage_options=cfg.storage_options,
        )
        if len(decoded["row"]):
            out["val"] = ray.data.from_items(
                [{"row": int(r), "image": im} for r, im in zip(decoded["row"], decoded["image"])]
            )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def _storage(cfg: TrainJobConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``; object stores go through fsspec (same endpoint and
    credentials as the rest of the pipeline, see :mod:`pipeline.storage`) wrapped for pyarrow."""
    if not is_remote(cfg.output):
        return os.path.abspath(cfg.output), None
    import pyarrow.fs as pafs

    fs, path = filesystem(cfg.output, cfg.storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def build_trainer(cfg: TrainJobConfig, datasets: dict[str, ray.data.Dataset]) -> TorchTrainer:
    """The Ray Train ``TorchTrainer`` for ``cfg``.

    Args:
        cfg: the job.
        datasets: ``{"train": ds}`` and optionally ``"val"`` (from :func:`build_datasets`); "train" is split across
            workers, "val" is not (rank 0 reads all of it).

    Returns:
        A ``TorchTrainer``; ``.fit()`` trains (resuming from the last checkpoint of ``<output>/<name>``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "train" not in datasets:
        raise ConfigError(f"build_trainer needs a 'train' dataset, got {sorted(datasets)}")
    storage_path, storage_fs = _storage(cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def check_backbones(cfg: TrainJobConfig) -> None:
    """Load every backbone once here, on the driver, and check the input size against its stride: a bad name, missing
    weights or a wrong size then fails with one line before Ray Train starts, not in every worker.

    Raises:
        featup_ops.errors.UnknownBackboneError / WeightsNotFoundError / InputSizeError: as their messages say.
    """
    for name in cfg.backbone_names:
        backbone = load_backbone(name, cfg.weights, storage_options=cfg.storage_options)
        backbone.check_input(torch.empty(1, 3, cfg.input_size, cfg.input_size, device="meta"))


def run_training(cfg: TrainJobConfig) -> dict[str, Any]:
    """Build the datasets and the trainer, fit (resuming if the run exists), export the final upsampler.

    Args:
        cfg: the job.

    Returns:
        ``{"step", "metrics", "checkpoint", "upsampler", "metrics_csv"}``: the last reported step and metrics, the
        final checkpoint's path, the exported upsampler folder (``<output>/<name>/upsampler``) and the CSV's path.

    Raises:
        StorageAccessError: the output cannot be written (no credentials, missing bucket, read-only folder).
        featup_ops.errors.UnknownBackboneError / WeightsNotFoundError / InputSizeError: bad model settings.
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times.
    """
    check_writable(cfg.output, cfg.storage_options)
    check_backbones(cfg)
    datasets = build_datasets(cfg)
    result = build_trainer(cfg, datasets).fit()
    if result.checkpoint is None:
        raise ConfigError(f"run {cfg.run_uri} reported no checkpoint; nothing to export")
    export_upsampler(result.checkpoint, cfg.export_uri, cfg.storage_options)
    metrics = dict(result.metrics or {})
    return {
        "step": int(metrics.get("step", 0)),
        "metrics": metrics,
        "checkpoint": _checkpoint_uri(cfg, result.checkpoint.path),
        "upsampler": cfg.export_uri,
        "metrics_csv": join(cfg.run_uri, METRICS_FILE),
    }


def _checkpoint_uri(cfg: TrainJobConfig, path: str) -> str:
    if is_remote(cfg.output):
        return cfg.output.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def export_upsampler(checkpoint: Any, dest: str, storage_options: dict[str, Any] | None = None) -> str:
    """Copy a training checkpoint's upsampler files into a plain upsampler folder.

    Args:
        checkpoint: a ``ray.train.Checkpoint`` reported by :func:`train_loop_per_worker`.
        dest: local folder or ``s3://`` prefix; receives ``upsampler.safetensors`` and ``upsampler.json``.
        storage_options: fsspec options for ``dest``.

    Returns:
        ``dest``, loadable with :func:`featup_ops.load_upsampler`.
    """
    fs, path = filesystem(dest, storage_options)
    with checkpoint.as_directory() as local:
        names = [n for n in sorted(os.listdir(local)) if n.startswith("upsampler.")]
        if not names:
            raise InputNotFoundError(f"checkpoint {checkpoint.path} holds no upsampler files")
        fs.makedirs(path, exist_ok=True)
        for n in names:
            fs.put_file(os.path.join(local, n), f"{path}/{n}")
    return dest


def read_metrics(cfg_or_uri: TrainJobConfig | str, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """Rows of a run's metrics CSV (numbers parsed; empty cells None).

    Args:
        cfg_or_uri: the job, or the CSV's path / URI.
        storage_options: fsspec options.
    """
    if isinstance(cfg_or_uri, TrainJobConfig):
        uri, storage_options = join(cfg_or_uri.run_uri, METRICS_FILE), cfg_or_uri.storage_options
    else:
        uri = cfg_or_uri
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for k, v in raw.items():
            if v == "" or v is None:
                row[k] = None
            elif k in ("split", "backbone"):
                row[k] = v
            elif k == "step":
                row[k] = int(v)
            else:
                row[k] = float(v)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------------------


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed per (job seed, rank, step): jitters differ across workers and steps, and a resumed run draws
    the same jitters at a given step as an uninterrupted one."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _MetricsLog:
    """Rank 0's metrics: console lines, the CSV beside the checkpoints, TensorBoard when installed."""

    def __init__(self, cfg: TrainJobConfig, start_step: int) -> None:
        self.uri = join(cfg.run_uri, METRICS_FILE)
        self.storage_options = cfg.storage_options
        # Rows of earlier runs up to the resumed step are kept; rows past it (work lost to a crash) are dropped.
        self.rows = [r for r in read_metrics(self.uri, cfg.storage_options) if r["step"] <= start_step]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            log_dir = cfg.run_uri if not is_remote(cfg.run_uri) else os.path.join(tempfile.gettempdir(), cfg.name)
            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except ImportError:
            pass

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row.get(k) for k in METRIC_COLUMNS})
        if self.tb is not None:
            prefix = f"{row['split']}/{row['backbone']}"
            for k in METRIC_COLUMNS[3:]:
                if row.get(k) is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", row[k], row["step"])

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS))
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_COLUMNS})
        fs, path = filesystem(self.uri, self.storage_options)
        fs.makedirs(os.path.dirname(path) if not is_remote(self.uri) else path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, buf.getvalue().encode())
        if self.tb is not None:
            self.tb.flush()


def _image_batches(shard: Any, cfg: TrainJobConfig, rank: int) -> Iterator[torch.Tensor]:
    """Endless ``(B, H, W, 3) uint8`` batches from this worker's shard, epoch after epoch.

    With ``cache_images`` the first pass streams from Ray Data and keeps the rows; later epochs reshuffle them in
    memory (seeded per rank and epoch). Every worker yields the same number of batches per epoch (the shards are
    equal-sized), which DDP needs.
    """
    epoch = 0
    cache: list[torch.Tensor] = []
    while True:
        if cfg.cache_images and epoch > 0 and cache:
            images = torch.cat(cache)
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, -1 - epoch))
            order = torch.randperm(len(images), generator=g)
            for i in range(0, len(images), cfg.batch_size):
                yield images[order[i : i + cfg.batch_size]]
        else:
            n = 0
            for batch in shard.iter_torch_batches(
                batch_size=cfg.batch_size,
                device="cpu",
                local_shuffle_buffer_size=None if cfg.cache_images else 4 * cfg.batch_size,
                local_shuffle_seed=None if cfg.cache_images else cfg.seed + 1000 * epoch + rank,
            ):
                images = batch["image"]
                if cfg.cache_images:
                    cache.append(images)
                n += len(images)
                yield images
            if n == 0:
                raise InputNotFoundError(f"worker {rank}: its training shard is empty (all images failed to decode?)")
        epoch += 1


def _val_images(cfg: TrainJobConfig) -> torch.Tensor | None:
    """All held-out images as one ``(N, H, W, 3) uint8`` tensor (rank 0 only), or None without a "val" dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    if shard is None:
        return None
    parts = [b["image"] for b in shard.iter_torch_batches(batch_size=64, device="cpu")]
    return torch.cat(parts) if parts else None


def _normalize(pixels: torch.Tensor, backbone: Any, device: torch.device) -> torch.Tensor:
    from pipeline.decode import normalize

    return normalize(pixels, backbone.mean, backbone.std).to(device, non_blocking=True)


def _log_validation(
    log: _MetricsLog | None, val: dict[str, dict[str, float]], step: int, elapsed: float, line: str
) -> None:
    """Add one "val" row per backbone to the log and print them after ``line``."""
    assert log is not None
    for bname, v in val.items():
        log.add({"step": step, "split": "val", "backbone": bname, "elapsed_s": elapsed, **v})
        line += (
            f" | val[{bname}] upsampler {v['val_err_upsampler']:.4f} bilinear {v['val_err_bilinear']:.4f}"
            f" bilateral {v['val_err_bilateral']:.4f} ratio {v['val_ratio']:.3f}"
        )
    print(line, flush=True)
    log.flush()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the models, resume, train ``steps`` steps, validate, checkpoint.

    Args:
        loop_config: :meth:`TrainJobConfig.to_dict` (the trainer's ``train_loop_config``).
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainJobConfig.from_dict(loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    names = cfg.backbone_names

    backbones = {n: load_backbone(n, cfg.weights, storage_options=cfg.storage_options).to(device) for n in names}
    for bb in backbones.values():
        bb.check_input(torch.zeros(1, 3, cfg.input_size, cfg.input_size))
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    model = _TrainModel(cfg, backbones).to(device)
    optimizer = torch.optim.NAdam(model.parameters(), lr=cfg.lr)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start_step = model.load_training_state(d, optimizer, device)

    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    log = _MetricsLog(cfg, start_step) if rank == 0 else None
    val_pixels = _val_images(cfg) if rank == 0 else None
    if start_step >= cfg.steps:
        if rank == 0:
            print(f"[train] {cfg.name}: already at step {start_step} >= --steps {cfg.steps}; nothing to do", flush=True)
        return
    if rank == 0:
        print(
            f"[train] {cfg.name}: backbones {list(names)}, {world} worker(s) on {device}, steps {start_step + 1}.."
            f"{cfg.steps}, batch {cfg.batch_size}/worker, "
            f"held-out images {0 if val_pixels is None else len(val_pixels)}",
            flush=True,
        )

    t_start = time.perf_counter()
    if rank == 0 and start_step == 0 and val_pixels is not None:
        # The untrained upsampler on the same views: the starting point the later ratios are read against.
        _log_validation(log, model.validate(val_pixels, device), 0, 0.0, f"[train] step 0/{cfg.steps}")
    batches = _image_batches(ray.train.get_dataset_shard("train"), cfg, rank)
    t_log = time.perf_counter()
    loss_sum, n_images = 0.0, 0
    loss_count = 0
    for step in range(start_step + 1, cfg.steps + 1):
        pixels = next(batches)
        name = names[(step - 1) % len(names)]
        image = _normalize(pixels, backbones[name], device)
        generator = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, step))
        model.train()
        loss, _ = ddp(image, name, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step <= cfg.grad_clip_steps:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        optimizer.step()
        loss_sum += float(loss.detach())
        loss_count += 1
        n_images += len(pixels)

        last = step == cfg.steps
        do_log = step % cfg.log_every == 0 or last
        do_val = step % cfg.val_every == 0 or last
        do_ckpt = step % cfg.checkpoint_every == 0 or last
        if not (do_log or do_val or do_ckpt):
            continue
        stats = torch.tensor([loss_sum, float(loss_count), float(n_images)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(stats)  # sums over workers: mean loss over workers and steps, total images
        now = time.perf_counter()
        metrics: dict[str, Any] = {
            "step": step,
            "loss": float(stats[0] / stats[1]),
            "images_per_s": float(stats[2]) / max(now - t_log, 1e-9),
        }
        loss_sum, loss_count, n_images, t_log = 0.0, 0, 0, now
        if rank == 0:
            assert log is not None
            log.add({**metrics, "split": "train", "backbone": "+".join(names), "lr": cfg.lr,
                     "elapsed_s": now - t_start})  # fmt: skip
            line = f"[train] step {step}/{cfg.steps} loss {metrics['loss']:.4f} {metrics['images_per_s']:.1f} img/s"
            if do_val and val_pixels is not None:
                val = model.validate(val_pixels, device)
                _log_validation(log, val, step, now - t_start, line)
                for bname, v in val.items():
                    metrics.update(v if len(names) == 1 else {f"{k}[{bname}]": x for k, x in v.items()})
            else:
                print(line, flush=True)
            log.flush()
        if do_ckpt or do_val:
            if rank == 0 and do_ckpt:
                with tempfile.TemporaryDirectory(prefix="featup-ckpt-") as tmp:
                    model.save_training_state(tmp, optimizer, step, metrics)
                    ray.train.report(
                        metrics,
                        checkpoint=ray.train.Checkpoint.from_directory(tmp),
                        checkpoint_dir_name=f"checkpoint_{step:07d}",
                    )
            else:
                ray.train.report(metrics)


class _TrainModel(nn.Module):
    """The trainable parts in one module (so DDP sees one forward): the JBU upsampler, shared by every
    backbone, and one multi-view objective (downsampler + uncertainty head) per backbone. The frozen
    backbones are held outside the module's parameters."""

    def __init__(self, cfg: TrainJobConfig, backbones: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbones = dict(backbones)  # a plain dict: not registered, never in DDP or the optimizer
        first = backbones[cfg.backbone_names[0]]
        jbu_cfg = dataclasses.replace(cfg.jbu, final_mix=not cfg.feature_agnostic)
        self.upsampler = JBUUpsampler(None if cfg.feature_agnostic else first.dim, cfg=jbu_cfg)
        method = cfg.method_config()
        self.objectives = nn.ModuleDict(
            {_module_key(n): MultiViewObjective.from_train_config(bb.dim, bb.stride, method)
             for n, bb in backbones.items()}
        )  # fmt: skip

    def forward(
        self, image: torch.Tensor, name: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-view loss of one step on ``image (B, 3, H, W)`` (normalised for backbone ``name``)."""
        objective = self.objectives[_module_key(name)]
        return objective.loss(self.upsampler, image, self.backbones[name], generator)

    @torch.no_grad()
    def validate(self, pixels: torch.Tensor, device: torch.device) -> dict[str, dict[str, float]]:
        """Held-out multi-view reconstruction errors per backbone, upsampler and baselines on the same views.

        Args:
            pixels: ``(N, H, W, 3) uint8`` held-out images.
            device: where to compute.

        Returns:
            ``{backbone: {val_err_upsampler, val_err_bilinear, val_err_bilateral, val_ratio,
            val_ratio_bilateral, val_err_upsampler_learned_ds, val_err_bilinear_learned_ds}}``: relative
            squared errors (lower is better) with FeatUp's fixed box downsampler (the headline figures) and
            with the objective's learned downsampler; ratios = upsampler / baseline.
        """
        was_training = self.training
        self.eval()
        size = (int(pixels.shape[1]), int(pixels.shape[2]))
        views = fixed_views(self.cfg.val_views, size, self.cfg.jitter, seed=VAL_SEED)
        candidates = {"upsampler": self.upsampler, "bilinear": BilinearUpsampler(), "bilateral": BilateralUpsampler()}
        out: dict[str, dict[str, float]] = {}
        for name, bb in self.backbones.items():
            learned = self.objectives[_module_key(name)].downsampler
            sums: dict[str, float] = {}
            for i in range(0, len(pixels), self.cfg.batch_size):
                image = _normalize(pixels[i : i + self.cfg.batch_size], bb, device)
                feats = bb(image)
                for cname, up in candidates.items():
                    hr = up(feats, image)
                    err = reconstruction_error(hr, image, bb, views)
                    sums[f"val_err_{cname}"] = sums.get(f"val_err_{cname}", 0.0) + float(err.sum())
                    if cname != "bilateral":
                        err = reconstruction_error(hr, image, bb, views, learned)
                        key = f"val_err_{cname}_learned_ds"
                        sums[key] = sums.get(key, 0.0) + float(err.sum())
            v = {k: s / len(pixels) for k, s in sums.items()}
            v["val_ratio"] = v["val_err_upsampler"] / max(v["val_err_bilinear"], 1e-12)
            v["val_ratio_bilateral"] = v["val_err_upsampler"] / max(v["val_err_bilateral"], 1e-12)
            out[name] = v
        self.train(was_training)
        return out

    def save_training_state(
        self, directory: str, optimizer: torch.optim.Optimizer, step: int, metrics: dict[str, Any]
    ) -> None:
        """Write the upsampler (:func:`featup_ops.save_upsampler`, loadable on its own) and ``train_state.pt``
        (objectives, optimizer, step) into ``directory``."""
        cfg = self.cfg
        meta = {
            "step": step,
            "backbone": cfg.backbone_names[0] if len(cfg.backbone_names) == 1 else None,
            "backbones": list(cfg.backbone_names),
            "weights_hash": {n: bb.weights_hash for n, bb in self.backbones.items()},
            "input_size": cfg.input_size,
            "train": {"run": cfg.name, "workers": cfg.workers, "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "jitters": cfg.jitters, "proj_dim": cfg.proj_dim, "steps": cfg.steps},
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }  # fmt: skip
        save_upsampler(directory, self.upsampler, meta=meta)
        state = {"step": step, "objectives": self.objectives.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(state, os.path.join(directory, STATE_FILE))

    def load_training_state(self, directory: str, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
        """Restore from a checkpoint folder written by :meth:`save_training_state`; returns its step.

        Raises:
            CheckpointError: the checkpoint was made with another upsampler config or other backbones.
        """
        loaded = load_upsampler(directory, map_location=device)
        if loaded.config_dict() != self.upsampler.config_dict():
            raise CheckpointError(
                f"run {self.cfg.name!r}: its last checkpoint holds upsampler {loaded.config_dict()}, this job "
                f"builds {self.upsampler.config_dict()}; use a new --name or the original settings"
            )
        self.upsampler.load_state_dict(loaded.state_dict())
        state = torch.load(os.path.join(directory, STATE_FILE), map_location=device, weights_only=True)
        try:
            self.objectives.load_state_dict(state["objectives"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"run {self.cfg.name!r}: its last checkpoint was trained on other backbones "
                f"({sorted(state['objectives'])[:4]}...); use a new --name ({str(exc).splitlines()[0]})"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this job's lr wins over the saved one (a resume may change it)
            group["lr"] = self.cfg.lr
        return int(state["step"])



def _module_key(name: str) -> str:
    """A backbone name as an ``nn.ModuleDict`` key (no dots)."""
    return name.replace(".", "_")
