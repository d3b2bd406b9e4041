"""What every upsampler call shares: the guidance image in ImageNet normalisation, and the split of an upsampler into
its low-res preprocessing and the upsampling proper.

The upsampler contract is ``up(lowres (B,C,h,w), image (B,3,H,W), output_size) -> (B,C,H',W')`` with ``image``
normalised with the ImageNet mean/std, as every published upsampler was trained. A backbone may normalise its input
otherwise (CLIP, AugReg ViTs): :func:`guidance_image` converts. Kinds that normalise the features first (FeatUp's
ChannelNorm files, LoftUp) expose ``prepare_lowres`` and ``upsample_prepared``; stores keep the prepared low-res
features (what those upstreams hand their users) and readers upsample them with ``upsample_prepared``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "guidance_image", "split_upsampler"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def guidance_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The backbone's input ``x`` re-normalised with the ImageNet mean/std (``x`` itself when they are equal).

    Args:
        x: (B, 3, H, W) float, ``(pixels/255 - mean) / std``.
        mean, std: the normalisation ``x`` was made with.

    Returns:
        (B, 3, H, W) in x's dtype: ``(pixels/255 - IMAGENET_MEAN) / IMAGENET_STD``.
    """
    if tuple(float(v) for v in mean) == IMAGENET_MEAN and tuple(float(v) for v in std) == IMAGENET_STD:
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    im = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    ist = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * s + m - im) / ist


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def split_upsampler(up: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[..., torch.Tensor]]:
    """``(prepare_lowres, upsample_prepared)`` of an upsampler; ``up(x, g, s) == upsample(prepare(x), g, s)``.

    Kinds without low-res preprocessing give ``(identity, up)``.
    """
    if getattr(up, "lowres_normalized", False):
        return up.prepare_lowres, up.upsample_prepared
    return _identity, up
