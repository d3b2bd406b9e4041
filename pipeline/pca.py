"""A PCA basis over feature channels: fitted once on a sample of images, applied per pixel.

Pure torch/numpy. The basis is stored in the feature store's attributes (``attrs["featup"]["pca"]``) so a reader
can map stored channels back (``f ~= mean + components.T @ p``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PCABasis", "fit_pca", "apply_pca"]

#: Pixels used for fitting at most (a random, seeded subset above this), so fitting stays cheap for big samples.
MAX_FIT_PIXELS: int = 200_000


@dataclass(frozen=True)
class PCABasis:
    """A k-channel PCA basis of C-channel features.

    Attributes:
        mean: ``(C,) float32`` per-channel mean of the fitting pixels.
        components: ``(k, C) float32`` orthonormal rows, by decreasing explained variance; the sign of each row is
            fixed (its largest-magnitude entry is positive) so fitting is deterministic.
        explained: ``(k,) float32`` fraction of total variance each component explains.
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists of floats) for the store attributes."""
        return {
            "k": self.k,
            "mean": [float(v) for v in self.mean],
            "components": [[float(v) for v in row] for row in self.components],
            "explained": [float(v) for v in self.explained],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PCABasis":
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float32),
            components=np.asarray(d["components"], dtype=np.float32),
            explained=np.asarray(d.get("explained", [0.0] * len(d["components"])), dtype=np.float32),
        )


def fit_pca(feats: torch.Tensor, k: int, *, seed: int = 0) -> PCABasis:
    """Fit a k-component PCA over the channels of feature maps, treating every pixel as one sample.

    Args:
        feats: ``(N, C, h, w)`` float features (low-res or high-res).
        k: components to keep, ``1 <= k <= C``.
        seed: seed of the pixel subsample when there are more than :data:`MAX_FIT_PIXELS` pixels.

    Returns:
        The :class:`PCABasis` (computed in float64 via the channel covariance, so it is exact and deterministic).
    """
    n, c, h, w = feats.shape
    if not 1 <= k <= c:
        raise ValueError(f"PCA k must be in [1, {c}] for {c}-channel features, got {k}")
    x = feats.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    if x.shape[0] > MAX_FIT_PIXELS:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:MAX_FIT_PIXELS]]
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:k]
    comps = evecs[:, order].T  # (k, C)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = evals.clamp_min(0).sum().clamp_min(1e-12)
    return PCABasis(
        mean=mean.to(torch.float32).numpy(),
        components=comps.to(torch.float32).contiguous().numpy(),
        explained=(evals[order].clamp_min(0) / total).to(torch.float32).numpy(),
    )


def apply_pca(feats: torch.Tensor, basis: PCABasis) -> torch.Tensor:
    """Project features onto the basis: ``p[b, j, y, x] = sum_c components[j, c] * (f[b, c, y, x] - mean[c])``.

    Args:
        feats: ``(B, C, H, W)`` float features.
        basis: a :class:`PCABasis` fitted on C-channel features.

    Returns:
        ``(B, k, H, W)`` in ``feats``' dtype.
    """
    comps = torch.as_tensor(basis.components, dtype=feats.dtype, device=feats.device)
    mean = torch.as_tensor(basis.mean, dtype=feats.dtype, device=feats.device)
    return torch.einsum("kc,bchw->bkhw", comps, feats - mean.view(1, -1, 1, 1))
