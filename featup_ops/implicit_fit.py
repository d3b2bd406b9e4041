"""Fitting FeatUp's implicit upsampler (:class:`featup_ops.implicit.ImplicitUpsampler`): one network per image.

:func:`fit_implicit` fits one network per image with the multi-view loss (:mod:`featup_ops.multiview`) and
returns full-channel features at the requested size; :func:`fit_implicit_functions` returns the fitted networks
themselves (:class:`featup_ops.implicit_function.ImplicitFunctions`). The pieces of one training step (its
geometry, random draws, dense downsample, CUDA graph) are
:mod:`featup_ops.implicit_step`. What makes the fit fast (issue 7):

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
  (cells x pixels) matrix instead of unfolding all channels into k x k patches
  (:func:`featup_ops.implicit_step.attention_downsample`).
- **One CUDA graph per step** on CUDA (``ImplicitConfig.cuda_graph``): every random draw of a step is made
  outside the step into static buffers, so forward, backward and the NAdam update are captured once, after
  :data:`featup_ops.implicit_step.GRAPH_WARMUP_STEPS` eager steps, and replayed; the per-step losses stay on the
  device and are read once per early-stopping window. On the CPU the same step runs eagerly.
- **Progress**: ``fit_implicit(..., progress=fn)`` calls ``fn(step_done, total_steps, active_images)`` after
  every step.
- Presets: ``"paper"`` (FeatUp's 3,000 views, 1,200 steps), ``"fast"`` and ``"lite"`` (``"fast"`` rendered at
  1/4 of the input size while fitting); see :data:`featup_ops.config.IMPLICIT_PRESETS` and
  :data:`featup_ops.config.DEFAULT_IMPLICIT_PRESET`.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import DEFAULT_IMPLICIT_PRESET, ImplicitConfig, implicit_preset
from featup_ops.downsamplers import AttentionDownsampler
from featup_ops.errors import InputSizeError
from featup_ops.implicit import ImplicitUpsampler, amp_autocast, min_max_scale
from featup_ops.implicit_function import ImplicitFunctions, function_layout, pack_networks
from featup_ops.implicit_step import GRAPH_WARMUP_STEPS, StepInputs, attention_downsample, capture_step, step_plan
from featup_ops.jitter import Jitter, apply_jitter, sample_jitter
from featup_ops.losses import UncertaintyHead, blur_pin_loss, gaussian_nll
from featup_ops.pca import principal_components

__all__ = ["ProgressFn", "fit_implicit", "fit_implicit_functions"]

#: ``progress(step_done, total_steps, active_images)``: see :func:`fit_implicit`.
ProgressFn = Callable[[int, int, int], None]


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
    out_size = _check_inputs(images, backbone, output_size)
    t0 = time.perf_counter()
    functions = fit_implicit_functions(images, backbone, cfg=cfg, seed=seed, info=info, progress=progress)
    feats = functions.render(images, out_size)  # rendered per fitting group, as fitted
    if info is not None:
        info["seconds"] = time.perf_counter() - t0
    return feats


def fit_implicit_functions(
    images: torch.Tensor,
    backbone: nn.Module,
    *,
    cfg: ImplicitConfig | str | None = None,
    seed: int = 0,
    info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> ImplicitFunctions:
    """Fit one implicit network per image (:func:`featup_ops.fit_implicit` without the readout).

    Args: as :func:`featup_ops.fit_implicit` (``images`` (N, 3, H, W) normalised, on the device to use).

    Returns:
        :class:`ImplicitFunctions` with ``params`` (N, P) float32 on the CPU, basis over the backbone's C channels;
        ``.render(images, size)`` gives what ``fit_implicit(images, ..., output_size=size)`` returns.
    """
    if cfg is None:
        cfg = implicit_preset(DEFAULT_IMPLICIT_PRESET)
    elif isinstance(cfg, str):
        cfg = implicit_preset(cfg)
    _check_inputs(images, backbone, None)
    t0 = time.perf_counter()
    n = images.shape[0]
    gs = cfg.group_size or n
    n_groups = -(-n // gs)
    packed, hist, mse_hist, steps = [], [], [], []
    k_used, channels, train_size, mode = cfg.proj_dim, 0, (0, 0), "eager"
    for gi, s in enumerate(range(0, n, gs)):
        report = None
        if progress is not None:
            report = lambda done, active, base=gi * cfg.steps: progress(base + done, n_groups * cfg.steps, active)
        net, comp, mean, h1, h2, st, k_used, train_size, mode = _fit_group(images[s : s + gs], backbone, cfg, seed,
                                                                           report)
        channels = int(comp.shape[-1])
        packed.append(pack_networks(net, comp, mean))
        hist += h1
        mse_hist += h2
        steps += st
        del net
    if info is not None:
        info.update(
            seconds=time.perf_counter() - t0, steps=steps, loss_history=hist, mse_history=mse_hist, proj_dim=k_used,
            train_size=train_size, step_mode=mode,
        )
    return ImplicitFunctions(torch.cat(packed), function_layout(cfg, k_used, channels))


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
            with torch.no_grad(), amp_autocast(dev, cfg.amp):
                out.append(backbone(apply_jitter(images[chunk[:, 0].to(dev)], t)).float())
        f = torch.cat(out)
        return f.reshape(g, len(view_ids), *f.shape[1:])

    first = run(torch.arange(n_pca))  # (G, n_pca, C, h, w)
    c = first.shape[2]
    k = min(k, c)
    # per image, every pixel of its first views one sample (float64, exact; cast to float32 below)
    means, comps = zip(*(principal_components(first[i].permute(0, 2, 3, 1).reshape(-1, c), k)[:2] for i in range(g)))
    mean, comp = torch.stack(means).float().to(dev), torch.stack(comps).float().to(dev)  # (G, C), (G, k, C)

    def proj(f: torch.Tensor) -> torch.Tensor:  # (G, V, C, h, w) -> (G, V, k, h, w)
        return torch.einsum("gvchw,gkc->gvkhw", f - mean[:, None, :, None, None], comp)

    parts = [proj(first)]
    del first
    rest = torch.arange(n_pca, n_views)
    step = max(1, cfg.view_batch // max(1, g)) * 8
    for s in range(0, rest.numel(), step):
        parts.append(proj(run(rest[s : s + step])))
    return torch.cat(parts, dim=1), mean, comp


def _tv_per_image(x: torch.Tensor) -> torch.Tensor:
    """(G, C, H, W) -> (G,) FeatUp's TV of each image (``losses.total_variation`` per batch element)."""
    dv = (x[:, :, 1:] - x[:, :, :-1]).pow(2).flatten(1).sum(1)
    dh = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).sum(1)
    return (dv + dh) / x[0].numel()


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
    plan = step_plan(size, int(backbone.stride), cfg, dev)
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
    inputs = StepInputs(net, down, v, plan, dev)
    grid_hw = bank.shape[-2:]

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        """One step's per-image loss (G,) and reconstruction MSE (G,) from the inputs' buffers."""
        mlp_masks, sal_mask, patch_keep = inputs.masks()
        idx = inputs.idx
        jit = views_dev.index(idx)
        jit_all = Jitter.cat([jit] * g)  # group-major: image i's views at [i*v, (i+1)*v)
        with amp_autocast(dev, cfg.amp, cache=False):
            hr = net.render(colour, ys, xs, mlp_masks)  # (G, k, Ht, Wt) float32
        mag = hr.norm(dim=1, keepdim=True)
        hr_views = apply_jitter(torch.cat([mag, hr], 1).repeat_interleave(v, dim=0), jit_all)
        target = bank[:, idx].reshape(g * v, k, *grid_hw)
        with amp_autocast(dev, cfg.amp, cache=False):
            low = attention_downsample(down, hr_views, plan, sal_mask, patch_keep)
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
            graph, static = capture_step(losses, opt, dev, cfg.cuda_graph)
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
