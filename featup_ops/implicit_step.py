"""One training step of the implicit fit (:mod:`featup_ops.implicit_fit`): its fixed geometry, its random draws in
static buffers, the dense attention downsample, and the capture of the whole step as one CUDA graph.

- :func:`step_plan` / :class:`StepPlan`: the render size, the backbone grid and the downsampler's kernel and taps,
  fixed for a whole fit (``ImplicitConfig.train_scale`` renders the networks at a fraction of the input size).
- :class:`StepInputs`: every random draw of a step (the views, the dropout masks) made outside the step into static
  buffers, so a captured graph reads them in place.
- :func:`attention_downsample`: ``AttentionDownsampler.forward`` with those masks, its softmax weights applied as one
  ``bmm`` with a (cells x pixels) matrix instead of unfolding all channels into k x k patches.
- :func:`capture_step`: forward, backward and the NAdam update captured once, after :data:`GRAPH_WARMUP_STEPS`
  eager steps, and replayed (``ImplicitConfig.cuda_graph``).

Pure torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from featup_ops.config import ImplicitConfig
from featup_ops.downsamplers import AttentionDownsampler, downsample_strides
from featup_ops.implicit import ImplicitUpsampler
from featup_ops.losses import gaussian_blur

__all__ = ["GRAPH_WARMUP_STEPS", "StepInputs", "StepPlan", "attention_downsample", "capture_step", "step_plan"]

#: Eager steps run (on a side stream) before the training step is captured as a CUDA graph: the optimizer's
#: state and autograd's buffers must exist before capture (PyTorch's whole-network capture recipe).
GRAPH_WARMUP_STEPS = 3


@dataclass(frozen=True)
class StepPlan:
    """Geometry of one training step, fixed for a whole fit.

    Attributes:
        train_size: (Ht, Wt) the networks are rendered at while fitting.
        grid: (h, w) the backbone's grid.
        kernel: the attention downsampler's kernel k.
        crop: (hu, wu) top-left part of the rendered map the downsampler reads.
        taps: (h*w, k*k) int64, flat index into the (hu*wu) crop of tap p of cell l (``F.unfold``'s order).
    """

    train_size: tuple[int, int]
    grid: tuple[int, int]
    kernel: int
    crop: tuple[int, int]
    taps: torch.Tensor


def step_plan(size: tuple[int, int], stride: int, cfg: ImplicitConfig, device: torch.device) -> StepPlan:
    """The training-step geometry of ``size`` inputs at backbone ``stride`` (one-line error if it cannot fit)."""
    grid = (size[0] // stride, size[1] // stride)
    if not 0 < cfg.train_scale <= 1:
        raise ValueError(f"fit_implicit: train_scale must be in (0, 1], got {cfg.train_scale}")
    train = (max(1, round(size[0] * cfg.train_scale)), max(1, round(size[1] * cfg.train_scale)))
    kernel = cfg.downsampler_kernel or max(1, 2 * max(1, round(stride * cfg.train_scale)) - 3)
    sy, sx = downsample_strides(train, grid, kernel)  # fail early, with the reason, if the kernel cannot fit
    crop = ((grid[0] - 1) * sy + kernel, (grid[1] - 1) * sx + kernel)
    rows = (torch.arange(grid[0]) * sy)[:, None, None, None] + torch.arange(kernel)[None, None, :, None]
    cols = (torch.arange(grid[1]) * sx)[None, :, None, None] + torch.arange(kernel)[None, None, None, :]
    taps = (rows * crop[1] + cols).reshape(grid[0] * grid[1], kernel * kernel)
    return StepPlan(train, grid, kernel, crop, taps.to(device))


def attention_downsample(
    down: AttentionDownsampler,
    x: torch.Tensor,
    plan: StepPlan,
    saliency_mask: torch.Tensor | None,
    patch_keep: torch.Tensor | None,
) -> torch.Tensor:
    """``AttentionDownsampler.forward`` with caller-drawn dropout masks, contracted as one dense matmul.

    The same function of the same parameters (equal up to float rounding; ``tests/test_implicit.py``), but each
    cell's softmax weights are scattered into a (cells, hu*wu) matrix and applied with ``bmm`` instead of
    unfolding all C channels into (C, k*k, cells) patches: on a 128 px fit the unfold and its backward were half
    of a step's CPU time; on a GPU it also bounds memory (no C x k^2 x cells copy).

    Args:
        down: the grouped attention downsampler (its parameters; ``in_dim`` = C).
        x: (B, C, H, W) jittered rendered maps, B = groups * V (group-major).
        plan: the step geometry (``plan.train_size`` = (H, W)).
        saliency_mask: (V, C, hu, wu) saliency-dropout multiplier (keep-mask / keep), or None.
        patch_keep: (V, 1, h*w) patch-dropout keep mask (0/1), or None.

    Returns:
        (B, C, h, w), x's dtype.
    """
    bsz, c = x.shape[:2]
    g = down.groups
    v = bsz // g
    (h, w), (hu, wu) = plan.grid, plan.crop
    cells, taps = plan.taps.shape
    if down.cfg.blur_input:
        x = gaussian_blur(x, down.cfg.blur_kernel, down.cfg.blur_sigma)
    x = x[..., :hu, :wu].reshape(g, v, c, hu * wu)
    xin = x if saliency_mask is None else x * saliency_mask.reshape(1, v, c, hu * wu).to(x.dtype)
    sal = torch.einsum("gvcp,gc->gvp", xin, down.saliency_weight.to(x.dtype))
    sal = sal + down.saliency_bias.to(x.dtype)[:, None, None]  # (G, V, hu*wu)
    logits = sal[:, :, plan.taps]  # (G, V, cells, taps)
    if patch_keep is not None:
        logits = logits * patch_keep.reshape(1, v, cells, 1).to(logits.dtype)
    logits = logits * down.w.to(logits.dtype)[:, None, None, :] + down.b.to(logits.dtype)[:, None, None, :]
    attn = torch.softmax(logits.float(), dim=-1).to(x.dtype).reshape(bsz, cells, taps)
    dense = x.new_zeros(bsz, cells, hu * wu).scatter(2, plan.taps[None].expand(bsz, cells, taps), attn)
    out = torch.bmm(x.reshape(bsz, c, hu * wu), dense.transpose(1, 2))  # (B, C, cells)
    return out.reshape(bsz, c, h, w)


class StepInputs:
    """The random draws of one training step, in static buffers (the CUDA graph reads them in place).

    Attributes:
        idx: (V,) int64 on the device: the bank views of this step (shared by all images).
        uniforms: U[0, 1) draws for the dropout masks, in this order (each only if that dropout is on):
            MLP input (1, in, 1), MLP hidden (1, hidden, 1), downsampler saliency (V, k+1, hu, wu), downsampler
            patches (V, 1, h*w). Drawn from the device generator in the order the modules themselves draw.
    """

    def __init__(self, net: ImplicitUpsampler, down: AttentionDownsampler, v: int, plan: StepPlan,
                 device: torch.device) -> None:
        cfg, dcfg = net.cfg, down.cfg
        self.idx = torch.zeros(v, dtype=torch.int64, device=device)
        self.keeps: list[float] = []
        shapes: list[tuple[int, ...]] = []
        if cfg.dropout > 0:
            shapes += [(1, cfg.in_channels, 1), (1, cfg.hidden_dim, 1)]
            self.keeps += [1 - cfg.dropout] * 2
        self.mlp = cfg.dropout > 0
        self.saliency = dcfg.saliency_dropout > 0
        if self.saliency:
            shapes.append((v, down.in_dim, *plan.crop))
            self.keeps.append(1 - dcfg.saliency_dropout)
        self.patch = dcfg.patch_dropout > 0
        if self.patch:
            shapes.append((v, 1, plan.grid[0] * plan.grid[1]))
            self.keeps.append(1 - dcfg.patch_dropout)
        self.uniforms = [torch.empty(s, device=device) for s in shapes]

    def draw(self, gen: torch.Generator, gen_dev: torch.Generator, n_views: int) -> None:
        """Fill the buffers with the next step's draws (view choice from ``gen``, masks from ``gen_dev``)."""
        self.idx.copy_(torch.randint(0, n_views, (self.idx.numel(),), generator=gen))
        for u in self.uniforms:
            torch.rand(u.shape, generator=gen_dev, out=u)

    def masks(self) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None, torch.Tensor | None]:
        """(MLP multipliers or None, saliency multiplier or None, patch keep-mask or None) from the buffers."""
        made = [(u < keep).float() for u, keep in zip(self.uniforms, self.keeps)]
        mlp = None
        if self.mlp:
            mlp = (made[0] / self.keeps[0], made[1] / self.keeps[1])
            made, keeps = made[2:], self.keeps[2:]
        else:
            keeps = self.keeps
        sal = patch = None
        if self.saliency:
            sal = made[0] / keeps[0]
            made = made[1:]
        if self.patch:
            patch = made[0]
        return mlp, sal, patch


def capture_step(
    losses: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    opt: torch.optim.Optimizer,
    dev: torch.device,
    setting: str,
) -> tuple[torch.cuda.CUDAGraph | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Capture forward, backward and optimizer step as one CUDA graph (after the eager warm-up steps).

    Returns (graph, (static per-image loss, static MSE)); replaying the graph runs one step on whatever the step
    inputs' buffers hold. A failed capture gives (None, None) with ``setting == "auto"`` (the fit goes on
    eagerly) and raises a one-line ``RuntimeError`` with ``"on"``.
    """
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    try:
        with torch.cuda.graph(graph):
            per, mse = losses()
            per.sum().backward()
            opt.step()
    except Exception as e:  # noqa: BLE001 - any capture failure falls back (or is reported in one line)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        if setting == "on":
            raise RuntimeError(f"fit_implicit: CUDA graph capture of the training step failed: {e}") from None
        warnings.warn(f"fit_implicit: CUDA graph capture failed ({type(e).__name__}: {e}); fitting eagerly")
        return None, None
    return graph, (per.detach(), mse)
