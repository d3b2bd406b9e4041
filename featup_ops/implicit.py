"""FeatUp's implicit upsampler: a small per-image MLP on Fourier features of pixel coordinates and colour.

The network (method notes 2) maps every pixel's (y, x, r, g, b), min-max scaled, through learned-phase Fourier
features ``[sin(w v + b_s), cos(w v + b_c), colour]`` (w = exp(linspace(-2, 10, 30)): 303 channels) and
``ChannelNorm -> Dropout2d -> 1x1(303->128) -> ReLU -> Dropout2d -> ChannelNorm -> 1x1(128->128) -> ReLU ->
1x1(128->k)`` to k PCA channels of the backbone's features. Its inputs are coordinates plus colour, so it can be
evaluated at any (H, W), square or not.

This module is the model and its readout: :class:`ImplicitUpsampler` (G independent networks evaluated as one
batched op) and :func:`render_networks` (fitted networks -> features at any size). Fitting them is
:mod:`featup_ops.implicit_fit` (:func:`featup_ops.fit_implicit`); keeping them as data,
:mod:`featup_ops.implicit_function`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import ImplicitConfig
from featup_ops.downsamplers import _shared_mask
from featup_ops.errors import InputSizeError

__all__ = ["ImplicitUpsampler", "amp_autocast", "min_max_scale", "render_networks"]

#: Bytes of Fourier features held at once when evaluating without gradients (rows are processed in blocks).
EVAL_BLOCK_BYTES = 256 * 1024 * 1024


def min_max_scale(x: torch.Tensor) -> torch.Tensor:
    """FeatUp's MinMaxScaler per image: each channel's min/max over space mapped to [-0.5, 0.5].

    Args:
        x: (G, C, H, W).

    Returns:
        (G, C, H, W) float32.
    """
    x = x.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6) - 0.5


def _channel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over channels of (G, C, P) with per-group affine (G, C)."""
    x = x.float()
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * weight[:, :, None] + bias[:, :, None]


class ImplicitUpsampler(nn.Module):
    """G independent implicit networks (G = 1: one image), evaluated as one batched op.

    Args:
        out_dim: output channels k (the PCA dimension).
        cfg: Fourier and MLP constants (``ImplicitConfig``).
        groups: number of independent networks (one per image).
        device, dtype: factory kwargs.
    """

    def __init__(
        self, out_dim: int, *, cfg: ImplicitConfig | None = None, groups: int = 1, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ImplicitConfig()
        if out_dim < 1 or groups < 1:
            raise ValueError(f"ImplicitUpsampler: out_dim and groups must be >= 1, got {out_dim}, {groups}")
        fk = {"device": device, "dtype": dtype}
        self.out_dim, self.groups = out_dim, groups
        n, c_in, hid = cfg.n_freqs, cfg.in_channels, cfg.hidden_dim
        self.register_buffer(
            "freqs", torch.exp(torch.linspace(cfg.log_freq_min, cfg.log_freq_max, n, device=device)), persistent=True
        )
        self.phases = nn.Parameter(torch.empty(groups, 2, 5, n, **fk))
        self.norm0_w = nn.Parameter(torch.empty(groups, c_in, **fk))
        self.norm0_b = nn.Parameter(torch.empty(groups, c_in, **fk))
        self.w1 = nn.Parameter(torch.empty(groups, hid, c_in, **fk))
        self.b1 = nn.Parameter(torch.empty(groups, hid, **fk))
        self.norm1_w = nn.Parameter(torch.empty(groups, hid, **fk))
        self.norm1_b = nn.Parameter(torch.empty(groups, hid, **fk))
        self.w2 = nn.Parameter(torch.empty(groups, hid, hid, **fk))
        self.b2 = nn.Parameter(torch.empty(groups, hid, **fk))
        self.w3 = nn.Parameter(torch.empty(groups, out_dim, hid, **fk))
        self.b3 = nn.Parameter(torch.empty(groups, out_dim, **fk))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Phases ~ N(0, 1); 1x1 convs as Conv2d's default (U(+-1/sqrt(fan_in))); norms identity. Groups alike."""

        def fill(p: torch.Tensor, sampler) -> None:
            with torch.no_grad():
                p.copy_(sampler(p.shape[1:]).to(p.dtype)[None].expand_as(p))

        fill(self.phases, lambda s: torch.randn(s, generator=generator))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2), (self.w3, self.b3)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            fill(w, lambda s, bd=bound: (torch.rand(s, generator=generator) * 2 - 1) * bd)
            fill(b, lambda s, bd=bound: (torch.rand(s, generator=generator) * 2 - 1) * bd)
        with torch.no_grad():
            for p in (self.norm0_w, self.norm1_w):
                p.fill_(1.0)
            for p in (self.norm0_b, self.norm1_b):
                p.zero_()

    def _features(self, colour: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """(G, 3, h, w) scaled colour, (h,) ys, (w,) xs -> (G, in_channels, h*w) Fourier + colour features."""
        g, _, h, w = colour.shape
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(g, 2, h, w)
        v = torch.cat([coords, colour], dim=1).reshape(g, 5, 1, h * w)  # (G, 5, 1, P)
        arg = v * self.freqs[None, None, :, None]  # (G, 5, F, P)
        sin = torch.sin(arg + self.phases[:, 0, :, :, None]).reshape(g, -1, h * w)
        cos = torch.cos(arg + self.phases[:, 1, :, :, None]).reshape(g, -1, h * w)
        parts = [sin, cos] + ([colour.reshape(g, 3, h * w)] if self.cfg.color_feats else [])
        return torch.cat(parts, dim=1)

    def _mlp(
        self, x: torch.Tensor, generator: torch.Generator | None, masks: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """(G, in, P) -> (G, k, P); Dropout2d masks are drawn once and shared by all groups.

        ``masks``: the two dropout multipliers ((1, in, 1) and (1, hidden, 1): keep-mask / keep probability), drawn
        by the caller (the fit's training step); None = draw them here from ``generator``.
        """
        p = self.cfg.dropout
        drop = self.training and p > 0

        def dropout(t: torch.Tensor, j: int) -> torch.Tensor:
            if not drop:
                return t
            if masks is not None:
                return t * masks[j].to(t.dtype)
            return t * (_shared_mask(1, (t.shape[1], 1), 1 - p, generator, t.device) / (1 - p)).to(t.dtype)

        x = dropout(_channel_norm(x, self.norm0_w, self.norm0_b), 0)
        x = torch.relu(torch.baddbmm(self.b1[:, :, None], self.w1, x))
        x = _channel_norm(dropout(x, 1), self.norm1_w, self.norm1_b)
        x = torch.relu(torch.baddbmm(self.b2[:, :, None], self.w2, x))
        return torch.baddbmm(self.b3[:, :, None], self.w3, x)

    def forward(
        self,
        image: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Evaluate the G networks on their images.

        Args:
            image: (G, 3, H, W) normalised images, one per network.
            output_size: (Ho, Wo), any positive size; default (H, W).
            generator: dropout-mask generator (training only).

        Returns:
            (G, k, Ho, Wo) float32.
        """
        if image.dim() != 4 or image.shape[0] != self.groups or image.shape[1] != 3:
            raise InputSizeError(
                f"ImplicitUpsampler: image must be ({self.groups},3,H,W) (one per network), got {tuple(image.shape)}"
            )
        ho, wo = (int(image.shape[-2]), int(image.shape[-1])) if output_size is None else map(int, output_size)
        if ho < 1 or wo < 1:
            raise InputSizeError(f"ImplicitUpsampler: output_size must be positive, got {output_size}")
        colour = min_max_scale(image)
        if (ho, wo) != tuple(image.shape[-2:]):
            colour = F.interpolate(colour, size=(ho, wo), mode="bilinear", align_corners=False)
        dev = image.device
        ys = torch.linspace(-1.0, 1.0, ho, device=dev)
        xs = torch.linspace(-1.0, 1.0, wo, device=dev)
        g = self.groups
        if torch.is_grad_enabled():
            rows = ho
        else:
            rows = max(1, min(ho, EVAL_BLOCK_BYTES // max(1, g * self.cfg.in_channels * wo * 4)))
        outs = []
        for y0 in range(0, ho, rows):
            y1 = min(ho, y0 + rows)
            feats = self._features(colour[:, :, y0:y1], ys[y0:y1], xs)
            outs.append(self._mlp(feats, generator).float().reshape(g, self.out_dim, y1 - y0, wo))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def render(
        self, colour: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, masks: tuple[torch.Tensor, ...] | None
    ) -> torch.Tensor:
        """The training forward on precomputed inputs (one block, gradients on).

        Args:
            colour: (G, 3, h, w) min-max scaled colour at the render size.
            ys, xs: (h,), (w,) coordinates in [-1, 1].
            masks: the dropout multipliers of :meth:`_mlp` (None in eval mode).

        Returns:
            (G, k, h, w), float32 (or the autocast dtype's result cast to float32).
        """
        g, _, h, w = colour.shape
        return self._mlp(self._features(colour, ys, xs), None, masks).float().reshape(g, self.out_dim, h, w)


def amp_autocast(device: torch.device, amp: str, cache: bool = True):
    """bfloat16 autocast per ``ImplicitConfig.amp``; ``cache=False`` inside a step that may be a CUDA graph."""
    use = amp == "on" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use, cache_enabled=cache)


def render_networks(
    net: ImplicitUpsampler, comp: torch.Tensor, mean: torch.Tensor, images: torch.Tensor,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """The readout of fitted networks: features of their images at any size (the fit's result, and a stored
    function's value on read: the one piece of code both use).

    Args:
        net: G fitted networks (eval mode), on the images' device.
        comp: (G, k, C) float32 per-image PCA components the networks predict coefficients of.
        mean: (G, C) float32 per-image PCA mean.
        images: (G, 3, H, W) normalised images, one per network.
        output_size: (Ho, Wo), any positive size.

    Returns:
        (G, C, Ho, Wo) float32; bfloat16 autocast on CUDA as ``net.cfg.amp`` says, as in the fit.
    """
    with torch.no_grad():
        net.eval()
        with amp_autocast(images.device, net.cfg.amp):
            z = net(images, output_size)  # (G, k, Ho, Wo)
        feats = torch.einsum("gkhw,gkc->gchw", z.float(), comp) + mean[:, :, None, None]
    return feats.float()
