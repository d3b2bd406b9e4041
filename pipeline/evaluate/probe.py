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

Protocols (:data:`PROTOCOLS`; a probe's score depends on how it is trained, so compare upsamplers under several):

* ``adamw-raw``: the recipe above (:class:`ProbeConfig`) on the features as they are.
* ``adamw-std``: the same on standardised features: per-channel mean and std over every feature pixel of the
  TRAINING images (:func:`channel_stats`), applied to train and test features alike (the probe is a
  :class:`StandardizedProbe`: scoring applies the same statistics).
* ``lbfgs-std``: a probe trained to convergence: full-batch L-BFGS (strong-Wolfe line search) on a fixed sample of
  training pixels (:func:`sample_pixels`: :attr:`LBFGSConfig.pixels` in all, spread evenly over the training images,
  uniform among each image's labelled pixels, drawn from the label map, the seed and the image id only, so every
  upsampler trains on the same pixels), standardised with the sample's own per-channel mean and std, minimising mean
  cross-entropy + ``l2 / 2 * ||W||^2`` (weights only, not the bias; ``l2 = 1e-4``), from zero weights, until the
  largest gradient entry is <= ``tolerance_grad`` (1e-6) or ``max_iter`` (2000) iterations (:class:`LBFGSConfig`).
  Float64, on centred features (exact: the bias is not penalised). The optimum is unique, so the seed matters only
  through the pixel sample.
* ``lbfgs-raw``: the same on raw features (the L2 term then weighs channels by their scale).

Every upsampler of a comparison sees the same training pixels and batches: batch order, flips and the probe's
initialisation come from the probe seed only; the L-BFGS sample from the seed and the labels only.

Scores: mIoU and pixel accuracy over all labelled pixels, and the same over the BOUNDARY band
(:func:`boundary_mask`: labelled pixels within :data:`BOUNDARY_PX` = 8 px, Chebyshev distance, of a region border;
a border pixel is one whose label differs from a 4-neighbour's, both labelled), where upsamplers differ most.

Batches are dicts as yielded by a ``DataLoader`` over :class:`pipeline.read.dataset.FeatureDataset`:
``features (B, C, H, W) float32`` and ``label (B, Hl, Wl)`` (int64 class ids for segmentation, float32 depth for the
depth probe), optionally ``image_id`` (list of str; keys the L-BFGS pixel sample). Pure torch; no Ray, no Zarr.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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

BOUNDARY_PX = 8
"""Width of the boundary band scored separately: labelled pixels within this many pixels (Chebyshev) of a border."""

STD_EPS = 1e-6
"""Floor of a channel's std in standardisation (a constant channel becomes 0, not inf)."""


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
    ``boundary_*``: the same over the pixels of :func:`boundary_mask` only (NaN / 0 when not computed).
    """

    miou: float
    pixel_accuracy: float
    iou: list[float] = field(default_factory=list)
    pixels: int = 0
    boundary_miou: float = float("nan")
    boundary_pixel_accuracy: float = float("nan")
    boundary_pixels: int = 0

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


class Standardize(nn.Module):
    """``(B, C, H, W) -> (x - mean) / std`` per channel with fixed statistics (buffers, not trained).

    Args:
        mean / std: ``(C,)`` float32, computed on training pixels only (:func:`channel_stats`); std is floored at
            :data:`STD_EPS`.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ConfigError(f"Standardize needs (C,) mean and std of one shape, got {tuple(mean.shape)} and "
                              f"{tuple(std.shape)}")
        self.register_buffer("mean", mean.detach().to(torch.float32).clone())
        self.register_buffer("std", std.detach().to(torch.float32).clamp_min(STD_EPS).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (N, C) pixel rows
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)


@torch.no_grad()
def channel_stats(
    loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over every feature pixel of ``loader``'s batches.

    Each batch's mean and variance are computed in float32 (two-pass), and the batches merged in float64 with Chan et
    al.'s pairwise update, so neither a float64 copy of the features nor a sum of squares is needed. Give it the
    TRAINING loader only: the statistics then standardise train and test features alike.

    Returns:
        ``(mean, std)``, each ``(C,)`` float32 on the CPU.
    """
    mean = m2 = None
    n = 0
    for batch in loader:
        feats, _ = _batch_parts(batch, device)
        dims = [0, *range(2, feats.dim())]
        nb = feats.numel() // feats.shape[1]
        var_b, mean_b = torch.var_mean(feats, dim=dims, correction=0)
        mean_b, m2_b = mean_b.double().cpu(), var_b.double().cpu() * nb
        if mean is None or m2 is None:
            mean, m2, n = mean_b, m2_b, nb
            continue
        delta = mean_b - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta * delta * (n * nb / total)
        n = total
    if mean is None or m2 is None or n == 0:
        raise ConfigError("channel_stats: the training loader is empty; nothing to standardise with")
    return mean.float(), (m2 / n).clamp_min(0.0).sqrt().float()


class StandardizedProbe(nn.Module):
    """A linear probe on standardised features: ``conv(standardize(x))`` for ``(B, C, H, W)`` or ``(N, C)`` input.

    Computed as one convolution with the standardisation folded into it (``W / std``, ``b - (W / std) @ mean``), the
    same function and the same gradients for ``conv``'s parameters, without a standardised copy of every batch.
    """

    def __init__(self, conv: nn.Conv2d, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.standardize = Standardize(mean, std).to(conv.weight.device)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.conv.out_channels
        w = self.conv.weight.view(k, -1) / self.standardize.std.to(x.dtype)
        b = self.conv.bias - w @ self.standardize.mean.to(x.dtype)
        if x.dim() == 2:
            return torch.addmm(b, x, w.T)
        return F.conv2d(x, w.view(k, -1, 1, 1), b)


def _with_standardize(probe: nn.Conv2d, standardize: tuple[torch.Tensor, torch.Tensor] | None) -> nn.Module:
    if standardize is None:
        return probe
    mean, std = standardize
    return StandardizedProbe(probe, mean, std)


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
    """Flip each sample of the batch horizontally with probability ``p`` (``feats (B, ...)`` and ``target (B, ...)``
    together; differentiable; new tensors, the inputs are left as they are)."""
    if p <= 0:
        return feats, target
    mask = torch.rand(feats.shape[0], generator=gen) < p
    if not bool(mask.any()):
        return feats, target

    def flip(x: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(m, x.flip(-1), x)

    return flip(feats), flip(target)


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
    sampler = getattr(loader, "batch_sampler", None)
    for epoch in range(cfg.epochs):
        if callable(getattr(sampler, "set_epoch", None)):  # a store's ShardBatchSampler: a new order per epoch
            sampler.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in loader:
            feats, target = _batch_parts(batch, device)
            # the flip augmentation applied to the probe's output: a 1x1 convolution maps each pixel on its own and
            # the bilinear resize of the loss is mirror-symmetric, so probe(flip(x)) == flip(probe(x)); flipping the
            # K-channel output instead of the C-channel features moves C/K times fewer bytes (same draws, same loss
            # up to the order of the floating-point sums)
            out, target = _flip(probe(feats), target, cfg.flip_p, gen)
            loss = loss_fn(out, target)
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
    loader: Any, out_channels: int, loss: Any, cfg: ProbeConfig, in_channels: int | None, device: Any,
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Seed, build ``Conv2d(C, out_channels, 1)`` (C read from the first batch when None), put
    :class:`Standardize` in front when ``standardize`` is given, and fit it with ``loss``."""
    torch.manual_seed(cfg.seed)
    channels = in_channels if in_channels is not None else _in_channels(loader)
    probe = _with_standardize(linear_probe(channels, out_channels).to(device), standardize)
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
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Train a 1x1-conv segmentation probe on frozen features with AdamW (the ``adamw-*`` protocols).

    Args:
        loader: re-iterable batches ``{"features": (B, C, H, W) float32, "label": (B, Hl, Wl) int64}``; must have
            ``len`` (steps per epoch) or be cheap to iterate once to count.
        num_classes: K, the number of classes (labels in ``[0, K)``, 255 ignored).
        cfg: the training recipe.
        in_channels: C; read from the first batch when None.
        device: where to train.
        standardize: ``(mean, std)`` ``(C,)`` of the training features (:func:`channel_stats`): the probe then
            standardises its input first (``adamw-std``); None: raw features (``adamw-raw``).

    Returns:
        The trained probe in eval mode: ``Conv2d(C, K, 1)``, or :class:`StandardizedProbe` around it.
    """
    return _train(loader, num_classes, segmentation_loss, cfg, in_channels, device, standardize)


def boundary_mask(
    label: torch.Tensor, width: int = BOUNDARY_PX, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Labelled pixels within ``width`` px of a region border.

    A border pixel is a labelled pixel with a 4-neighbour of another label (both labelled; the ignore value makes no
    border). The band is every labelled pixel whose Chebyshev distance to a border pixel is <= ``width`` (a square
    ``2 * width + 1`` dilation).

    Args:
        label: ``(B, H, W)`` or ``(H, W)`` integer class ids, ``ignore_index`` = unlabelled.
        width: band half-width in pixels (>= 0).

    Returns:
        bool tensor of ``label``'s shape.
    """
    if width < 0:
        raise ConfigError(f"boundary width must be >= 0 pixels, got {width}")
    lab = label.long()
    squeeze = lab.dim() == 2
    if squeeze:
        lab = lab.unsqueeze(0)
    valid = lab != ignore_index
    border = torch.zeros_like(valid)
    for dim in (1, 2):
        n = lab.shape[dim]
        a, b = lab.narrow(dim, 0, n - 1), lab.narrow(dim, 1, n - 1)
        va, vb = valid.narrow(dim, 0, n - 1), valid.narrow(dim, 1, n - 1)
        diff = (a != b) & va & vb
        border.narrow(dim, 0, n - 1).logical_or_(diff)
        border.narrow(dim, 1, n - 1).logical_or_(diff)
    band = border.to(torch.int32)
    for dim in (1, 2):  # square dilation as two 1-D window sums (cumulative sums: cost independent of width)
        n = band.shape[dim]
        csum = torch.cat([torch.zeros_like(band.narrow(dim, 0, 1)), band.cumsum(dim)], dim)
        pos = torch.arange(n, device=band.device)
        hi, lo = (pos + width + 1).clamp_max(n), (pos - width).clamp_min(0)
        band = csum.index_select(dim, hi) - csum.index_select(dim, lo)
    out = (band > 0) & valid
    return out[0] if squeeze else out


@torch.no_grad()
def confusion_matrices_many(
    probes: Mapping[Any, nn.Module],
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    boundary_px: int | None = BOUNDARY_PX,
) -> dict[Any, tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`confusion_matrices` of several probes in ONE pass over ``loader`` (each batch read and its boundary
    band computed once). Returns ``{key: (full, boundary)}`` for each key of ``probes``."""
    kk = num_classes * num_classes
    conf = {key: torch.zeros(kk, dtype=torch.int64) for key in probes}
    bconf = {key: torch.zeros(kk, dtype=torch.int64) for key in probes} if boundary_px is not None else None
    for probe in probes.values():
        probe.eval()
    for batch in loader:
        feats, label = _batch_parts(batch, device)
        label = label.long()
        keep = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
        band = keep & boundary_mask(label, boundary_px) if bconf is not None else None
        for key, probe in probes.items():
            pred = _resize_to(probe(feats), tuple(label.shape[-2:])).argmax(1)
            idx = label * num_classes + pred
            conf[key] += torch.bincount(idx[keep].cpu(), minlength=kk)
            if bconf is not None:
                bconf[key] += torch.bincount(idx[band].cpu(), minlength=kk)
    shape = (num_classes, num_classes)
    return {key: (conf[key].view(shape), None if bconf is None else bconf[key].view(shape)) for key in probes}


def confusion_matrices(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    boundary_px: int | None = BOUNDARY_PX,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(K, K) int64`` confusion counts (rows = true class, columns = predicted) over all non-ignored pixels, and
    the same over the :func:`boundary_mask` band of ``boundary_px`` (None when ``boundary_px`` is None)."""
    return confusion_matrices_many({0: probe}, loader, num_classes, device=device, boundary_px=boundary_px)[0]


def confusion_matrix(
    probe: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(K, K) int64`` confusion counts (rows = true class, columns = predicted) over all non-ignored pixels."""
    return confusion_matrices(probe, loader, num_classes, device=device, boundary_px=None)[0]


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
    boundary_px: int | None = BOUNDARY_PX,
) -> SegmentationMetrics:
    """mIoU and pixel accuracy of ``probe`` on ``loader`` (features of any resolution; scored at label resolution),
    over all labelled pixels and over the boundary band of ``boundary_px`` (None: skip the band)."""
    return evaluate_segmentation_probes({0: probe}, loader, num_classes, device=device, boundary_px=boundary_px)[0]


def evaluate_segmentation_probes(
    probes: Mapping[Any, nn.Module],
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    boundary_px: int | None = BOUNDARY_PX,
) -> dict[Any, SegmentationMetrics]:
    """:func:`evaluate_segmentation_probe` of several probes on the same features in one pass over ``loader``."""
    out = {}
    many = confusion_matrices_many(probes, loader, num_classes, device=device, boundary_px=boundary_px)
    for key, (conf, bconf) in many.items():
        metrics = metrics_from_confusion(conf)
        if bconf is not None:
            band = metrics_from_confusion(bconf)
            metrics.boundary_miou, metrics.boundary_pixel_accuracy = band.miou, band.pixel_accuracy
            metrics.boundary_pixels = band.pixels
        out[key] = metrics
    return out


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
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Train a 1x1-conv depth regression probe ``Conv2d(C, 1, 1)``; batches carry ``label (B, H, W) float32`` depth
    (0 = invalid). Same optimiser, schedule and ``standardize`` as the segmentation probe."""
    return _train(loader, 1, depth_loss, cfg, in_channels, device, standardize)


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


# ------------------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class ProbeProtocol:
    """How a probe is trained: ``optimizer`` "adamw" (:class:`ProbeConfig`, mini-batches of whole images) or "lbfgs"
    (:class:`LBFGSConfig`, full batch on a pixel sample), on raw or standardised features."""

    name: str
    optimizer: str
    standardize: bool
    description: str


PROTOCOLS: dict[str, ProbeProtocol] = {
    p.name: p
    for p in (
        ProbeProtocol("adamw-raw", "adamw", False, "AdamW, cosine, flips (ProbeConfig) on raw features"),
        ProbeProtocol("adamw-std", "adamw", True, "AdamW as adamw-raw on features standardised with training stats"),
        ProbeProtocol("lbfgs-std", "lbfgs", True, "full-batch L-BFGS to convergence, L2 on weights, standardised"),
        ProbeProtocol("lbfgs-raw", "lbfgs", False, "full-batch L-BFGS to convergence, L2 on weights, raw features"),
    )
}
"""The probe protocols by name (module docstring: what each does)."""

DEFAULT_PROTOCOL = "adamw-raw"
"""The shared papers' protocol, what ``jobs/eval_probe.py`` runs unless told otherwise."""


def protocol(name: str) -> ProbeProtocol:
    """The :class:`ProbeProtocol` called ``name``; one-line ConfigError naming the known ones otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown probe protocol {name!r}; use one of {', '.join(PROTOCOLS)}") from None


@dataclass(frozen=True)
class LBFGSConfig:
    """The converged probe's settings (``lbfgs-*`` protocols).

    Objective: mean cross-entropy over the sampled pixels + ``l2 / 2 * ||W||_F^2`` (the weights, not the bias: the
    gradient gains ``l2 * W``, as a weight decay of ``l2`` would), minimised in float64 from zero weights by
    ``torch.optim.LBFGS(lr=1, history_size, line_search_fn="strong_wolfe")`` until the largest absolute gradient entry
    is <= ``tolerance_grad`` or ``max_iter`` iterations (``max_iter * 5 // 4`` function evaluations) have run, or the
    loss / step changes by less than ``tolerance_change``. ``pixels``: size of the training pixel sample, spread
    evenly over the training images (``ceil(pixels / images)`` per image, fewer where an image has fewer labelled
    pixels).
    """

    l2: float = 1e-4
    max_iter: int = 2000
    tolerance_grad: float = 1e-6
    tolerance_change: float = 1e-12
    history_size: int = 20
    pixels: int = 32768

    def __post_init__(self) -> None:
        if not self.l2 >= 0:
            raise ConfigError(f"L-BFGS l2 must be >= 0, got {self.l2}")
        if self.max_iter < 1 or self.pixels < 1 or self.history_size < 1:
            raise ConfigError("L-BFGS max_iter, pixels and history_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy of the settings."""
        return asdict(self)

    def per_image(self, images: int) -> int:
        """Pixels sampled per training image for ``images`` training images."""
        return max(1, math.ceil(self.pixels / max(int(images), 1)))


def _key_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"featup-probe-pixels:{int(seed)}:{key}".encode()).hexdigest()[:15], 16)


def sample_pixels(
    label: torch.Tensor, n: int, seed: int, key: str, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Flat indices of up to ``n`` labelled pixels of one ``(H, W)`` label map, uniform without replacement.

    The draw depends only on the label map, ``seed`` and ``key`` (the image id), so every upsampler (and every store
    of the same images) gets the same pixels in the same order.

    Returns:
        ``(min(n, labelled),) int64`` indices into ``label.flatten()``, in draw order.
    """
    flat = label.reshape(-1).cpu()
    valid = (flat != ignore_index).nonzero().flatten()
    gen = torch.Generator().manual_seed(_key_seed(seed, key))
    order = torch.randperm(len(valid), generator=gen)[: max(int(n), 0)]
    return valid[order]


def features_at(feats: torch.Tensor, index: torch.Tensor, label_size: tuple[int, int]) -> torch.Tensor:
    """Feature vectors of one image at label pixels: ``feats (C, H, W)``, flat ``index`` into the ``label_size``
    grid -> ``(n, C)``.

    Where the feature grid differs from the label grid the vectors are bilinear samples (``align_corners=False``,
    edges clamped), the values ``F.interpolate(feats, label_size, mode="bilinear")`` has there: for a linear probe
    that equals resizing its logits, as the AdamW protocols do.
    """
    hl, wl = int(label_size[0]), int(label_size[1])
    index = index.to(feats.device)
    if tuple(feats.shape[-2:]) == (hl, wl):
        return feats.reshape(feats.shape[0], -1)[:, index].T
    ys, xs = (index // wl).to(feats.dtype), (index % wl).to(feats.dtype)
    grid = torch.stack([(2 * xs + 1) / wl - 1, (2 * ys + 1) / hl - 1], -1).view(1, 1, -1, 2)
    out = F.grid_sample(feats.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


@torch.no_grad()
def collect_pixels(
    loader: Iterable[Mapping[str, Any]], per_image: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-BFGS training sample: :func:`sample_pixels` of every image of ``loader`` (keyed by the batch's
    ``image_id``, else by the image's position in the loader), their features (:func:`features_at`) and labels.

    Returns:
        ``x (N, C) float32`` and ``y (N,) int64``, images in loader order.
    """
    xs, ys = [], []
    pos = 0
    for batch in loader:
        feats, label = _batch_parts(batch, device)
        ids = batch.get("image_id") if isinstance(batch, Mapping) else None
        for b in range(feats.shape[0]):
            key = str(ids[b]) if ids is not None else f"#{pos}"
            pos += 1
            idx = sample_pixels(label[b], per_image, seed, key)
            xs.append(features_at(feats[b], idx, tuple(label.shape[-2:])))
            ys.append(label[b].reshape(-1)[idx.to(label.device)].long())
    if not xs:
        raise ConfigError("probe training loader is empty; the store has no complete rows to train on")
    return torch.cat(xs), torch.cat(ys)


@dataclass
class LBFGSResult:
    """What the converged fit reached: iterations, function evaluations, final objective, largest absolute gradient
    entry, whether that is <= ``tolerance_grad``, and the sample size."""

    iterations: int
    function_evals: int
    loss: float
    grad_max: float
    converged: bool
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_lbfgs(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: LBFGSConfig = LBFGSConfig()
) -> tuple[torch.Tensor, torch.Tensor, LBFGSResult]:
    """Multinomial logistic regression to convergence (:class:`LBFGSConfig`), float64.

    The features are centred (their sample mean subtracted) before the fit and the bias shifted back after it:
    with the bias unpenalised that is an exact change of variables (the same minimiser), and it spares L-BFGS the
    ill-conditioning of uncentred raw features.

    Args:
        x: ``(N, C)`` features (standardise them first for ``lbfgs-std``).
        y: ``(N,) int64`` classes in ``[0, K)``.
        num_classes: K.

    Returns:
        ``weight (K, C)``, ``bias (K,)`` (float64, x's device; for the uncentred ``x``) and the
        :class:`LBFGSResult`.
    """
    x = x.double()
    centre = x.mean(0)
    x = x - centre
    y = y.long().to(x.device)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=cfg.max_iter, tolerance_grad=cfg.tolerance_grad,
        tolerance_change=cfg.tolerance_change, history_size=cfg.history_size, line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * cfg.l2 * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[w]
    loss = closure().detach()
    grad_max = float(torch.cat([w.grad.flatten(), b.grad.flatten()]).abs().max())
    result = LBFGSResult(
        iterations=int(state.get("n_iter", 0)), function_evals=int(state.get("func_evals", 0)), loss=float(loss),
        grad_max=grad_max, converged=grad_max <= cfg.tolerance_grad, pixels=int(x.shape[0]),
    )
    w = w.detach()
    return w, b.detach() - w @ centre, result


def train_lbfgs_segmentation_probe(
    loader: Iterable[Mapping[str, Any]],
    num_classes: int,
    *,
    per_image: int,
    seed: int = 0,
    standardize: bool = True,
    cfg: LBFGSConfig = LBFGSConfig(),
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, LBFGSResult]:
    """The ``lbfgs-std`` / ``lbfgs-raw`` probe: :func:`collect_pixels` (``per_image`` pixels of each training image,
    drawn by ``seed``), standardise with the sample's own statistics when ``standardize``, :func:`fit_lbfgs`.

    Returns:
        The probe in eval mode (``Conv2d(C, K, 1)`` float32, in a :class:`StandardizedProbe` when ``standardize``)
        and the fit's :class:`LBFGSResult`.
    """
    x, y = collect_pixels(loader, per_image, seed, device)
    if len(y) == 0:
        raise ConfigError("the L-BFGS probe found no labelled training pixels; check the labels (all 255?)")
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise ConfigError(f"probe labels reach class {int(y.max())} but num_classes is {num_classes}; "
                          "pass the label set's class count")
    stats = None
    if standardize:
        xd = x.double()
        stats = (xd.mean(0).float(), xd.std(0, unbiased=False).float())
        x = Standardize(*stats).to(x.device)(x)
    w, b, result = fit_lbfgs(x, y, num_classes, cfg)
    conv = linear_probe(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        conv.weight.copy_(w.view(num_classes, -1, 1, 1))
        conv.bias.copy_(b)
    probe = _with_standardize(conv, stats)
    probe.eval()
    return probe, result


def train_protocol_probe(
    name: str,
    loader: Callable[[bool], Iterable[Mapping[str, Any]]],
    num_classes: int,
    *,
    images: int,
    cfg: ProbeConfig = ProbeConfig(),
    lbfgs: LBFGSConfig = LBFGSConfig(),
    in_channels: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a segmentation probe with the protocol called ``name`` (:data:`PROTOCOLS`).

    Args:
        name: the protocol.
        loader: ``loader(shuffle)`` -> a fresh loader over the TRAINING set: ``shuffle=True`` the AdamW batches
            (seeded by ``cfg.seed``, identical for every upsampler), ``shuffle=False`` a plain pass (statistics,
            the L-BFGS sample).
        num_classes: K.
        images: number of training images (spreads :attr:`LBFGSConfig.pixels`).
        cfg: AdamW recipe; ``cfg.seed`` is the probe seed of every protocol (L-BFGS: its pixel sample).
        lbfgs: L-BFGS settings.
        in_channels: C (read from the first batch when None).
        device: where to train.

    Returns:
        The probe (eval mode) and a JSON-able dict: ``protocol`` and, for L-BFGS, its :class:`LBFGSResult` fields.
    """
    proto = protocol(name)
    info: dict[str, Any] = {"protocol": proto.name}
    if proto.optimizer == "lbfgs":
        probe, result = train_lbfgs_segmentation_probe(
            loader(False), num_classes, per_image=lbfgs.per_image(images), seed=cfg.seed,
            standardize=proto.standardize, cfg=lbfgs, device=device,
        )
        info.update(result.to_dict())
        return probe, info
    stats = channel_stats(loader(False), device) if proto.standardize else None
    probe = train_segmentation_probe(
        loader(True), num_classes, cfg=cfg, in_channels=in_channels, device=device, standardize=stats
    )
    return probe, info


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
        protocol: a :data:`PROTOCOLS` name (depth: ``adamw-raw`` or ``adamw-std``).
        lbfgs: the ``lbfgs-*`` protocols' settings.
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
    protocol: str = DEFAULT_PROTOCOL
    lbfgs: LBFGSConfig = LBFGSConfig()

    def __post_init__(self) -> None:
        proto = protocol(self.protocol)
        if self.task == "depth" and proto.optimizer != "adamw":
            raise ConfigError(f"probe protocol {proto.name!r} is for segmentation; depth probes take adamw-raw or "
                              "adamw-std")


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
    def train(shuffle: bool) -> Any:
        return train_ds.loader(run.batch_size, shuffle=shuffle, seed=run.cfg.seed, num_workers=run.num_workers)

    val = val_ds.loader(run.batch_size, shuffle=False, num_workers=run.num_workers)
    out: dict[str, Any] = {
        "name": run.name, "task": run.task, "protocol": run.protocol, "train_array": run.train_array or run.array,
        "array": run.array, "seed": run.cfg.seed, "train_images": len(train_ds), "val_images": len(val_ds),
        "device": str(device),
    }
    if run.task == "depth":
        stats = channel_stats(train(False), device) if protocol(run.protocol).standardize else None
        probe = train_depth_probe(train(True), cfg=run.cfg, in_channels=train_ds.num_channels, device=device,
                                  standardize=stats)
        out.update(evaluate_depth_probe(probe, val, device=device).to_dict())
    else:
        k = run.labels.num_classes
        if not k:
            raise ConfigError(
                "a segmentation probe needs the number of classes; pass --num-classes (LabelSource.num_classes)"
            )
        probe, info = train_protocol_probe(
            run.protocol, train, k, images=len(train_ds), cfg=run.cfg, lbfgs=run.lbfgs,
            in_channels=train_ds.num_channels, device=device,
        )
        out.update({f"lbfgs_{key}": v for key, v in info.items() if key != "protocol"})
        metrics = evaluate_segmentation_probe(probe, val, k, device=device).to_dict()
        metrics.pop("iou")
        out.update(metrics)
    return out


SUMMARY_METRICS = ("miou", "pixel_accuracy", "boundary_miou", "boundary_pixel_accuracy", "rmse", "delta1")
"""Metrics :func:`summarize` averages over seeds."""


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (name, protocol, train_array, array) for each metric."""
    import statistics

    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        key = (r["name"], r.get("protocol", DEFAULT_PROTOCOL), r["train_array"], r["array"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (name, proto, tr, ar), rs in groups.items():
        row: dict[str, Any] = {"name": name, "protocol": proto, "train_array": tr, "array": ar, "seeds": len(rs)}
        for m in SUMMARY_METRICS:
            vals = [float(r[m]) for r in rs if m in r]
            if vals:
                row[m] = statistics.fmean(vals)
                row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows
