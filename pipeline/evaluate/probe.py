"""Linear probes on frozen features: the evaluation protocol the recent upsampler papers share.

Segmentation (JAFAR / AnyUp / NAF protocol, ``docs/design.md``, "Evaluation protocol"): a 1x1 convolution
``Conv2d(C, K, 1)`` on frozen features, cross-entropy with ignore index 255, random horizontal flip p=0.5, AdamW with
weight decay 1e-5, cosine learning-rate schedule with ``T_max = epochs * steps_per_epoch`` stepped once per optimizer
step (JAFAR's released code steps per iteration with ``T_max = epochs``, which makes the rate oscillate; we do not).
Logits are bilinearly resized to the label resolution before the loss and the metrics, so one probe serves low-res
and high-res features alike; that is what the feature-preservation test needs (train on low-res features, apply the
same probe to upsampled ones).

Depth: a 1x1 convolution regressing depth, mean squared error on valid pixels (target > 0), reported as RMSE and
delta < 1.25 accuracy.

Batches are dicts as yielded by a ``DataLoader`` over :class:`pipeline.read.dataset.FeatureDataset`:
``features (B, C, H, W) float32`` and ``label (B, Hl, Wl)`` (int64 class ids for segmentation, float32 depth for the
depth probe). Pure torch; no Ray, no Zarr.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

IGNORE_INDEX = 255
"""Label value excluded from loss and metrics (COCO-Stuff, VOC, Cityscapes convention; also the padded area)."""

DELTA_THRESHOLD = 1.25
"""Depth accuracy threshold: a pixel counts when max(pred/gt, gt/pred) < 1.25 (the usual delta_1)."""

MIN_DEPTH = 1e-3
"""Predictions are clamped to this before ratios, so a non-positive prediction counts as wrong, not as NaN."""


@dataclass(frozen=True)
class ProbeConfig:
    """Training recipe of a linear probe.

    Defaults follow the shared protocol (AdamW, weight decay 1e-5, cosine schedule per step, flip p=0.5); ``lr``
    takes ViT-Up's 2e-3 (JAFAR's eval.yaml uses 5e-4), ``epochs`` 20 as for VOC/ADE20K/Cityscapes (use 5 for
    COCO-Stuff).
    """

    epochs: int = 20
    lr: float = 2e-3
    weight_decay: float = 1e-5
    flip_p: float = 0.5
    seed: int = 0
    warmup_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy of the settings."""
        return asdict(self)


@dataclass
class SegmentationMetrics:
    """Segmentation scores over a whole evaluation set.

    ``miou`` averages the IoU over classes that occur in the labels or the predictions (union > 0), as
    torchmetrics' macro JaccardIndex does with absent classes excluded; ``pixel_accuracy`` is the fraction of
    non-ignored pixels predicted correctly; ``iou`` lists per-class IoU (NaN where the class never occurs).
    """

    miou: float
    pixel_accuracy: float
    iou: list[float] = field(default_factory=list)
    pixels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DepthMetrics:
    """Depth scores over all valid pixels (target > 0): ``rmse`` (target units) and ``delta1`` (fraction)."""

    rmse: float
    delta1: float
    pixels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_probe(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The probe: a 1x1 convolution ``(B, C, H, W) -> (B, K, H, W)``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


def _resize_to(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``(B, K, h, w)`` predictions to ``size`` (no-op when equal)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def _batch_parts(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        feats, target = batch["features"], batch["label"]
    except KeyError as exc:
        raise KeyError(
            f"probe batch lacks {exc}; build the FeatureDataset with labels=... so items carry 'label'"
        ) from None
    return feats.to(device, torch.float32, non_blocking=True), target.to(device, non_blocking=True)


def _flip(
    feats: torch.Tensor, target: torch.Tensor, p: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample of the batch horizontally with probability ``p`` (features and target together)."""
    if p <= 0:
        return feats, target
    mask = torch.rand(feats.shape[0], generator=gen) < p
    if not bool(mask.any()):
        return feats, target
    feats, target = feats.clone(), target.clone()
    m = mask.to(feats.device)
    feats[m] = feats[m].flip(-1)
    target[m] = target[m].flip(-1)
    return feats, target


def _schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over ``total_steps`` optimizer steps (after an optional linear warm-up), stepped per step."""
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: Any,
    cfg: ProbeConfig,
    device: torch.device | str,
    steps_per_epoch: int,
) -> list[float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_steps)
    losses: list[float] = []
    probe.train()
    for _ in range(cfg.epochs):
        total, n = 0.0, 0
        for batch in loader:
            feats, target = _batch_parts(batch, device)
            feats, target = _flip(feats, target, cfg.flip_p, gen)
            loss = loss_fn(probe(feats), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
            n += 1
        losses.append(total / max(n, 1))
    probe.eval()
    return losses


def _steps(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in loader)


def _in_channels(loader: Iterable[Mapping[str, torch.Tensor]]) -> int:
    for batch in loader:
        return int(batch["features"].shape[1])
    raise ConfigError("probe training loader is empty; the store has no complete rows to train on")


def _train(
    loader: Any, out_channels: int, loss: Any, cfg: ProbeConfig, in_channels: int | None, device: Any
) -> nn.Conv2d:
    """Seed, build ``Conv2d(C, out_channels, 1)`` (C read from the first batch when None) and fit it with ``loss``."""
    torch.manual_seed(cfg.seed)
    channels = in_channels if in_channels is not None else _in_channels(loader)
    probe = linear_probe(channels, out_channels).to(device)
    _fit(probe, loader, loss, cfg, device, _steps(loader))
    return probe


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits (B, K, h, w)`` against ``label (B, H, W) int64`` at label resolution, ignoring 255."""
    logits = _resize_to(logits, tuple(label.shape[-2:]))
    return F.cross_entropy(logits, label.long(), ignore_index=IGNORE_INDEX)


def train_segmentation_probe(
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    cfg: ProbeConfig = ProbeConfig(),
    in_channels: int | None = None,
    device: torch.device | str = "cpu",
) -> nn.Conv2d:
    """Train a 1x1-conv segmentation probe on frozen features.

    Args:
        loader: re-iterable batches ``{"features": (B, C, H, W) float32, "label": (B, Hl, Wl) int64}``; must have
            ``len`` (steps per epoch) or be cheap to iterate once to count.
        num_classes: K, the number of classes (labels in ``[0, K)``, 255 ignored).
        cfg: the training recipe.
        in_channels: C; read from the first batch when None.
        device: where to train.

    Returns:
        The trained probe in eval mode, ``Conv2d(C, K, 1)``.
    """
    return _train(loader, num_classes, segmentation_loss, cfg, in_channels, device)


@torch.no_grad()
def confusion_matrix(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(K, K) int64`` confusion counts (rows = true class, columns = predicted) over all non-ignored pixels."""
    probe.eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in loader:
        feats, label = _batch_parts(batch, device)
        pred = _resize_to(probe(feats), tuple(label.shape[-2:])).argmax(1)
        label = label.long()
        keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
        idx = label[keep] * num_classes + pred[keep]
        conf += torch.bincount(idx.cpu(), minlength=num_classes * num_classes)
    return conf.view(num_classes, num_classes)


def metrics_from_confusion(conf: torch.Tensor) -> SegmentationMetrics:
    """mIoU (over classes with union > 0) and pixel accuracy from ``(K, K)`` confusion counts."""
    conf = conf.to(torch.float64)
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    total = float(conf.sum())
    acc = float(tp.sum() / total) if total > 0 else float("nan")
    return SegmentationMetrics(miou=miou, pixel_accuracy=acc, iou=[float(v) for v in iou], pixels=int(total))


def evaluate_segmentation_probe(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
) -> SegmentationMetrics:
    """mIoU and pixel accuracy of ``probe`` on ``loader`` (features of any resolution; scored at label resolution)."""
    return metrics_from_confusion(confusion_matrix(probe, loader, num_classes, device=device))


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``pred (B, 1, h, w)`` against ``target (B, H, W) float32`` on pixels with target > 0."""
    pred = _resize_to(pred, tuple(target.shape[-2:]))[:, 0]
    valid = target > 0
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[valid], target[valid].to(pred.dtype))


def train_depth_probe(
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    cfg: ProbeConfig = ProbeConfig(),
    in_channels: int | None = None,
    device: torch.device | str = "cpu",
) -> nn.Conv2d:
    """Train a 1x1-conv depth regression probe ``Conv2d(C, 1, 1)``; batches carry ``label (B, H, W) float32`` depth
    (0 = invalid). Same optimiser and schedule as the segmentation probe."""
    return _train(loader, 1, depth_loss, cfg, in_channels, device)


@torch.no_grad()
def evaluate_depth_probe(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
) -> DepthMetrics:
    """RMSE and delta<1.25 of ``probe`` on all valid pixels (target > 0) of ``loader``."""
    probe.eval()
    sq, good, n = 0.0, 0, 0
    for batch in loader:
        feats, target = _batch_parts(batch, device)
        pred = _resize_to(probe(feats), tuple(target.shape[-2:]))[:, 0].double()
        target = target.double()
        valid = target > 0
        p, g = pred[valid], target[valid]
        sq += float(((p - g) ** 2).sum())
        p = p.clamp_min(MIN_DEPTH)
        ratio = torch.maximum(p / g, g / p)
        good += int((ratio < DELTA_THRESHOLD).sum())
        n += int(valid.sum())
    if n == 0:
        return DepthMetrics(rmse=float("nan"), delta1=float("nan"), pixels=0)
    return DepthMetrics(rmse=math.sqrt(sq / n), delta1=good / n, pixels=n)


# ------------------------------------------------------------------------------------------ probes on feature stores
# The store-level half: join stores on the same images, split them the same way, train and score one probe per
# (store, seed). Imports pipeline.read lazily so the probe maths above stays pure torch.

VAL_SPLIT_SALT = "featup-probe-split"
"""Salt of the hash that assigns image ids to train/val, so every store (and every run) splits the same way."""


@dataclass(frozen=True)
class ProbeRun:
    """One probe to train and score.

    Attributes:
        name: label of the features (e.g. "bilinear", "jbu", "implicit").
        train_store: store to train on.
        val_store: store to score on (the same as ``train_store`` when the split is by ``val_ids``).
        train_ids / val_ids: image ids of the two sets (the same for every store being compared).
        labels: a :class:`pipeline.evaluate.labels.LabelSource`.
        array: feature array scored ("hires", "lowres" or "implicit").
        train_array: feature array trained on (None = ``array``; "lowres" for the feature-preservation test).
        task: "segmentation" or "depth".
        cfg: probe recipe (seed included).
        batch_size / num_workers: DataLoader settings.
        channels: channel selection for both arrays.
        storage_options: fsspec options.
    """

    name: str
    train_store: str
    val_store: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    labels: Any
    array: str = "hires"
    train_array: str | None = None
    task: str = "segmentation"
    cfg: ProbeConfig = ProbeConfig()
    batch_size: int = 4
    num_workers: int = 0
    channels: Any = None
    storage_options: dict[str, Any] | None = None


def split_ids(ids: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of image ids by a salted hash (independent of order and of the store)."""
    import hashlib

    train, val = [], []
    for i in sorted(ids):
        h = int(hashlib.sha256(f"{VAL_SPLIT_SALT}:{i}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train).append(i)
    return train, val


def _dataset(store: str, array: str, ids: Sequence[str], run: ProbeRun) -> Any:
    from pipeline.read.dataset import FeatureDataset
    from pipeline.read.store_info import complete_image_ids

    by_id = complete_image_ids(store, array, storage_options=run.storage_options)
    rows = [by_id[i] for i in ids if i in by_id]
    return FeatureDataset(
        store, array, channels=run.channels, labels=run.labels, storage_options=run.storage_options, rows=rows
    )


def run_probe(run: ProbeRun, device: str | None = None) -> dict[str, Any]:
    """Train the probe of ``run`` on its train set and score it on its val set.

    Returns:
        JSON-able dict: name, task, arrays, seed, sizes, and the metrics (``miou``/``pixel_accuracy`` or
        ``rmse``/``delta1``).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_ds = _dataset(run.train_store, run.train_array or run.array, run.train_ids, run)
    val_ds = _dataset(run.val_store, run.array, run.val_ids, run)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ConfigError(
            f"probe {run.name!r}: empty train ({len(train_ds)}) or val ({len(val_ds)}) set; check --val-fraction and "
            "that the labels and the store share image ids"
        )
    train = train_ds.loader(run.batch_size, shuffle=True, seed=run.cfg.seed, num_workers=run.num_workers)
    val = val_ds.loader(run.batch_size, shuffle=False, num_workers=run.num_workers)
    out: dict[str, Any] = {
        "name": run.name, "task": run.task, "train_array": run.train_array or run.array, "array": run.array,
        "seed": run.cfg.seed, "train_images": len(train_ds), "val_images": len(val_ds), "device": str(device),
    }
    if run.task == "depth":
        probe = train_depth_probe(train, cfg=run.cfg, in_channels=train_ds.num_channels, device=device)
        out.update(evaluate_depth_probe(probe, val, device=device).to_dict())
    else:
        k = run.labels.num_classes
        if not k:
            raise ConfigError(
                "a segmentation probe needs the number of classes; pass --num-classes (LabelSource.num_classes)"
            )
        probe = train_segmentation_probe(train, k, cfg=run.cfg, in_channels=train_ds.num_channels, device=device)
        metrics = evaluate_segmentation_probe(probe, val, k, device=device).to_dict()
        metrics.pop("iou")
        out.update(metrics)
    return out


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (name, train_array, array) for each metric."""
    import statistics

    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["name"], r["train_array"], r["array"]), []).append(r)
    rows = []
    for (name, tr, ar), rs in groups.items():
        row: dict[str, Any] = {"name": name, "train_array": tr, "array": ar, "seeds": len(rs)}
        for m in ("miou", "pixel_accuracy", "rmse", "delta1"):
            vals = [float(r[m]) for r in rs if m in r]
            if vals:
                row[m] = statistics.fmean(vals)
                row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows
