"""Learned downsamplers that map a (jittered) high-res map onto the backbone's grid of that view.

Both use FeatUp's stride rule per axis, ``s = (H - k) // (h - 1)`` with no padding, and read the top-left
``(h-1)*s + k`` rows / columns; so a map of any size, square or not, lands on exactly the requested ``(h, w)``.
With ``k`` = the backbone stride and ``H = h * stride`` the patches are the backbone's own, non-overlapping.

- :class:`BlurDownsampler`: one learned k x k kernel |theta| / sum|theta| (init: a box filter), shared by channels.
- :class:`AttentionDownsampler`: per-patch softmax over taps of ``w * saliency + b`` (saliency = a learned
  Linear(C->1) of the features, or a saliency map the caller gives), weights shared by channels.

Both accept ``groups`` (G independent parameter sets for a batch laid out group-major, ``B = G * V``; the grouped
implicit fit uses it) and a ``generator`` for their dropout masks, which are drawn once per view and shared by all
groups so a grouped fit reproduces separate fits. Eval mode is deterministic (no dropout of any kind).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import DownsamplerConfig
from featup_ops.losses import gaussian_blur

__all__ = ["BlurDownsampler", "AttentionDownsampler", "build_downsampler", "downsample_strides"]


def downsample_strides(in_size: tuple[int, int], out_size: tuple[int, int], kernel_size: int) -> tuple[int, int]:
    """FeatUp's stride rule per axis: s = (H - k) // (h - 1) (any s >= 1 when h == 1).

    Args:
        in_size: (H, W) of the high-res map.
        out_size: (h, w) grid to produce.
        kernel_size: k.

    Returns:
        (s_y, s_x).

    Raises:
        ValueError: the map is too small for ``out_size`` cells of ``kernel_size``.
    """
    strides = []
    for n_in, n_out, axis in zip(in_size, out_size, ("height", "width")):
        if n_out < 1:
            raise ValueError(f"downsample: output {axis} must be >= 1, got {out_size}")
        s = 1 if n_out == 1 else (n_in - kernel_size) // (n_out - 1)
        if kernel_size > n_in or s < 1:
            raise ValueError(
                f"downsample: a {axis} of {n_in} px cannot give {n_out} cells of a {kernel_size}-px kernel "
                f"(need {axis} >= {kernel_size + max(n_out - 1, 0)}); use a larger map or a smaller kernel_size"
            )
        strides.append(s)
    return strides[0], strides[1]


def _crop_for(x: torch.Tensor, out_size: tuple[int, int], k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    sy, sx = downsample_strides((x.shape[-2], x.shape[-1]), out_size, k)
    hu, wu = (out_size[0] - 1) * sy + k, (out_size[1] - 1) * sx + k
    return x[..., :hu, :wu], (sy, sx)


def _shared_mask(
    views: int, shape: tuple[int, ...], keep: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(views, *shape) Bernoulli(keep) float mask; callers broadcast it over groups."""
    if generator is not None and generator.device != device:
        return (torch.rand((views, *shape), generator=generator) < keep).float().to(device)
    return (torch.rand((views, *shape), generator=generator, device=device) < keep).float()


class BlurDownsampler(nn.Module):
    """Learned blur: kernel |theta| / sum |theta| (k x k, init ones = box filter), applied to every channel.

    Args:
        kernel_size: k.
        cfg: unused fields aside, kept for a uniform constructor.
        groups: accepted for a uniform constructor; the blur kernel is shared by all groups.
    """

    def __init__(self, kernel_size: int, *, cfg: DownsamplerConfig | None = None, groups: int = 1) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"BlurDownsampler: kernel_size must be >= 1, got {kernel_size}")
        self.cfg = cfg or DownsamplerConfig(kind="blur")
        self.kernel_size = kernel_size
        self.groups = groups
        self.theta = nn.Parameter(torch.ones(kernel_size, kernel_size))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Box filter."""
        with torch.no_grad():
            self.theta.fill_(1.0)

    def kernel(self) -> torch.Tensor:
        """(k, k) non-negative kernel summing to 1."""
        a = self.theta.abs()
        return a / a.sum().clamp_min(1e-12)

    def forward(
        self,
        x: torch.Tensor,
        out_size: tuple[int, int],
        saliency: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Downsample.

        Args:
            x: (B, C, H, W) high-res map.
            out_size: (h, w) target grid.
            saliency: ignored (uniform interface with the attention downsampler).
            generator: ignored.

        Returns:
            (B, C, h, w).
        """
        b, c = x.shape[:2]
        x, stride = _crop_for(x, out_size, self.kernel_size)
        kern = self.kernel().to(x.dtype)[None, None]
        y = F.conv2d(x.reshape(b * c, 1, x.shape[-2], x.shape[-1]), kern, stride=stride)
        return y.reshape(b, c, out_size[0], out_size[1])


class AttentionDownsampler(nn.Module):
    """FeatUp's attention downsampler: per patch, softmax over taps of ``w_p * saliency_p + b_p``.

    The saliency of each high-res pixel is a learned Linear(C->1) of the (blurred) features after dropout, or a
    map the caller passes (e.g. the upsampled saliency direction in the projected multi-view loss, or when
    ``in_dim`` is None). ``w``, ``b`` (k x k) are shared by all patches. In training, the logits of a fraction
    ``patch_dropout`` of output cells are zeroed (FeatUp did this in eval too; here eval is deterministic).

    Args:
        in_dim: feature channels C for the internal saliency Linear, or None (saliency must then be given).
        kernel_size: k.
        cfg: dropouts, init noise, pre-blur.
        groups: G independent parameter sets for a batch laid out group-major (B = G * V).
    """

    def __init__(
        self, in_dim: int | None, kernel_size: int, *, cfg: DownsamplerConfig | None = None, groups: int = 1
    ) -> None:
        super().__init__()
        if kernel_size < 1 or groups < 1 or (in_dim is not None and in_dim < 1):
            raise ValueError(
                f"AttentionDownsampler: need kernel_size, groups, in_dim >= 1; got {kernel_size}, {groups}, {in_dim}"
            )
        self.cfg = cfg or DownsamplerConfig()
        self.in_dim = in_dim
        self.kernel_size = kernel_size
        self.groups = groups
        taps = kernel_size * kernel_size
        self.w = nn.Parameter(torch.empty(groups, taps))
        self.b = nn.Parameter(torch.empty(groups, taps))
        if in_dim is not None:
            self.saliency_weight = nn.Parameter(torch.empty(groups, in_dim))
            self.saliency_bias = nn.Parameter(torch.empty(groups))
        else:
            self.register_parameter("saliency_weight", None)
            self.register_parameter("saliency_bias", None)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """w = 1 + noise*N(0,1), b = noise*N(0,1); saliency as nn.Linear's default; all groups alike."""
        taps = self.kernel_size**2
        n = self.cfg.init_noise
        with torch.no_grad():
            self.w.copy_((1 + n * torch.randn(1, taps, generator=generator)).expand_as(self.w))
            self.b.copy_((n * torch.randn(1, taps, generator=generator)).expand_as(self.b))
            if self.saliency_weight is not None:
                bound = 1.0 / math.sqrt(self.in_dim)
                sw = (torch.rand(1, self.in_dim, generator=generator) * 2 - 1) * bound
                sb = (torch.rand(1, generator=generator) * 2 - 1) * bound
                self.saliency_weight.copy_(sw.expand_as(self.saliency_weight))
                self.saliency_bias.copy_(sb.expand_as(self.saliency_bias))

    def forward(
        self,
        x: torch.Tensor,
        out_size: tuple[int, int],
        saliency: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Downsample.

        Args:
            x: (B, C, H, W) high-res map, B = groups * V (group-major).
            out_size: (h, w) target grid.
            saliency: optional (B, 1, H, W) saliency logits; required when ``in_dim`` is None.
            generator: generator for the dropout masks (on x's device or CPU); None = torch's global RNG.

        Returns:
            (B, C, h, w), x's dtype.
        """
        bsz, c, _, _ = x.shape
        g = self.groups
        if bsz % g:
            raise ValueError(f"AttentionDownsampler: batch {bsz} is not a multiple of groups={g}")
        v = bsz // g
        h, w = int(out_size[0]), int(out_size[1])
        k = self.kernel_size
        if self.cfg.blur_input:
            x = gaussian_blur(x, self.cfg.blur_kernel, self.cfg.blur_sigma)
            if saliency is not None:
                saliency = gaussian_blur(saliency, self.cfg.blur_kernel, self.cfg.blur_sigma)
        x, stride = _crop_for(x, (h, w), k)
        hu, wu = x.shape[-2:]
        if saliency is None:
            if self.saliency_weight is None:
                raise ValueError("AttentionDownsampler(in_dim=None) needs a saliency map (B,1,H,W)")
            if c != self.in_dim:
                raise ValueError(f"AttentionDownsampler: built for {self.in_dim} channels, got {c}")
            xin = x
            p = self.cfg.saliency_dropout
            if self.training and p > 0:
                mask = _shared_mask(v, (c, hu, wu), 1 - p, generator, x.device) / (1 - p)
                xin = (x.reshape(g, v, c, hu, wu) * mask[None].to(x.dtype)).reshape(bsz, c, hu, wu)
            sal = torch.einsum("gvchw,gc->gvhw", xin.reshape(g, v, c, hu, wu), self.saliency_weight.to(x.dtype))
            sal = (sal + self.saliency_bias.to(x.dtype)[:, None, None, None]).reshape(bsz, 1, hu, wu)
        else:
            if saliency.shape[0] != bsz or saliency.shape[1] != 1:
                raise ValueError(f"AttentionDownsampler: saliency must be ({bsz},1,H,W), got {tuple(saliency.shape)}")
            sal = saliency[..., :hu, :wu]
        logits = F.unfold(sal, k, stride=stride)  # (B, k*k, h*w)
        if self.training and self.cfg.patch_dropout > 0:
            keep = _shared_mask(v, (1, h * w), 1 - self.cfg.patch_dropout, generator, x.device)
            logits = (logits.reshape(g, v, k * k, h * w) * keep[None].to(logits.dtype)).reshape_as(logits)
        logits = logits.reshape(g, v, k * k, h * w) * self.w.to(logits.dtype)[:, None, :, None]
        logits = logits + self.b.to(logits.dtype)[:, None, :, None]
        attn = torch.softmax(logits.float(), dim=2).to(x.dtype).reshape(bsz, k * k, h * w)
        patches = F.unfold(x, k, stride=stride).reshape(bsz, c, k * k, h * w)
        out = torch.einsum("bcpl,bpl->bcl", patches, attn)
        return out.reshape(bsz, c, h, w)


def build_downsampler(
    cfg: DownsamplerConfig | None, *, in_dim: int | None, stride: int, groups: int = 1
) -> BlurDownsampler | AttentionDownsampler:
    """The downsampler ``cfg.kind`` names, with kernel ``cfg.kernel_size`` or the backbone ``stride``.

    Args:
        cfg: downsampler settings (attention by default).
        in_dim: channels for the attention saliency Linear (None: saliency passed at call time).
        stride: the backbone's stride (the default kernel size).
        groups: independent parameter sets (grouped implicit fit).
    """
    cfg = cfg or DownsamplerConfig()
    k = cfg.kernel_size or stride
    if cfg.kind == "blur":
        return BlurDownsampler(k, cfg=cfg, groups=groups)
    if cfg.kind == "attention":
        return AttentionDownsampler(in_dim, k, cfg=cfg, groups=groups)
    raise ValueError(f"unknown downsampler kind {cfg.kind!r}; choose 'attention' or 'blur'")
