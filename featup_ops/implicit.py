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
- **Early stopping** per image on its reconstruction error (a stopped image keeps its parameters at that step).
- Presets: ``"paper"`` (FeatUp's 3,000 views, 1,200 steps) and ``"fast"`` (the default); see
  :data:`featup_ops.config.IMPLICIT_PRESETS`.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import DEFAULT_IMPLICIT_PRESET, ImplicitConfig, implicit_preset
from featup_ops.downsamplers import AttentionDownsampler, _shared_mask, downsample_strides
from featup_ops.errors import InputSizeError
from featup_ops.jitter import Jitter, apply_jitter, sample_jitter
from featup_ops.losses import UncertaintyHead, blur_pin_loss, gaussian_nll

__all__ = ["ImplicitUpsampler", "fit_implicit", "fit_pca", "min_max_scale"]

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

    def _mlp(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(G, in, P) -> (G, k, P); Dropout2d masks are drawn once and shared by all groups."""
        p = self.cfg.dropout
        drop = self.training and p > 0

        def dropout(t: torch.Tensor) -> torch.Tensor:
            if not drop:
                return t
            return t * (_shared_mask(1, (t.shape[1], 1), 1 - p, generator, t.device) / (1 - p)).to(t.dtype)

        x = dropout(_channel_norm(x, self.norm0_w, self.norm0_b))
        x = torch.relu(torch.baddbmm(self.b1[:, :, None], self.w1, x))
        x = _channel_norm(dropout(x), self.norm1_w, self.norm1_b)
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


def _autocast(device: torch.device, amp: str):
    use = amp == "on" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


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


def fit_implicit(
    images: torch.Tensor,
    backbone: nn.Module,
    *,
    cfg: ImplicitConfig | str | None = None,
    output_size: tuple[int, int] | None = None,
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Fit one implicit network per image and return its features at ``output_size``.

    Args:
        images: (N, 3, H, W) normalised images (H, W multiples of the backbone stride), on the device to use.
        backbone: frozen backbone on the same device, with ``.stride``; ``(B,3,H,W) -> (B,C,H/s,W/s)``.
        cfg: an ``ImplicitConfig`` or a preset name; default the "fast" preset.
        output_size: (Ho, Wo), any positive size (non-square allowed); default (H, W).
        seed: fixes every random draw; an image's result does not depend on the other images in the call.
        info: if given, filled with ``seconds``, ``steps`` (per image), ``loss_history`` (per image, per step
            total loss), ``mse_history`` (per image, per step reconstruction MSE), ``proj_dim``.

    Returns:
        (N, C, Ho, Wo) float32 features (PCA-unprojected to the backbone's C channels).
    """
    if cfg is None:
        cfg = implicit_preset(DEFAULT_IMPLICIT_PRESET)
    elif isinstance(cfg, str):
        cfg = implicit_preset(cfg)
    out_size = _check_inputs(images, backbone, output_size)
    t0 = time.perf_counter()
    n = images.shape[0]
    gs = cfg.group_size or n
    results, hist, mse_hist, steps = [], [], [], []
    k_used = cfg.proj_dim
    for s in range(0, n, gs):
        feats, h1, h2, st, k_used = _fit_group(images[s : s + gs], backbone, cfg, out_size, seed)
        results.append(feats)
        hist += h1
        mse_hist += h2
        steps += st
    if info is not None:
        info.update(
            seconds=time.perf_counter() - t0, steps=steps, loss_history=hist, mse_history=mse_hist, proj_dim=k_used
        )
    return torch.cat(results)


def _fit_group(
    images: torch.Tensor, backbone: nn.Module, cfg: ImplicitConfig, out_size: tuple[int, int], seed: int
) -> tuple[torch.Tensor, list, list, list, int]:
    g = images.shape[0]
    dev = images.device
    size = (int(images.shape[-2]), int(images.shape[-1]))
    stride = int(backbone.stride)
    grid = (size[0] // stride, size[1] // stride)
    kernel = cfg.downsampler_kernel or max(1, 2 * stride - 3)
    downsample_strides(size, grid, kernel)  # fail early, with the reason, if the kernel cannot fit
    gen = torch.Generator().manual_seed(seed)  # views, view choice, init
    gen_dev = torch.Generator(device=dev).manual_seed(seed)  # dropout masks
    images = images.float()

    views = sample_jitter(cfg.n_views, size, cfg.jitter, generator=gen)
    bank, mean, comp = _view_bank(images, backbone, views, cfg, cfg.proj_dim)
    k = bank.shape[2]

    net = ImplicitUpsampler(k, cfg=cfg, groups=g).to(dev)
    down = AttentionDownsampler(k + 1, kernel, cfg=cfg.downsampler, groups=g).to(dev)
    unc = UncertaintyHead(k, cfg=cfg.loss, groups=g).to(dev) if cfg.loss.uncertainty else None
    net.reset_parameters(gen)
    down.reset_parameters(gen)
    if unc is not None:
        unc.reset_parameters(gen)
    params = [*net.parameters(), *down.parameters(), *(unc.parameters() if unc is not None else [])]
    opt = torch.optim.NAdam(params, lr=cfg.lr)
    lc = cfg.loss
    v = cfg.views_per_step
    views_dev = views.to(dev)

    active = torch.ones(g, dtype=torch.bool)
    stopped_at = [cfg.steps] * g
    snapshot: dict[int, list[torch.Tensor]] = {}
    best = [math.inf] * g
    bad = [0] * g
    window: list[torch.Tensor] = []
    loss_hist: list[list[float]] = [[] for _ in range(g)]
    mse_hist: list[list[float]] = [[] for _ in range(g)]
    net.train()
    down.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(views), (v,), generator=gen)
        jit = views_dev.index(idx.to(dev))
        jit_all = Jitter.cat([jit] * g)  # group-major: image i's views at [i*v, (i+1)*v)
        with _autocast(dev, cfg.amp):
            hr = net(images, generator=gen_dev)
        hr = hr.float()  # (G, k, H, W)
        mag = hr.norm(dim=1, keepdim=True)
        hr_views = apply_jitter(torch.cat([mag, hr], 1).repeat_interleave(v, dim=0), jit_all)
        target = bank[:, idx.to(dev)].reshape(g * v, k, *bank.shape[-2:])
        with _autocast(dev, cfg.amp):
            low = down(hr_views, grid, generator=gen_dev)
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
        opt.zero_grad(set_to_none=True)
        per.sum().backward()  # a sum: each image's gradients are those of its own fit
        opt.step()
        with torch.no_grad():
            mse = (low[:, 1:].detach() - target).pow(2).reshape(g, -1).mean(1).cpu()
        per_c = per.detach().cpu()
        for i in range(g):
            if active[i]:
                loss_hist[i].append(float(per_c[i]))
                mse_hist[i].append(float(mse[i]))
        if not cfg.early_stop:
            continue
        window.append(mse)
        if len(window) < cfg.early_stop_window:
            continue
        cur = torch.stack(window).mean(0)
        window = []
        for i in range(g):
            if not active[i]:
                continue
            c = float(cur[i])
            if best[i] - c < cfg.early_stop_tol * best[i]:
                bad[i] += 1
            else:
                bad[i] = 0
            best[i] = min(best[i], c)
            if bad[i] >= cfg.early_stop_patience:
                active[i] = False
                stopped_at[i] = step + 1
                snapshot[i] = [p.detach()[i].clone() for p in net.parameters()]
        if not bool(active.any()):
            break
    with torch.no_grad():
        for i, saved in snapshot.items():
            for p, s in zip(net.parameters(), saved):
                p[i].copy_(s)
        net.eval()
        with _autocast(dev, cfg.amp):
            z = net(images, out_size)  # (G, k, Ho, Wo)
        feats = torch.einsum("gkhw,gkc->gchw", z.float(), comp) + mean[:, :, None, None]
    return feats.float(), loss_hist, mse_hist, stopped_at, k
