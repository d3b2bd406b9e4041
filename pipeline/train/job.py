"""Ray Train wiring around featup_ops' multi-view training step: distributed JBU upsampler training.

One job = one :class:`TrainJobConfig`. :func:`build_datasets` lists the input with the featurize job's sources
(:func:`pipeline.io.sources.build_manifest`), holds out the last ``val_images`` rows for validation and decodes the rest
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

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featup_ops import load_backbone
from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.io.storage import check_writable, filesystem, is_remote, join
from pipeline.train.config import METRICS_FILE, TrainJobConfig
from pipeline.train.loop import read_metrics, train_loop_per_worker

if TYPE_CHECKING:
    import ray.data
    from ray.train.torch import TorchTrainer

__all__ = ["build_datasets", "build_trainer", "run_training", "export_upsampler", "read_metrics", "split_rows"]


# ----------------------------------------------------------------------------------------------------------------
# Data: manifest -> held-out split -> Ray Data decode
# ----------------------------------------------------------------------------------------------------------------


def _decode_batch(
    batch: dict[str, np.ndarray], *, size: int, storage_options: dict[str, Any] | None
) -> dict[str, np.ndarray]:
    """Ray Data stage: manifest rows (``row``, ``uri``) -> ``row`` int64 and ``image (B, H, W, 3) uint8``.

    Images are read with :func:`pipeline.io.sources.read_many` and decoded with the "crop" policy (FeatUp's Resize +
    CenterCrop). Unreadable or undecodable images are dropped: training has no use for error rows.
    """
    from pipeline.io.decode import read_and_decode

    rows, images = [], []
    for i, d, _ in read_and_decode(list(batch["uri"]), storage_options, size=(size, size), policy="crop"):
        if d is not None:
            images.append(d.pixels)
            rows.append(int(batch["row"][i]))
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

    from pipeline.io.sources import build_manifest

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
    credentials as the rest of the pipeline, see :mod:`pipeline.io.storage`) wrapped for pyarrow."""
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


