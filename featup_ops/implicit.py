"""FeatUp's implicit upsampler: a small per-image MLP on Fourier features of pixel coordinates and colour.

The network (method notes 2) maps every pixel's (y, x, r, g, b), min-max scaled, through learned-phase Fourier
features ``[sin(w v + b_s), cos(w v + b_c), colour]`` (w = exp(linspace(-2, 10, 30)): 303 channels) and
``ChannelNorm -> Dropout2d -> 1x1(303->128) -> ReLU -> Dropout2d -> ChannelNorm -> 1x1(128->128) -> ReLU ->
1x1(128->k)`` to k PCA channels of the backbone's features. Its inputs are coordinates plus colour, so it can be
evaluated at any (H, W), square or not.

:func:`fit_implicit` fits one network per image with the multi-view loss (:mod:`featup_ops.multiview`) and
returns full-channel features at the requested size. What makes it fast (issue 7):

- **Grouped fit.** N images are fitted at once as N independent networks whose layers run as one batched matmul
  (``torch.bmm`` over groups); downsampler and uncertainty head are grouped too. Losses are summed per image, so
  each group's gradients equal those of a separate fit, and every random draw (init, views, dropout masks) is
  made once and shared by all images: ``fit_implicit(stack([a, b]))`` equals ``[fit_implicit(a), fit_implicit(b)]``
  up to float rounding, and a row's result does not depend on its batch.
- **View bank once per image**, in large backbone batches across all images of the call, compressed to
  ``proj_dim`` PCA channels right away.
- **bfloat16 autocast on CUDA** (``amp="auto"``) for the backbone and the MLP; losses stay float32.
- **Early stopping** per image on its reconstruction error (a stopped image keeps its parameters at that step;
  the group goes on with fixed shapes, and the stopped image's parameters are restored at the end).
- **Lower training resolution** (``ImplicitConfig.train_scale``, issue 15): the networks are rendered at a
  fraction of the input size while fitting (the downsampler's kernel follows the scaled stride) and at the
  requested size for the result; the MLP, jitter and downsampler costs fall with the square of the scale.
- **Dense attention downsample**: the attention downsampler's softmax weights are applied as one ``bmm`` with a
  (cells x pixels) matrix instead of unfolding all channels into k x k patches (:func:`_attention_downsample`).
- **One CUDA graph per step** on CUDA (``ImplicitConfig.cuda_graph``): every random draw of a step is made
  outside the step into static buffers, so forward, backward and the NAdam update are captured once, after
  :data:`GRAPH_WARMUP_STEPS` eager steps, and replayed; the per-step losses stay on the device and are read once
  per early-stopping window. On the CPU the same step runs eagerly.
- **Progress**: ``fit_implicit(..., progress=fn)`` calls ``fn(step_done, total_steps, active_images)`` after
  every step.
- Presets: ``"paper"`` (FeatUp's 3,000 views, 1,200 steps), ``"fast"`` and ``"lite"`` (``"fast"`` rendered at
  1/4 of the input size while fitting); see :data:`featup_ops.config.IMPLICIT_PRESETS` and
  :data:`featup_ops.config.DEFAULT_IMPLICIT_PRESET`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import ImplicitConfig
from featup_ops.downsamplers import AttentionDownsampler, _shared_mask, downsample_strides
from featup_ops.errors import InputSizeError
from featup_ops.jitter import Jitter, apply_jitter, sample_jitter
from featup_ops.losses import UncertaintyHead, blur_pin_loss, gaussian_blur, gaussian_nll

__all__ = ["ImplicitUpsampler", "fit_implicit", "fit_pca", "min_max_scale", "render_networks"]

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


def fit_pca(feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact, deterministic PCA of feature maps (covariance eigendecomposition in float64).

    Args:
        feats: (V, C, h, w) maps of one image.
        k: components (at most C).

    Returns:
        (mean (C,), components (k, C)) float32; each component's largest-magnitude entry is positive.
    """
    c = feats.shape[1]
    x = feats.permute(0, 2, 3, 1).reshape(-1, c).double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending
    comps = vecs[:, -k:].flip(1).T  # (k, C)
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return mean.float(), comps.float()


def _tv_per_image(x: torch.Tensor) -> torch.Tensor:
    """(G, C, H, W) -> (G,) FeatUp's TV of each image (``losses.total_variation`` per batch element)."""
    dv = (x[:, :, 1:] - x[:, :, :-1]).pow(2).flatten(1).sum(1)
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).sum(1)
    return (dv + dh) / x[0].numel()


def _autocast(device: torch.device, amp: str, cache: bool = True):
    """bfloat16 autocast per ``ImplicitConfig.amp``; ``cache=False`` inside a step that may be a CUDA graph."""
    use = amp == "on" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use, cache_enabled=cache)


def _view_bank(
    images: torch.Tensor, backbone: nn.Module, views: Jitter, cfg: ImplicitConfig, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backbone features of every view of every image, PCA-compressed per image.

    Returns:
        bank (G, V, k, h, w) float32, means (G, C), components (G, k, C).
    """
    g = images.shape[0]
    n_views = len(views)
    dev = images.device
    n_pca = min(cfg.pca_views, n_views)

    def run(view_ids: torch.Tensor) -> torch.Tensor:
        """Features of views ``view_ids`` of all images: (G, len, C, h, w), batches across images."""
        pairs = torch.stack(torch.meshgrid(torch.arange(g), view_ids, indexing="ij"), -1).reshape(-1, 2)
        out = []
        for s in range(0, pairs.shape[0], cfg.view_batch):
            chunk = pairs[s : s + cfg.view_batch]
            t = views.index(chunk[:, 1].to(views.zoom.device)).to(dev)
            with torch.no_grad(), _autocast(dev, cfg.amp):
                out.append(backbone(apply_jitter(images[chunk[:, 0].to(dev)], t)).float())
        f = torch.cat(out)
        return f.reshape(g, len(view_ids), *f.shape[1:])

    first = run(torch.arange(n_pca))  # (G, n_pca, C, h, w)
    c = first.shape[2]
    k = min(k, c)
    means, comps = zip(*(fit_pca(first[i], k) for i in range(g)))
    mean, comp = torch.stack(means).to(dev), torch.stack(comps).to(dev)  # (G, C), (G, k, C)

    def proj(f: torch.Tensor) -> torch.Tensor:  # (G, V, C, h, w) -> (G, V, k, h, w)
        return torch.einsum("gvchw,gkc->gvkhw", f - mean[:, None, :, None, None], comp)

    parts = [proj(first)]
    del first
    rest = torch.arange(n_pca, n_views)
    step = max(1, cfg.view_batch // max(1, g)) * 8
    for s in range(0, rest.numel(), step):
        parts.append(proj(run(rest[s : s + step])))
    return torch.cat(parts, dim=1), mean, comp


def _check_inputs(images: torch.Tensor, backbone: nn.Module, output_size) -> tuple[int, int]:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise InputSizeError(f"fit_implicit: images must be (N,3,H,W) with N >= 1, got {getattr(images, 'shape', None)}")
    stride = int(getattr(backbone, "stride", 0) or 0)
    if stride < 1:
        raise InputSizeError("fit_implicit: backbone needs an integer .stride (see featup_ops.load_backbone)")
    h, w = images.shape[-2:]
    if h % stride or w % stride:
        raise InputSizeError(
            f"fit_implicit: image size {(h, w)} is not a multiple of the backbone stride {stride}; resize or crop"
        )
    if output_size is None:
        return int(h), int(w)
    out = (int(output_size[0]), int(output_size[1]))
    if out[0] < 1 or out[1] < 1:
        raise InputSizeError(f"fit_implicit: output_size must be positive, got {output_size}")
    return out


#: ``progress(step_done, total_steps, active_images)``: see :func:`fit_implicit`.
ProgressFn = Callable[[int, int, int], None]

#: Eager steps run (on a side stream) before the training step is captured as a CUDA graph: the optimizer's
#: state and autograd's buffers must exist before capture (PyTorch's whole-network capture recipe).
GRAPH_WARMUP_STEPS = 3


def fit_implicit(
    images: torch.Tensor,
    backbone: nn.Module,
    *,
    cfg: ImplicitConfig | str | None = None,
    output_size: tuple[int, int] | None = None,
    seed: int = 0,
    info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Fit one implicit network per image and return its features at ``output_size``.

    Args:
        images: (N, 3, H, W) normalised images (H, W multiples of the backbone stride), on the device to use.
        backbone: frozen backbone on the same device, with ``.stride``; ``(B,3,H,W) -> (B,C,H/s,W/s)``.
        cfg: an ``ImplicitConfig`` or a preset name; default the preset named by ``DEFAULT_IMPLICIT_PRESET``.
        output_size: (Ho, Wo), any positive size (non-square allowed); default (H, W).
        seed: fixes every random draw; an image's result does not depend on the other images in the call.
        info: if given, filled with ``seconds``, ``steps`` (per image), ``loss_history`` (per image, per step
            total loss), ``mse_history`` (per image, per step reconstruction MSE), ``proj_dim``, ``train_size``
            (the size the networks are rendered at while fitting) and ``step_mode`` ("eager" or "cuda_graph"; per
            group, the last group's).
        progress: called after every optimisation step as ``progress(step_done, total_steps, active_images)``:
            ``total_steps`` = groups x ``cfg.steps``; ``step_done`` counts steps of the groups before the
            current one as complete (so it jumps when a group stops early) and only increases; ``active_images``
            = images of the current group not yet stopped early. Cheap (no device sync of its own).

    Returns:
        (N, C, Ho, Wo) float32 features (PCA-unprojected to the backbone's C channels).
    """
    from featup_ops.implicit_function import fit_implicit_functions  # that module builds on this one

    out_size = _check_inputs(images, backbone, output_size)
    t0 = time.perf_counter()
    functions = fit_implicit_functions(images, backbone, cfg=cfg, seed=seed, info=info, progress=progress)
    feats = functions.render(images, out_size)  # rendered per fitting group, as fitted
    if info is not None:
        info["seconds"] = time.perf_counter() - t0
    return feats


@dataclass(frozen=True)
class _StepPlan:
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


def _step_plan(size: tuple[int, int], stride: int, cfg: ImplicitConfig, device: torch.device) -> _StepPlan:
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
    return _StepPlan(train, grid, kernel, crop, taps.to(device))


def _attention_downsample(
    down: AttentionDownsampler,
    x: torch.Tensor,
    plan: _StepPlan,
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


class _StepInputs:
    """The random draws of one training step, in static buffers (the CUDA graph reads them in place).

    Attributes:
        idx: (V,) int64 on the device: the bank views of this step (shared by all images).
        uniforms: U[0, 1) draws for the dropout masks, in this order (each only if that dropout is on):
            MLP input (1, in, 1), MLP hidden (1, hidden, 1), downsampler saliency (V, k+1, hu, wu), downsampler
            patches (V, 1, h*w). Drawn from the device generator in the order the modules themselves draw.
    """

    def __init__(self, net: ImplicitUpsampler, down: AttentionDownsampler, v: int, plan: _StepPlan,
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


def _fit_group(
    images: torch.Tensor,
    backbone: nn.Module,
    cfg: ImplicitConfig,
    seed: int,
    report: Callable[[int, int], None] | None,
) -> tuple[ImplicitUpsampler, torch.Tensor, torch.Tensor, list, list, list, int, tuple[int, int], str]:
    """Fit one group of G images; returns (the G networks in eval mode, PCA components (G, k, C), means (G, C),
    loss histories, MSE histories, steps per image, k, train size, step mode); :func:`render_networks` reads
    them out."""
    g = images.shape[0]
    dev = images.device
    size = (int(images.shape[-2]), int(images.shape[-1]))
    plan = _step_plan(size, int(backbone.stride), cfg, dev)
    gen = torch.Generator().manual_seed(seed)  # views, view choice, init
    gen_dev = torch.Generator(device=dev).manual_seed(seed)  # dropout masks
    images = images.float()

    views = sample_jitter(cfg.n_views, size, cfg.jitter, generator=gen)
    bank, mean, comp = _view_bank(images, backbone, views, cfg, cfg.proj_dim)
    k = bank.shape[2]

    net = ImplicitUpsampler(k, cfg=cfg, groups=g).to(dev)
    down = AttentionDownsampler(k + 1, plan.kernel, cfg=cfg.downsampler, groups=g).to(dev)
    unc = UncertaintyHead(k, cfg=cfg.loss, groups=g).to(dev) if cfg.loss.uncertainty else None
    net.reset_parameters(gen)
    down.reset_parameters(gen)
    if unc is not None:
        unc.reset_parameters(gen)
    params = [*net.parameters(), *down.parameters(), *(unc.parameters() if unc is not None else [])]
    use_graph = dev.type == "cuda" and cfg.cuda_graph != "off" and cfg.steps > GRAPH_WARMUP_STEPS
    opt = torch.optim.NAdam(params, lr=cfg.lr, capturable=use_graph)
    lc = cfg.loss
    v = cfg.views_per_step
    views_dev = views.to(dev)
    # constant inputs of the render: colour at the training size and the coordinates
    colour = min_max_scale(images)
    if plan.train_size != size:
        colour = F.interpolate(colour, size=plan.train_size, mode="bilinear", align_corners=False)
    ys = torch.linspace(-1.0, 1.0, plan.train_size[0], device=dev)
    xs = torch.linspace(-1.0, 1.0, plan.train_size[1], device=dev)
    inputs = _StepInputs(net, down, v, plan, dev)
    grid_hw = bank.shape[-2:]

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        """One step's per-image loss (G,) and reconstruction MSE (G,) from the inputs' buffers."""
        mlp_masks, sal_mask, patch_keep = inputs.masks()
        idx = inputs.idx
        jit = views_dev.index(idx)
        jit_all = Jitter.cat([jit] * g)  # group-major: image i's views at [i*v, (i+1)*v)
        with _autocast(dev, cfg.amp, cache=False):
            hr = net.render(colour, ys, xs, mlp_masks)  # (G, k, Ht, Wt) float32
        mag = hr.norm(dim=1, keepdim=True)
        hr_views = apply_jitter(torch.cat([mag, hr], 1).repeat_interleave(v, dim=0), jit_all)
        target = bank[:, idx].reshape(g * v, k, *grid_hw)
        with _autocast(dev, cfg.amp, cache=False):
            low = _attention_downsample(down, hr_views, plan, sal_mask, patch_keep)
        low = low.float()
        scale = unc(target) if unc is not None else None
        rec = gaussian_nll(low[:, 1:], target, scale, reduce=False).reshape(g, v).mean(1)  # (G,)
        per = lc.rec_weight * rec
        if lc.magnitude_weight > 0:
            m = (low[:, :1] - target.norm(dim=1, keepdim=True)).pow(2).reshape(g, -1).mean(1)
            per = per + lc.magnitude_weight * m
        if lc.magnitude_tv_weight > 0:
            per = per + lc.magnitude_tv_weight * _tv_per_image(mag)
        if lc.blur_pin_weight > 0:
            # one image at a time: a batch-1 conv rounds exactly as in a separate fit (NAdam amplifies rounding)
            pin = torch.stack([blur_pin_loss(hr[i : i + 1], lc.blur_kernel, lc.blur_sigma) for i in range(g)])
            per = per + lc.blur_pin_weight * pin
        mse = (low[:, 1:].detach() - target).pow(2).reshape(g, -1).mean(1)
        return per, mse

    def eager_step() -> tuple[torch.Tensor, torch.Tensor]:
        per, mse = losses()
        opt.zero_grad(set_to_none=True)
        per.sum().backward()  # a sum: each image's gradients are those of its own fit
        opt.step()
        return per.detach(), mse

    loss_buf = torch.zeros(cfg.steps, g, device=dev)
    mse_buf = torch.zeros(cfg.steps, g, device=dev)
    active = [True] * g
    stopped_at = [cfg.steps] * g
    snapshot: dict[int, list[torch.Tensor]] = {}
    best = [math.inf] * g
    bad = [0] * g
    window_start = 0
    graph: torch.cuda.CUDAGraph | None = None
    static: tuple[torch.Tensor, torch.Tensor] | None = None
    side = torch.cuda.Stream(device=dev) if use_graph else None
    mode = "eager"
    net.train()
    down.train()
    for step in range(cfg.steps):
        inputs.draw(gen, gen_dev, len(views))
        if graph is not None:
            graph.replay()
            per, mse = static
        elif side is not None and step < GRAPH_WARMUP_STEPS:
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                per, mse = eager_step()
            torch.cuda.current_stream(dev).wait_stream(side)
        else:
            per, mse = eager_step()
        loss_buf[step].copy_(per)
        mse_buf[step].copy_(mse)
        if side is not None and graph is None and step == GRAPH_WARMUP_STEPS - 1:
            graph, static = _capture(losses, opt, dev, cfg.cuda_graph)
            side = None
            if graph is not None:
                mode = "cuda_graph"
        stop_now = cfg.early_stop and step + 1 - window_start >= cfg.early_stop_window
        if stop_now:
            cur = mse_buf[window_start : step + 1].mean(0).tolist()  # the one sync per window
            window_start = step + 1
            for i in range(g):
                if not active[i]:
                    continue
                if best[i] - cur[i] < cfg.early_stop_tol * best[i]:
                    bad[i] += 1
                else:
                    bad[i] = 0
                best[i] = min(best[i], cur[i])
                if bad[i] >= cfg.early_stop_patience:
                    active[i] = False
                    stopped_at[i] = step + 1
                    snapshot[i] = [p.detach()[i].clone() for p in net.parameters()]
        if report is not None:
            report(step + 1, sum(active))
        if stop_now and not any(active):
            break
    loss_cpu, mse_cpu = loss_buf.cpu(), mse_buf.cpu()
    loss_hist = [loss_cpu[: stopped_at[i], i].tolist() for i in range(g)]
    mse_hist = [mse_cpu[: stopped_at[i], i].tolist() for i in range(g)]
    del graph, static
    with torch.no_grad():
        for i, saved in snapshot.items():
            for p, s in zip(net.parameters(), saved):
                p[i].copy_(s)
    net.eval()
    return net, comp, mean, loss_hist, mse_hist, stopped_at, k, plan.train_size, mode


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
        with _autocast(images.device, net.cfg.amp):
            z = net(images, output_size)  # (G, k, Ho, Wo)
        feats = torch.einsum("gkhw,gkc->gchw", z.float(), comp) + mean[:, :, None, None]
    return feats.float()


def _capture(
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
