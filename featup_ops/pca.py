"""PCA over feature channels, every pixel one sample: one exact, deterministic solver and its uses.

- :func:`principal_components`: the solver (channel covariance in float64, eigendecomposition, components by
  decreasing variance, each one's sign fixed so its largest-magnitude entry is positive).
- :func:`fit_pca` / :class:`PCABasis` / :func:`apply_pca`: a k-channel basis fitted once on a sample of images and
  applied per pixel (the featurize job's ``--pca``; the basis is stored in the feature store's attributes so a reader
  can map stored channels back, ``f ~= mean + components.T @ p``).
- :func:`fit_pca_maps`: one basis over several maps of one image, each map contributing equally (pictures).
- the implicit fit's per-image basis of its view bank (:mod:`featup_ops.implicit_fit`) calls the solver directly.

Pure torch/numpy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PCABasis", "fit_pca", "fit_pca_maps", "apply_pca", "principal_components"]

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
    mean, comps, explained = principal_components(x, k)
    return PCABasis(
        mean=mean.to(torch.float32).numpy(),
        components=comps.to(torch.float32).contiguous().numpy(),
        explained=explained.to(torch.float32).numpy(),
    )


def fit_pca_maps(
    maps: Sequence[torch.Tensor], k: int = 3, *, max_pixels: int = 50_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one PCA basis on the pixels of several feature maps of the same image.

    Args:
        maps: feature maps ``(C, H_i, W_i)`` (any float dtype), same C.
        k: number of components; with fewer than k channels the missing components are zeros.
        max_pixels: pixels used for the fit, drawn evenly from each map (every map contributes equally).

    Returns:
        ``(mean (C,) float64, components (k, C) float64)``.
    """
    if not maps:
        raise ValueError("fit_pca needs at least one feature map")
    chans = {int(m.shape[0]) for m in maps}
    if len(chans) != 1:
        raise ValueError(f"feature maps have different channel counts {sorted(chans)}; PCA needs one feature space")
    per_map = max(max_pixels // len(maps), 1)
    rows = []
    for m in maps:
        x = m.detach().to(torch.float64).reshape(m.shape[0], -1).T  # (HW, C)
        if x.shape[0] > per_map:
            x = x[torch.linspace(0, x.shape[0] - 1, per_map).round().long()]
        rows.append(x)
    x = torch.cat(rows)
    mean, comps, _ = principal_components(x, min(k, x.shape[1]))
    if comps.shape[0] < k:  # fewer channels than components: pad with zeros (grey)
        comps = torch.cat([comps, comps.new_zeros(k - comps.shape[0], comps.shape[1])])
    return mean, comps


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact PCA of samples ``x`` ``(P, C)``: the one solver behind every PCA of this project (also each
    image's basis in the implicit fit, :mod:`featup_ops.implicit_fit`).

    Returns:
        ``(mean (C,), components (k, C), explained (k,))`` float64: components by decreasing variance, each with its
        largest-magnitude entry positive (deterministic); ``explained`` the fraction of total variance of each.
    """
    x = x.to(torch.float64)
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    # the k largest by decreasing variance: eigh's order reversed (also a fixed order among equal eigenvalues)
    comps = evecs.flip(1)[:, :k].T.contiguous()  # (k, C)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = evals.clamp_min(0).sum().clamp_min(1e-12)
    return mean, comps, evals.flip(0)[:k].clamp_min(0) / total


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
