"""Fitted implicit networks as functions: one flat float32 vector per image, rebuilt and rendered at any size.

A per-image implicit network (:class:`featup_ops.implicit.ImplicitUpsampler`) predicts k PCA coefficients of the
backbone's features from Fourier features of pixel coordinates and the image's colour; the image's features are
``components.T @ z + mean``. This module keeps such fitted networks as data:

- :func:`function_layout`: what one image's vector holds, in order: the network's parameters (each group's slice,
  in ``named_parameters`` order), then ``components`` (k, C) and ``mean`` (C,). Its length follows from the
  ``ImplicitConfig``, k and C alone (the Fourier frequencies are constants of the config, not stored).
- :class:`ImplicitFunctions`: N such vectors; :meth:`ImplicitFunctions.render` evaluates them on their images at
  any size with :func:`featup_ops.implicit.render_networks`, the same readout the fit itself returns, and
  :meth:`ImplicitFunctions.project` folds a fixed PCA basis (e.g. a feature store's) into the vectors, so they
  predict the projected channels directly.
- :func:`pack_networks`: fitted networks and their bases as such vectors (what
  :func:`featup_ops.implicit_fit.fit_implicit_functions`, the fit without the readout, returns).

Rendering needs the image (its colour at the output size) as well as the vector. Pure torch: no Ray, no Zarr.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from featup_ops.config import ImplicitConfig
from featup_ops.errors import InputSizeError
from featup_ops.implicit import ImplicitUpsampler, render_networks

__all__ = ["FunctionLayout", "ImplicitFunctions", "function_layout", "pack_networks"]

#: Default images rendered at once by :meth:`ImplicitFunctions.render` when neither the call nor the config says.
RENDER_GROUP = 8


@dataclass(frozen=True)
class FunctionLayout:
    """What one image's flat vector holds.

    Attributes:
        cfg: the ``ImplicitConfig`` the networks were built with.
        k: coefficients the network predicts (the per-image PCA dimension, ``min(cfg.proj_dim, backbone C)``).
        channels: C, the feature channels the vector's basis maps to.
        parts: ``(name, shape)`` per part, in order (network parameters, then ``components``, ``mean``).
    """

    cfg: ImplicitConfig
    k: int
    channels: int
    parts: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        """Floats in one image's vector."""
        return sum(int(torch.Size(shape).numel()) for _, shape in self.parts)


@functools.lru_cache(maxsize=32)
def function_layout(cfg: ImplicitConfig, k: int, channels: int) -> FunctionLayout:
    """The layout of one image's vector for networks of ``cfg`` predicting ``k`` coefficients of ``channels``.

    Raises:
        InputSizeError: k or channels below 1.
    """
    if k < 1 or channels < 1:
        raise InputSizeError(f"implicit function layout: k and channels must be >= 1, got k={k}, channels={channels}")
    net = ImplicitUpsampler(int(k), cfg=cfg, groups=1)
    parts = tuple((name, tuple(p.shape[1:])) for name, p in net.named_parameters())
    return FunctionLayout(cfg, int(k), int(channels), parts + (("components", (int(k), int(channels))),
                                                               ("mean", (int(channels),))))


def pack_networks(net: ImplicitUpsampler, comp: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(G networks, (G, k, C), (G, C)) -> (G, P) float32 on the CPU, in :func:`function_layout` order."""
    g = net.groups
    parts = [p.detach().reshape(g, -1) for p in net.parameters()] + [comp.reshape(g, -1), mean.reshape(g, -1)]
    return torch.cat([p.float().cpu() for p in parts], dim=1)


@dataclass(frozen=True)
class ImplicitFunctions:
    """N fitted implicit networks with their bases, as one ``(N, P)`` float32 tensor.

    Attributes:
        params: ``(N, P)`` float32, P = ``layout.size``; row i is image i's function (any device).
        layout: what a row holds.

    Raises:
        InputSizeError: ``params`` is not ``(N, layout.size)`` (one line naming both).
    """

    params: torch.Tensor
    layout: FunctionLayout

    def __post_init__(self) -> None:
        p = self.params
        if not torch.is_tensor(p) or p.dim() != 2 or p.shape[1] != self.layout.size:
            raise InputSizeError(
                f"implicit functions: params must be (N, {self.layout.size}) for k={self.layout.k}, "
                f"channels={self.layout.channels} and this ImplicitConfig, got {tuple(getattr(p, 'shape', ()))}"
            )

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def networks(self, start: int, stop: int, device: torch.device | str = "cpu") -> tuple[
        ImplicitUpsampler, torch.Tensor, torch.Tensor
    ]:
        """Rows ``[start, stop)`` rebuilt: (G networks in eval mode, components (G, k, C), means (G, C)) on
        ``device``, G = stop - start."""
        rows = self.params[start:stop].to(torch.float32)
        g = int(rows.shape[0])
        lay = self.layout
        net = ImplicitUpsampler(lay.k, cfg=lay.cfg, groups=g)  # built on the CPU and moved, as the fit does
        values: dict[str, torch.Tensor] = {}
        off = 0
        for name, shape in lay.parts:
            n = int(torch.Size(shape).numel())
            values[name] = rows[:, off : off + n].reshape(g, *shape)
            off += n
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(values[name])
        net = net.to(device).eval()
        return net, values["components"].to(device), values["mean"].to(device)

    def render(
        self, images: torch.Tensor, output_size: tuple[int, int], *, group_size: int | None = None
    ) -> torch.Tensor:
        """Evaluate every function on its image.

        Args:
            images: (N, 3, H, W) normalised images (as fitted), one per row; computed on their device.
            output_size: (Ho, Wo), any positive size.
            group_size: networks evaluated as one batched op; default ``cfg.group_size`` (the fit's groups, so
                the fit's own result is reproduced bit for bit), else :data:`RENDER_GROUP`.

        Returns:
            (N, C, Ho, Wo) float32 on the images' device.
        """
        n = len(self)
        if images.dim() != 4 or images.shape[0] != n or images.shape[1] != 3:
            raise InputSizeError(f"implicit functions: images must be ({n},3,H,W), one per function, "
                                 f"got {tuple(images.shape)}")
        ho, wo = (int(s) for s in output_size)
        if ho < 1 or wo < 1:
            raise InputSizeError(f"implicit functions: output_size must be positive, got {output_size}")
        gs = max(1, int(group_size or self.layout.cfg.group_size or RENDER_GROUP))
        out = []
        for s in range(0, n, gs):
            net, comp, mean = self.networks(s, min(n, s + gs), images.device)
            out.append(render_networks(net, comp, mean, images[s : s + gs].float(), (ho, wo)))
        return torch.cat(out)

    def project(self, mean: torch.Tensor, components: torch.Tensor) -> "ImplicitFunctions":
        """Fold a fixed PCA basis into the functions: the result renders ``components @ (f - mean)`` of what these
        render (``featup_ops.pca.apply_pca``), up to float32 rounding.

        Args:
            mean: (C,) the basis mean.
            components: (k', C) its rows.

        Returns:
            Functions over ``k'`` channels (float32, on the CPU).
        """
        lay = self.layout
        comps = torch.as_tensor(components, dtype=torch.float64)
        m = torch.as_tensor(mean, dtype=torch.float64)
        if comps.dim() != 2 or comps.shape[1] != lay.channels or m.shape != (lay.channels,):
            raise InputSizeError(f"implicit functions: a basis over {lay.channels} channels is needed, got mean "
                                 f"{tuple(m.shape)}, components {tuple(comps.shape)}")
        n, c, k = len(self), lay.channels, lay.k
        head = self.params[:, : lay.size - k * c - c].detach().cpu()
        own = self.params[:, lay.size - k * c - c :].detach().cpu().double()
        comp, own_mean = own[:, : k * c].reshape(n, k, c), own[:, k * c :]
        new_comp = comp @ comps.T  # (N, k, k')
        new_mean = (own_mean - m) @ comps.T  # (N, k')
        out = function_layout(lay.cfg, k, int(comps.shape[0]))
        params = torch.cat([head.float(), new_comp.reshape(n, -1).float(), new_mean.float()], dim=1)
        return ImplicitFunctions(params, out)
