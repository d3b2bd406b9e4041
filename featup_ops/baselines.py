"""Baseline upsamplers every learned one must beat, and the shared argument check of all upsamplers.

- :class:`BilinearUpsampler`: bilinear interpolation (align_corners=False).
- :class:`BilateralUpsampler`: Kopf et al. 2007 joint bilateral upsampling with fixed kernels, no learning:
  each high-res pixel p averages the low-res features q of its (2R+1)^2 nearest cells, weighted by a spatial
  Gaussian of the distance in low-res cells times a Gaussian of the RGB difference between the guidance colour at p
  and the mean colour of cell q. The default upsampler when no trained checkpoint is given.

All upsamplers share the call ``up(feats (B,C,h,w), image (B,3,H,W) normalised, output_size=None) -> (B,C,Ho,Wo)``
(default output = the image size) and ``.config_dict()`` (JSON-able, with a "kind" key);
:func:`featup_ops.checkpoint.build_upsampler` rebuilds any of them (including the JBU) from that dict.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.errors import ConfigError, InputSizeError

__all__ = ["BilinearUpsampler", "BilateralUpsampler", "check_upsample_args", "resize_guidance"]


def check_upsample_args(
    feats: torch.Tensor,
    image: torch.Tensor,
    output_size: tuple[int, int] | None,
    *,
    name: str,
    dim: int | None = None,
) -> tuple[int, int]:
    """Validate the common upsampler call; returns the output size (Ho, Wo).

    Raises:
        InputSizeError: wrong ranks, batch or device mismatch, channel mismatch with ``dim``, an output size
            smaller than the feature grid or not positive.
    """
    if not torch.is_tensor(feats) or feats.dim() != 4:
        raise InputSizeError(f"{name}: feats must be a (B,C,h,w) tensor, got {getattr(feats, 'shape', type(feats))}")
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[1] != 3:
        raise InputSizeError(f"{name}: image must be a (B,3,H,W) tensor, got {getattr(image, 'shape', type(image))}")
    if feats.shape[0] != image.shape[0]:
        raise InputSizeError(
            f"{name}: feats batch {feats.shape[0]} != image batch {image.shape[0]}; pass one image per feature map"
        )
    if feats.device != image.device:
        raise InputSizeError(f"{name}: feats on {feats.device} but image on {image.device}; move both to one device")
    if dim is not None and feats.shape[1] != dim:
        raise InputSizeError(
            f"{name}: built for {dim} channels but feats have {feats.shape[1]}; use a matching upsampler or dim=None"
        )
    if output_size is None:
        out = (int(image.shape[-2]), int(image.shape[-1]))
    else:
        try:
            out = (int(output_size[0]), int(output_size[1]))
        except (TypeError, IndexError, ValueError):
            raise InputSizeError(f"{name}: output_size must be (H, W), got {output_size!r}") from None
    h, w = feats.shape[-2:]
    if out[0] < h or out[1] < w:
        raise InputSizeError(
            f"{name}: output_size {out} is smaller than the feature grid {(h, w)}; upsamplers only enlarge"
        )
    return out


def resize_guidance(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The guidance image at ``size``: area-pooled when shrinking (FeatUp), bilinear when enlarging.

    Args:
        image: (B, 3, H, W).
        size: (h, w).

    Returns:
        (B, 3, h, w).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if size[0] <= image.shape[-2] and size[1] <= image.shape[-1]:
        return F.adaptive_avg_pool2d(image, size)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


class BilinearUpsampler(nn.Module):
    """Bilinear interpolation to the output size (no parameters, ignores the image's content)."""

    channel_agnostic = True

    def forward(
        self, feats: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Upsample.

        Args:
            feats: (B, C, h, w) low-res features.
            image: (B, 3, H, W) normalised image (sets the default output size).
            output_size: (Ho, Wo); default (H, W).

        Returns:
            (B, C, Ho, Wo), feats' dtype.
        """
        out = check_upsample_args(feats, image, output_size, name="BilinearUpsampler")
        return F.interpolate(feats, size=out, mode="bilinear", align_corners=False)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"kind": "bilinear"}``."""
        return {"kind": "bilinear"}


class BilateralUpsampler(nn.Module):
    """Fixed joint bilateral upsampling (Kopf et al. 2007), no learned parameters.

    Args:
        radius: neighbourhood radius R in low-res cells ((2R+1)^2 cells per output pixel).
        sigma_spatial: spatial Gaussian sigma, in low-res cells.
        sigma_range: colour Gaussian sigma in normalised-image units (0.5 is ~0.11 of the [0, 1] intensity range
            under ImageNet normalisation, std ~0.226).
    """

    channel_agnostic = True

    def __init__(self, *, radius: int = 2, sigma_spatial: float = 1.0, sigma_range: float = 0.5) -> None:
        super().__init__()
        if radius < 0 or sigma_spatial <= 0 or sigma_range <= 0:
            raise ConfigError(
                f"BilateralUpsampler: need radius >= 0 and positive sigmas, got {radius}, {sigma_spatial}, "
                f"{sigma_range}"
            )
        self.radius = int(radius)
        self.sigma_spatial = float(sigma_spatial)
        self.sigma_range = float(sigma_range)

    def forward(
        self, feats: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Upsample.

        Args:
            feats: (B, C, h, w) low-res features.
            image: (B, 3, H, W) normalised image (the guidance).
            output_size: (Ho, Wo); default (H, W).

        Returns:
            (B, C, Ho, Wo), feats' dtype.
        """
        ho, wo = check_upsample_args(feats, image, output_size, name="BilateralUpsampler")
        h, w = feats.shape[-2:]
        weights, cells = self._tap_weights(feats, image, (ho, wo))
        if ho % h == 0 and wo % w == 0:
            return self._blockwise_sum(feats, weights)
        return self._tapwise_sum(feats, weights, cells)

    def _tap_weights(
        self, feats: torch.Tensor, image: torch.Tensor, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Normalised weights ``(T, B, Ho, Wo)`` of the T = (2R+1)^2 taps (row-major over (dy, dx); taps outside
        the grid weigh exactly 0) and each tap's clamped low-res row and column per output row / column."""
        (ho, wo), (h, w) = out_size, feats.shape[-2:]
        dev = feats.device
        img = image.to(feats.dtype)
        cell_mean = F.adaptive_avg_pool2d(img, (h, w))  # (B, 3, h, w)
        guide = resize_guidance(img, (ho, wo))  # (B, 3, Ho, Wo)
        # continuous low-res coordinate of each output pixel centre, and its nearest cell
        uy = (torch.arange(ho, device=dev, dtype=torch.float32) + 0.5) * h / ho - 0.5
        ux = (torch.arange(wo, device=dev, dtype=torch.float32) + 0.5) * w / wo - 0.5
        cy, cx = torch.floor(uy + 0.5).long(), torch.floor(ux + 0.5).long()
        inv2s = 1.0 / (2 * self.sigma_spatial**2)
        inv2r = 1.0 / (2 * self.sigma_range**2)
        logws, cells = [], []
        for dy in range(-self.radius, self.radius + 1):
            qy = cy + dy
            ly = torch.where((qy >= 0) & (qy < h), -((uy - qy) ** 2) * inv2s, torch.full_like(uy, -torch.inf))
            for dx in range(-self.radius, self.radius + 1):
                qx = cx + dx
                lx = torch.where((qx >= 0) & (qx < w), -((ux - qx) ** 2) * inv2s, torch.full_like(ux, -torch.inf))
                qyc, qxc = qy.clamp(0, h - 1), qx.clamp(0, w - 1)
                mean_q = cell_mean.index_select(2, qyc).index_select(3, qxc)
                colour = (guide - mean_q).pow(2).sum(1)  # (B, Ho, Wo)
                logws.append((ly[:, None] + lx[None, :]).to(feats.dtype) - colour * inv2r)
                cells.append((qyc, qxc))
        # normalise in the log domain: far-off colours would otherwise underflow every weight of a pixel
        logw = torch.stack(logws)  # (T, B, Ho, Wo)
        wts = torch.exp(logw - logw.amax(0, keepdim=True))
        return wts / wts.sum(0, keepdim=True).clamp_min(1e-12), cells

    def _tapwise_sum(
        self, feats: torch.Tensor, weights: torch.Tensor, cells: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Any output size: one nearest-cell gather of ``feats`` per tap, ``(B, C, Ho, Wo)``."""
        out = None
        for wt, (qyc, qxc) in zip(weights, cells):
            term = wt[:, None] * feats.index_select(2, qyc).index_select(3, qxc)
            out = term if out is None else out.add_(term)
        return out

    def _blockwise_sum(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Output sizes that are integer multiples (sy, sx) of the grid: output pixel (y, x) has nearest cell
        (y // sy, x // sx), so each cell's sy x sx block is one small matrix product of the cell's (2R+1)^2-tap
        window ``(C, T)`` with the block's weights ``(T, sy*sx)``; nothing of size (B, C, Ho, Wo) is made per tap."""
        b, c, h, w = feats.shape
        t, _, ho, wo = weights.shape
        sy, sx, k = ho // h, wo // w, 2 * self.radius + 1
        # zero padding: the taps that fall outside have weight 0, as the clamped gather of the general path
        windows = F.unfold(F.pad(feats, (self.radius,) * 4), k).view(b, c, t, h, w)
        blocks = weights.view(t, b, h, sy, w, sx)
        return torch.einsum("bcthw,tbhpwq->bchpwq", windows, blocks).reshape(b, c, ho, wo)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description with "kind": "bilateral" and the three constants."""
        return {
            "kind": "bilateral",
            "radius": self.radius,
            "sigma_spatial": self.sigma_spatial,
            "sigma_range": self.sigma_range,
        }
