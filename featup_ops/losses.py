"""Losses of the multi-view objective: Gaussian NLL with learned uncertainty, TV, CRF, magnitude, blur pin.

Plain functions (tensors in, scalar out) plus the one learned piece, :class:`UncertaintyHead`. Weights live in
:class:`featup_ops.config.LossConfig`; these functions take the constants they need as arguments.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import LossConfig

__all__ = [
    "UncertaintyHead",
    "gaussian_nll",
    "total_variation",
    "crf_loss",
    "magnitude_loss",
    "blur_pin_loss",
    "gaussian_blur",
]


class UncertaintyHead(nn.Module):
    """Per-pixel scale s of the Gaussian NLL: s = clamp_min(exp(conv1x1(target) + offset), min).

    FeatUp's ``ScaleNet`` (a 1x1 conv C->1 on the target features, init x0.1). ``in_dim`` is whatever the
    caller feeds it: the backbone's C, or the projection dim k so that nothing depends on the backbone. With
    ``groups`` > 1 it holds G independent heads for a batch laid out group-major (``B = G * V``), which the grouped
    implicit fit uses.

    Args:
        in_dim: channels of the target map.
        cfg: init scale, offset and clamp (``LossConfig``).
        groups: number of independent heads.
    """

    def __init__(self, in_dim: int, *, cfg: LossConfig | None = None, groups: int = 1) -> None:
        super().__init__()
        if in_dim < 1 or groups < 1:
            raise ValueError(f"UncertaintyHead: in_dim and groups must be >= 1, got {in_dim}, {groups}")
        self.cfg = cfg or LossConfig()
        self.in_dim = in_dim
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_dim))
        self.bias = nn.Parameter(torch.empty(groups))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Conv2d's default init (U(+-1/sqrt(in))) times ``uncertainty_init_scale``; all groups alike."""
        bound = 1.0 / math.sqrt(self.in_dim)
        w = (torch.rand(1, self.in_dim, generator=generator) * 2 - 1) * bound
        b = (torch.rand(1, generator=generator) * 2 - 1) * bound
        with torch.no_grad():
            self.weight.copy_((w * self.cfg.uncertainty_init_scale).expand_as(self.weight))
            self.bias.copy_((b * self.cfg.uncertainty_init_scale).expand_as(self.bias))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        """Scale map.

        Args:
            target: (B, in_dim, h, w) float, B a multiple of ``groups`` (group-major).

        Returns:
            (B, 1, h, w) float32, >= ``uncertainty_min``.
        """
        b, c, h, w = target.shape
        if c != self.in_dim or b % self.groups:
            raise ValueError(
                f"UncertaintyHead: expected (G*V, {self.in_dim}, h, w) with G={self.groups}, got {tuple(target.shape)}"
            )
        t = target.float().reshape(self.groups, b // self.groups, c, h, w)
        logit = torch.einsum("gvchw,gc->gvhw", t, self.weight) + self.bias[:, None, None, None]
        s = torch.exp(logit + self.cfg.uncertainty_offset).clamp_min(self.cfg.uncertainty_min)
        return s.reshape(b, 1, h, w)


def gaussian_nll(
    pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None, *, reduce: bool = True
) -> torch.Tensor:
    """Multi-view reconstruction loss: mean over pixels of ``|pred - target|^2 / (2 s^2) + log s``.

    The squared error is averaged over channels per pixel. With ``scale=None`` it is the plain MSE.

    Args:
        pred: (B, C, h, w) downsampled jittered high-res features.
        target: (B, C, h, w) backbone features of the jittered image.
        scale: (B, 1, h, w) positive scale s, or None.
        reduce: True -> scalar mean; False -> (B,) per-sample mean.

    Returns:
        float32 scalar or (B,).
    """
    if pred.shape != target.shape:
        raise ValueError(f"gaussian_nll: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float()).pow(2).mean(1, keepdim=True)
    if scale is not None:
        err = err / (2 * scale.pow(2)) + torch.log(scale)
    per = err.flatten(1).mean(1)
    return per.mean() if reduce else per


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """FeatUp's TV: (sum of squared vertical + horizontal differences) / (B*C*H*W).

    Args:
        x: (B, C, H, W).

    Returns:
        float32 scalar.
    """
    x = x.float()
    dv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum()
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum()
    return (dv + dh) / x.numel()


def gaussian_kernel2d(kernel_size: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (k, k) Gaussian."""
    ax = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding (kornia's ``gaussian_blur2d`` default border).

    Args:
        x: (B, C, H, W).
        kernel_size: odd kernel size.
        sigma: standard deviation in pixels.

    Returns:
        (B, C, H, W), same dtype.
    """
    c = x.shape[1]
    k = gaussian_kernel2d(kernel_size, sigma, device=x.device, dtype=x.dtype)
    p = kernel_size // 2
    mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
    xp = F.pad(x, (p, p, p, p), mode=mode)
    return F.conv2d(xp, k[None, None].expand(c, 1, kernel_size, kernel_size), groups=c)


def blur_pin_loss(x: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """mean((GaussianBlur(x) - x)^2): penalises high-frequency noise in the implicit map.

    Args:
        x: (B, C, H, W) high-res features.
        kernel_size, sigma: the Gaussian (5, 1.0 in the method).

    Returns:
        float32 scalar.
    """
    return (gaussian_blur(x, kernel_size, sigma) - x).float().pow(2).mean()


def magnitude_loss(down_magnitude: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((downsampled magnitude channel - |target|_2 per pixel)^2).

    Args:
        down_magnitude: (B, 1, h, w) the downsampled high-res magnitude channel.
        target: (B, C, h, w) target features (its per-pixel L2 norm is the goal).

    Returns:
        float32 scalar.
    """
    return (down_magnitude.float() - target.float().norm(dim=1, keepdim=True)).pow(2).mean()


def _sqdist(a: torch.Tensor) -> torch.Tensor:
    """(B, n, d) -> (B, n, n) squared distances; smooth at 0 (``cdist``'s gradient is not)."""
    sq = a.pow(2).sum(-1)
    return (sq[:, :, None] + sq[:, None, :] - 2 * a @ a.transpose(1, 2)).clamp_min(0)


def crf_loss(
    feats: torch.Tensor,
    guidance: torch.Tensor,
    *,
    cfg: LossConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FeatUp's sampled dense-CRF loss (code only, not in the paper): mean(|df|^2 * kernel) over random pixel pairs.

    kernel = w_a exp(-|dp|^2/(2 pv_a) - |dI|^2/(2 cv)) + w_s exp(-|dp|^2/(2 pv_s)), with p in normalised [-1, 1]
    coordinates and I the guidance colour resized to the features' size. ``crf_samples`` pixels are drawn per
    image (with replacement) and all their pairs are used.

    Args:
        feats: (B, C, H, W) high-res features.
        guidance: (B, 3, H', W') image (resized to (H, W) bilinearly if needed).
        cfg: the CRF constants.
        generator: CPU generator for the pixel draw.

    Returns:
        float32 scalar.
    """
    cfg = cfg or LossConfig()
    b, c, h, w = feats.shape
    if guidance.shape[-2:] != (h, w):
        guidance = F.interpolate(guidance, size=(h, w), mode="bilinear", align_corners=False)
    n = cfg.crf_samples
    idx = torch.randint(0, h * w, (b, n), generator=generator).to(feats.device)
    ys = (idx // w).float() / max(h - 1, 1) * 2 - 1
    xs = (idx % w).float() / max(w - 1, 1) * 2 - 1
    coords = torch.stack([ys, xs], dim=-1)  # (B, n, 2)
    f = feats.flatten(2).gather(2, idx[:, None, :].expand(b, c, n)).float()  # (B, C, n)
    col = guidance.flatten(2).gather(2, idx[:, None, :].expand(b, guidance.shape[1], n)).float()
    dp = _sqdist(coords)  # (B, n, n)
    dc = _sqdist(col.transpose(1, 2))
    df = _sqdist(f.transpose(1, 2))
    kernel = cfg.crf_w_appearance * torch.exp(
        -dp / (2 * cfg.crf_pos_var_appearance) - dc / (2 * cfg.crf_col_var)
    ) + cfg.crf_w_smooth * torch.exp(-dp / (2 * cfg.crf_pos_var_smooth))
    return (df * kernel).mean()
