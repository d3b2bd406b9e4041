"""Random view transforms (flip, reflect-pad, zoom-crop) applied identically to maps of any resolution.

FeatUp's transform t (section 4 of the method notes): flip horizontally with p=0.5; reflect-pad by ``max_pad`` px;
with p=0.5 resize by a zoom z ~ U[1, max_zoom]; crop the original size at a random integer offset in
``[0, floor((H + 2 pad) z) - H]``. Here the parameters are stored in *relative* coordinates (fractions of the
reference size), and a map of any resolution is resampled with one ``grid_sample``: output point u in [0, 1]
reads the source at ``(u + offset) / zoom - pad`` (flipped as ``1 - x`` first). So an image (B,3,H,W) and a feature
map (B,C,H',W') of another resolution get the same geometric transform, which the multi-view loss needs
(``t(upsample(f))`` is compared with ``f(t(x))``). Out-of-range points reflect about the border (half-sample
symmetric reflection, the continuous version of reflect padding); at integer offsets and zoom 1 the image is
shifted exactly, with no interpolation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featup_ops.config import JitterConfig

__all__ = ["Jitter", "sample_jitter", "apply_jitter", "jitter_grid"]


@dataclass(frozen=True)
class Jitter:
    """Parameters of B view transforms, in relative coordinates.

    Attributes:
        flip: (B,) bool, horizontal flip (applied first).
        zoom: (B,) float32, zoom factor >= 1.
        pad: (B, 2) float32, reflect pad (y, x) as a fraction of the reference height / width.
        offset: (B, 2) float32, crop offset (y, x) as a fraction of the reference height / width.
    """

    flip: torch.Tensor
    zoom: torch.Tensor
    pad: torch.Tensor
    offset: torch.Tensor

    def __len__(self) -> int:
        return int(self.zoom.shape[0])

    def index(self, idx: torch.Tensor | slice | list[int]) -> "Jitter":
        """The transforms at ``idx`` (any 1-D index; repeats allowed)."""
        return Jitter(self.flip[idx], self.zoom[idx], self.pad[idx], self.offset[idx])

    def to(self, device: torch.device | str) -> "Jitter":
        """The same transforms on ``device``."""
        return Jitter(self.flip.to(device), self.zoom.to(device), self.pad.to(device), self.offset.to(device))

    def repeat_interleave(self, n: int) -> "Jitter":
        """Each transform repeated ``n`` times in a row (B -> B*n)."""
        return Jitter(*(t.repeat_interleave(n, dim=0) for t in (self.flip, self.zoom, self.pad, self.offset)))

    @staticmethod
    def cat(items: list["Jitter"]) -> "Jitter":
        """Concatenate along the batch."""
        return Jitter(
            torch.cat([j.flip for j in items]),
            torch.cat([j.zoom for j in items]),
            torch.cat([j.pad for j in items]),
            torch.cat([j.offset for j in items]),
        )

    @staticmethod
    def identity(batch: int, device: torch.device | str | None = None) -> "Jitter":
        """B identity transforms."""
        return Jitter(
            torch.zeros(batch, dtype=torch.bool, device=device),
            torch.ones(batch, device=device),
            torch.zeros(batch, 2, device=device),
            torch.zeros(batch, 2, device=device),
        )


def sample_jitter(
    batch: int,
    size: tuple[int, int],
    cfg: JitterConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Jitter:
    """Draw ``batch`` random transforms for a reference (image) size.

    Args:
        batch: number of transforms.
        size: (H, W) reference size in pixels; pads and offsets are integer pixels of this size, stored relative.
        cfg: jitter ranges (FeatUp's JBU-training values by default).
        generator: CPU torch generator for reproducible draws.
        device: device of the returned tensors.

    Returns:
        A :class:`Jitter` of length ``batch``.
    """
    cfg = cfg or JitterConfig()
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1 or batch < 1:
        raise ValueError(f"sample_jitter: need batch >= 1 and a positive size, got batch={batch}, size={size}")
    if cfg.max_zoom < 1.0 or cfg.max_pad < 0:
        raise ValueError(f"sample_jitter: need max_zoom >= 1 and max_pad >= 0, got {cfg}")
    g = generator
    flip = torch.rand(batch, generator=g) < cfg.flip_p
    do_zoom = torch.rand(batch, generator=g) < cfg.zoom_p
    zoom = 1.0 + torch.rand(batch, generator=g) * (cfg.max_zoom - 1.0)
    zoom = torch.where(do_zoom, zoom, torch.ones_like(zoom))
    pad_px = float(cfg.max_pad)
    span_y = torch.floor((h + 2 * pad_px) * zoom) - h  # integer offset range, as in FeatUp
    span_x = torch.floor((w + 2 * pad_px) * zoom) - w
    off_y = torch.floor(torch.rand(batch, generator=g) * (span_y + 1))
    off_x = torch.floor(torch.rand(batch, generator=g) * (span_x + 1))
    pad = torch.tensor([[pad_px / h, pad_px / w]]).expand(batch, 2).clone()
    offset = torch.stack([off_y / h, off_x / w], dim=1)
    return Jitter(flip, zoom.float(), pad.float(), offset.float()).to(device or "cpu")


def jitter_grid(jitter: Jitter, size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """The ``grid_sample`` grid of the transforms for an output of ``size``.

    Args:
        jitter: B transforms.
        size: (H, W) of the map being transformed (output size = input size).
        device: device of the grid.

    Returns:
        (B, H, W, 2) float32 grid in grid_sample's (x, y) order, align_corners=False convention.
    """
    h, w = int(size[0]), int(size[1])
    j = jitter.to(device) if device is not None else jitter
    uy = (torch.arange(h, device=j.zoom.device, dtype=torch.float32) + 0.5) / h  # (H,)
    ux = (torch.arange(w, device=j.zoom.device, dtype=torch.float32) + 0.5) / w  # (W,)
    z = j.zoom.float()[:, None]
    ys = (uy[None, :] + j.offset[:, 0:1]) / z - j.pad[:, 0:1]  # (B, H) source, relative
    xs = (ux[None, :] + j.offset[:, 1:2]) / z - j.pad[:, 1:2]  # (B, W)
    xs = torch.where(j.flip[:, None], 1.0 - xs, xs)
    b = len(j)
    gy = (2.0 * ys - 1.0)[:, :, None].expand(b, h, w)
    gx = (2.0 * xs - 1.0)[:, None, :].expand(b, h, w)
    return torch.stack([gx, gy], dim=-1)


def apply_jitter(x: torch.Tensor, jitter: Jitter, *, mode: str = "bilinear") -> torch.Tensor:
    """Apply B transforms to a batch of maps of any resolution.

    Args:
        x: (B, C, H, W) float tensor (image or features; any H, W).
        jitter: B transforms from :func:`sample_jitter` (relative coordinates).
        mode: grid_sample interpolation ("bilinear" or "nearest").

    Returns:
        (B, C, H, W), same dtype as ``x``; differentiable in ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_jitter: x must be (B,C,H,W), got shape {tuple(x.shape)}")
    if x.shape[0] != len(jitter):
        raise ValueError(f"apply_jitter: batch of x ({x.shape[0]}) != number of transforms ({len(jitter)})")
    grid = jitter_grid(jitter, (x.shape[-2], x.shape[-1]), device=x.device).to(x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
