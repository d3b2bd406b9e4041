"""The multi-view objective shared by JBU training and implicit fitting, and a fair validation error.

FeatUp's idea (method notes 4): a good high-res map F of image x, jittered by a random transform t and brought
back to the backbone's grid by a learned downsampler, must reproduce the backbone's features of the jittered
image: ``down(t(F)) ~ f(t(x))``, scored by a Gaussian NLL with a learned per-pixel scale.

**Cheap training by projection** (docs/design.md, "Training by projection"). In FeatUp, features are projected to 30 random dimensions only
inside the loss, after upsampling all C channels. A channel-agnostic upsampler (one kernel for all channels, as the
JBU stack without its final channel mix) commutes with any linear map of the channels, ``up(P f) = P up(f)``, so
:class:`MultiViewObjective` projects the low-res features *first* (a new Gaussian projection with unit rows per
jitter) and upsamples only k channels: C/k times less work. The attention downsampler's saliency, a linear map of
the features, rides along as one extra projected row, so it is exact too. Upsamplers with channel mixing are run on
all C channels and projected afterwards, as FeatUp does.

API for trainers (e.g. Ray Train workers)::

    objective = MultiViewObjective.from_train_config(backbone.dim, backbone.stride, train_cfg)
    opt = torch.optim.NAdam([*upsampler.parameters(), *objective.parameters()], lr=train_cfg.lr)
    loss, metrics = objective.loss(upsampler, images, backbone, generator=g, backward=True)
    opt.step()

For validation, :func:`reconstruction_error` scores *any* high-res map (JBU, bilateral, bilinear, implicit) on the
same fixed views (:func:`fixed_views`) with a fixed, non-learned downsampler, so figures compare fairly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.config import DownsamplerConfig, JitterConfig, LossConfig, TrainConfig
from featup_ops.downsamplers import AttentionDownsampler, BlurDownsampler, build_downsampler
from featup_ops.errors import InputSizeError
from featup_ops.guidance import IMAGENET_MEAN, IMAGENET_STD, guidance_image
from featup_ops.jitter import Jitter, apply_jitter, sample_jitter
from featup_ops.losses import UncertaintyHead, crf_loss, gaussian_nll, total_variation

__all__ = [
    "MultiViewObjective",
    "random_projection",
    "project",
    "reconstruction_terms",
    "fixed_views",
    "reconstruction_error",
    "HiresFn",
]

#: ``hires_fn(lowres (B,k,h,w), image (B,3,H,W)) -> (B,k,H',W')``: an upsampler's call, e.g. a JBUUpsampler.
HiresFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_projection(
    batch: int,
    dim: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian random projections with unit-norm rows (FeatUp: columns of (B, C, k) normalised over C).

    Args:
        batch: one projection per sample.
        dim: input channels C.
        k: output channels.
        generator: CPU generator.

    Returns:
        (B, k, C) float tensor.
    """
    p = torch.randn(batch, k, dim, generator=generator)
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return p.to(device=device, dtype=dtype)


def project(feats: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Apply per-sample channel projections.

    Args:
        feats: (B, C, h, w).
        proj: (B, k, C) or (k, C).

    Returns:
        (B, k, h, w).
    """
    if proj.dim() == 2:
        return torch.einsum("kc,bchw->bkhw", proj.to(feats.dtype), feats)
    return torch.einsum("bkc,bchw->bkhw", proj.to(feats.dtype), feats)


def reconstruction_terms(
    hires_views: torch.Tensor,
    targets: torch.Tensor,
    downsampler: nn.Module,
    uncertainty: UncertaintyHead | None,
    *,
    saliency: torch.Tensor | None = None,
    uncertainty_input: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The core of every multi-view step: downsample jittered high-res views, compare with the targets.

    Args:
        hires_views: (B, k, H, W) jittered high-res maps.
        targets: (B, k, h, w) backbone features of the jittered images (same channel space).
        downsampler: ``(x, out_size, saliency, generator=) -> (B, k, h, w)``.
        uncertainty: scale head, or None for plain MSE.
        saliency: optional (B, 1, H, W) jittered saliency map for the attention downsampler.
        uncertainty_input: what the scale head sees (default ``targets``), e.g. the unprojected target.
        generator: dropout generator for the downsampler.

    Returns:
        (nll per sample (B,), mse per sample (B,), downsampled (B, k, h, w)).
    """
    out_size = (int(targets.shape[-2]), int(targets.shape[-1]))
    down = downsampler(hires_views, out_size, saliency, generator=generator)
    scale = None
    if uncertainty is not None:
        scale = uncertainty(targets if uncertainty_input is None else uncertainty_input)
    nll = gaussian_nll(down, targets, scale, reduce=False)
    mse = (down.detach().float() - targets.float()).pow(2).flatten(1).mean(1)
    return nll, mse, down


class MultiViewObjective(nn.Module):
    """FeatUp's multi-view training loss for an upsampler, with the learned downsampler and uncertainty head.

    Args:
        dim: backbone channels C, or None for an objective with no backbone-dependent parameter (saliency and
            uncertainty then read the k projected channels).
        stride: the backbone's stride (default downsampler kernel).
        proj_dim: random projection dim k (FeatUp: 30), drawn per jitter.
        n_jitters: views per image per step (the upsampler is re-run for each, as in FeatUp).
        downsampler_cfg, loss_cfg, jitter_cfg: the method's constants by default.
    """

    def __init__(
        self,
        dim: int | None,
        *,
        stride: int,
        proj_dim: int = 30,
        n_jitters: int = 5,
        downsampler_cfg: DownsamplerConfig | None = None,
        loss_cfg: LossConfig | None = None,
        jitter_cfg: JitterConfig | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.stride = int(stride)
        self.proj_dim = int(proj_dim)
        self.n_jitters = int(n_jitters)
        self.loss_cfg = loss_cfg or LossConfig()
        self.jitter_cfg = jitter_cfg or JitterConfig()
        self.downsampler_cfg = downsampler_cfg or DownsamplerConfig()
        self.downsampler = build_downsampler(
            self.downsampler_cfg, in_dim=dim if dim is not None else proj_dim, stride=stride
        )
        head_dim = dim if dim is not None else proj_dim
        self.uncertainty = UncertaintyHead(head_dim, cfg=self.loss_cfg) if self.loss_cfg.uncertainty else None

    @classmethod
    def from_train_config(cls, dim: int | None, stride: int, cfg: TrainConfig) -> "MultiViewObjective":
        """Build with a :class:`TrainConfig`'s projection dim, jitter count and nested configs."""
        return cls(
            dim,
            stride=stride,
            proj_dim=cfg.projection_dim,
            n_jitters=cfg.n_jitters,
            downsampler_cfg=cfg.downsampler,
            loss_cfg=cfg.loss,
            jitter_cfg=cfg.jitter,
        )

    def _saliency_direction(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        ds = self.downsampler
        if self.dim is not None and isinstance(ds, AttentionDownsampler) and ds.saliency_weight is not None:
            return ds.saliency_weight[0], ds.saliency_bias[0]
        return None

    def loss(
        self,
        hires_fn: HiresFn,
        image: torch.Tensor,
        backbone: nn.Module,
        generator: torch.Generator | None = None,
        *,
        lowres: torch.Tensor | None = None,
        project_first: bool | None = None,
        backward: bool = False,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's loss over ``n_jitters`` random views.

        Args:
            hires_fn: the upsampler call ``(feats, image) -> hires``; a map not at the image size is resized
                bilinearly (as FeatUp's training script does).
            image: (B, 3, H, W) images normalised as the backbone expects, H and W multiples of the stride (the
                upsampler gets them re-normalised with the ImageNet mean/std, ``featup_ops.guidance_image``).
            backbone: frozen backbone, ``(B,3,H,W) -> (B,C,H/s,W/s)``.
            generator: CPU generator for projections, jitters and CRF samples (reproducible steps).
            lowres: precomputed ``backbone(image)``; computed (without gradients) when None.
            project_first: upsample k projected channels instead of C (exact for channel-agnostic upsamplers);
                default: ``getattr(hires_fn, "channel_agnostic", False)``.
            backward: call ``backward()`` after each jitter (FeatUp's memory-saving accumulation) and return the
                loss detached.

        Returns:
            (scalar loss, metrics: loss, rec, mse, crf, tv as floats).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise InputSizeError(f"MultiViewObjective: image must be (B,3,H,W), got {tuple(image.shape)}")
        if lowres is None:
            with torch.no_grad():
                lowres = backbone(image)
        lowres = lowres.float()
        b, c = lowres.shape[:2]
        if self.dim is not None and c != self.dim:
            raise InputSizeError(f"MultiViewObjective: built for {self.dim} channels, backbone gave {c}")
        if project_first is None:
            project_first = bool(getattr(hires_fn, "channel_agnostic", False))
        size = (int(image.shape[-2]), int(image.shape[-1]))
        # the upsampler's guidance is ImageNet-normalised whatever the backbone's normalisation (the contract)
        guide = guidance_image(image, getattr(backbone, "mean", IMAGENET_MEAN), getattr(backbone, "std", IMAGENET_STD))
        cfg = self.loss_cfg
        sal_dir = self._saliency_direction()
        total = torch.zeros((), device=image.device)
        sums = {"rec": 0.0, "mse": 0.0, "crf": 0.0, "tv": 0.0}
        for j in range(self.n_jitters):
            proj = random_projection(b, c, self.proj_dim, generator=generator, device=image.device)
            sal = None
            if project_first:
                rows = proj
                if sal_dir is not None:
                    rows = torch.cat([proj, sal_dir[0][None, None, :].expand(b, 1, c)], dim=1)
                hr = hires_fn(project(lowres, rows), guide)
            else:
                hr_full = hires_fn(lowres, guide)
                if tuple(hr_full.shape[-2:]) != size:
                    hr_full = F.interpolate(hr_full, size=size, mode="bilinear", align_corners=False)
                hr = project(hr_full, proj)
                if sal_dir is not None:
                    hr = torch.cat([hr, torch.einsum("c,bchw->bhw", sal_dir[0], hr_full)[:, None]], dim=1)
            if tuple(hr.shape[-2:]) != size:
                hr = F.interpolate(hr, size=size, mode="bilinear", align_corners=False)
            t = sample_jitter(b, size, self.jitter_cfg, generator=generator, device=image.device)
            with torch.no_grad():
                image_t = apply_jitter(image, t)
                target = backbone(image_t).float()
            hr_t = apply_jitter(hr.float(), t)
            if sal_dir is not None:
                sal = hr_t[:, -1:] + sal_dir[1]
                hr_t = hr_t[:, :-1]
            target_p = project(target, proj)
            nll, mse, _ = reconstruction_terms(
                hr_t,
                target_p,
                self.downsampler,
                self.uncertainty,
                saliency=sal,
                uncertainty_input=target if self.dim is not None else None,
            )
            step = cfg.rec_weight * nll.mean() / self.n_jitters
            sums["rec"] += float(nll.detach().mean()) / self.n_jitters
            sums["mse"] += float(mse.mean()) / self.n_jitters
            if j == 0 and cfg.crf_weight > 0:
                # FeatUp pairs the jittered features with the un-jittered image; we use the jittered image.
                crf = crf_loss(hr_t, image_t, cfg=cfg, generator=generator)
                step = step + cfg.crf_weight * crf
                sums["crf"] = float(crf.detach())
            if cfg.tv_weight > 0:
                tv = total_variation(hr_t) / self.n_jitters
                step = step + cfg.tv_weight * tv
                sums["tv"] += float(tv.detach())
            if backward:
                step.backward()
                total = total + step.detach()
            else:
                total = total + step
        metrics = {"loss": float(total.detach()), **sums}
        return total, metrics


def fixed_views(
    n: int, size: tuple[int, int], cfg: JitterConfig | None = None, *, seed: int = 0
) -> Jitter:
    """``n`` reproducible transforms (the first is the identity) for validation.

    Args:
        n: number of views.
        size: (H, W) image size.
        cfg: jitter ranges.
        seed: fixes the draw.

    Returns:
        A :class:`Jitter` of length n; every image is scored on all n.
    """
    g = torch.Generator().manual_seed(seed)
    ident = Jitter.identity(1)
    if n <= 1:
        return ident
    return Jitter.cat([ident, sample_jitter(n - 1, size, cfg, generator=g)])


def reconstruction_error(
    hires: torch.Tensor,
    image: torch.Tensor,
    backbone: nn.Module,
    views: Jitter,
    downsampler: nn.Module | None = None,
    *,
    relative: bool = True,
) -> torch.Tensor:
    """Held-out multi-view reconstruction error of any high-res map, on fixed views, with a fixed downsampler.

    For each view t: ``mean((down(t(F)) - f(t(x)))^2)``, averaged over views. The default downsampler is the
    method's blur downsampler at its (non-learned) initial value with kernel = stride: a box average over each
    backbone patch, which favours no upsampler. Pass the same ``views`` (e.g. :func:`fixed_views`) and
    downsampler for every upsampler being compared.

    Args:
        hires: (B, C, H', W') high-res features (resized bilinearly to the image size if different).
        image: (B, 3, H, W) the normalised images the features belong to.
        backbone: the frozen backbone (C channels).
        views: n transforms, each applied to every image.
        downsampler: fixed downsampler ``(x, out_size) -> (B, C, h, w)``; default box average (see above).
        relative: divide by the mean squared target (scale-free; ratios between upsamplers are unchanged).

    Returns:
        (B,) float32 per-image error (no gradients).
    """
    if hires.dim() != 4 or image.dim() != 4 or hires.shape[0] != image.shape[0]:
        raise InputSizeError(
            f"reconstruction_error: need hires (B,C,H,W) and image (B,3,H,W) of one batch, got "
            f"{tuple(hires.shape)} and {tuple(image.shape)}"
        )
    size = (int(image.shape[-2]), int(image.shape[-1]))
    stride = int(getattr(backbone, "stride"))
    if downsampler is None:
        downsampler = BlurDownsampler(stride).to(image.device)
    b = image.shape[0]
    err = torch.zeros(b, device=image.device)
    norm = torch.zeros(b, device=image.device)
    with torch.no_grad():
        hr = hires.float()
        if tuple(hr.shape[-2:]) != size:
            hr = F.interpolate(hr, size=size, mode="bilinear", align_corners=False)
        views = views.to(image.device)
        for v in range(len(views)):
            t = views.index(torch.full((b,), v, dtype=torch.long, device=image.device))
            target = backbone(apply_jitter(image, t)).float()
            if target.shape[1] != hr.shape[1]:
                raise InputSizeError(
                    f"reconstruction_error: hires has {hr.shape[1]} channels, backbone gives {target.shape[1]}"
                )
            down = downsampler(apply_jitter(hr, t), (int(target.shape[-2]), int(target.shape[-1])))
            err += (down.float() - target).pow(2).flatten(1).mean(1)
            norm += target.pow(2).flatten(1).mean(1)
    err = err / len(views)
    return err / (norm / len(views)).clamp_min(1e-12) if relative else err
