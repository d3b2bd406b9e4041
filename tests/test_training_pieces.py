"""Config constants, jitter, downsamplers, losses and the multi-view objective."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.baselines import BilinearUpsampler
from featup_ops.config import (
    IMPLICIT_PRESETS,
    DownsamplerConfig,
    ImplicitConfig,
    JBUConfig,
    JitterConfig,
    LossConfig,
    TrainConfig,
)
from featup_ops.downsamplers import AttentionDownsampler, BlurDownsampler, downsample_strides
from featup_ops.errors import InputSizeError
from featup_ops.jbu import JBUUpsampler
from featup_ops.jitter import Jitter, apply_jitter, sample_jitter
from featup_ops.losses import (
    UncertaintyHead,
    blur_pin_loss,
    crf_loss,
    gaussian_nll,
    magnitude_loss,
    total_variation,
)
from featup_ops.multiview import MultiViewObjective, fixed_views, random_projection, reconstruction_error


# one torch thread: 2 cores shared by many processes, and OpenMP spinning costs ~20x on tiny tensors
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PatchBackbone(nn.Module):
    """Tiny frozen backbone: a 1x1 conv then average pooling over stride x stride patches.

    Its 'true' high-res features are the 1x1 conv at full resolution, which a box downsampler maps exactly onto
    the backbone's output of any jittered view.
    """

    stride = 8
    dim = 6

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Conv2d(3, self.dim, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=g))
        self.requires_grad_(False)
        self.eval()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.proj(x), self.stride)


def _smooth_field(h: int, w: int, c: int = 2) -> torch.Tensor:
    """Low-frequency field sampled at pixel centres of an (h, w) grid over the unit square."""
    y = (torch.arange(h) + 0.5) / h
    x = (torch.arange(w) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    chans = [torch.cos(math.pi * yy * (i + 1)) + torch.sin(math.pi * xx * 0.5 * (i + 1)) for i in range(c)]
    return torch.stack(chans)[None]


# ---------------------------------------------------------------- config


def test_config_defaults_are_the_methods():
    j = JBUConfig()
    assert (j.radius, j.kernel_size, j.key_dim, j.range_dropout) == (3, 7, 32, 0.1)
    assert (j.log_temperature_init, j.temperature_min, j.temperature_max, j.sigma_init) == (0.0, 1e-4, 1e4, 1.0)
    assert (j.fixup_scale, j.final_residual, j.final_dropout, j.n_layers) == (0.1, 0.1, 0.2, 4)
    assert JitterConfig() == JitterConfig(max_pad=20, max_zoom=2.0, flip_p=0.5, zoom_p=0.5)
    lc = LossConfig()
    assert (lc.crf_weight, lc.tv_weight, lc.uncertainty, lc.uncertainty_init_scale, lc.uncertainty_offset) == (
        0.001,
        0.0,
        True,
        0.1,
        0.1,
    )
    t = TrainConfig()
    assert (t.batch_size, t.lr, t.n_jitters, t.projection_dim, t.steps) == (4, 1e-3, 5, 30, 2000)
    assert (t.grad_clip_steps, t.grad_clip_norm) == (10, 1e-4)
    assert DownsamplerConfig().kind == "attention"
    p = IMPLICIT_PRESETS["paper"]
    assert p == ImplicitConfig()
    assert (p.n_freqs, p.in_channels, p.proj_dim, p.n_views, p.steps, p.views_per_step, p.lr) == (
        30,
        303,
        128,
        3000,
        1200,
        10,
        2e-3,
    )
    assert (p.jitter.max_pad, p.jitter.max_zoom) == (30, 1.8)
    assert (p.loss.magnitude_weight, p.loss.magnitude_tv_weight, p.loss.blur_pin_weight) == (0.001, 0.05, 0.1)
    fast = IMPLICIT_PRESETS["fast"]
    assert fast.n_views * fast.steps * 10 <= p.n_views * p.steps and fast.early_stop


def test_config_round_trip():
    cfg = TrainConfig(steps=7, jbu=JBUConfig(fixup=True), jitter=JitterConfig(max_pad=3))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert ImplicitConfig.from_dict(IMPLICIT_PRESETS["fast"].to_dict()) == IMPLICIT_PRESETS["fast"]
    with pytest.raises(ValueError, match="unknown config keys"):
        JBUConfig.from_dict({"radius": 3, "radius_typo": 1})


# ---------------------------------------------------------------- jitter


def test_sample_jitter_ranges_and_seed():
    cfg = JitterConfig()
    a = sample_jitter(200, (32, 48), cfg, generator=torch.Generator().manual_seed(3))
    b = sample_jitter(200, (32, 48), cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.offset, b.offset) and torch.equal(a.zoom, b.zoom)
    assert (a.zoom >= 1).all() and (a.zoom <= cfg.max_zoom).all()
    assert 0.3 < a.flip.float().mean() < 0.7 and 0.3 < (a.zoom > 1).float().mean() < 0.7
    span_y = (torch.floor((32 + 40) * a.zoom) - 32) / 32
    assert (a.offset[:, 0] >= 0).all() and (a.offset[:, 0] <= span_y + 1e-6).all()
    torch.testing.assert_close(a.pad[0], torch.tensor([20 / 32, 20 / 48]))


def test_identity_shift_and_flip_are_exact():
    x = torch.randn(1, 2, 16, 24)
    torch.testing.assert_close(apply_jitter(x, Jitter.identity(1)), x, atol=1e-5, rtol=0)
    # zoom 1, pad 4 px, offset 6 px (y) and 2 px (x): a shift by (+2, -2) pixels, exact in the interior
    j = Jitter(torch.tensor([False]), torch.tensor([1.0]), torch.tensor([[4 / 16, 4 / 24]]), torch.tensor([[6 / 16, 2 / 24]]))
    y = apply_jitter(x, j)
    torch.testing.assert_close(y[..., 0:14, 2:24], x[..., 2:16, 0:22])
    f = Jitter(torch.tensor([True]), torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2))
    torch.testing.assert_close(apply_jitter(x, f), x.flip(-1))


def test_jitter_is_resolution_consistent():
    """The same parameters applied to maps of two resolutions describe one transform of the scene."""
    g = torch.Generator().manual_seed(0)
    j = sample_jitter(6, (64, 96), JitterConfig(max_pad=8), generator=g)
    hi, lo = _smooth_field(64, 96).expand(6, -1, -1, -1), _smooth_field(16, 24).expand(6, -1, -1, -1)
    up = BilinearUpsampler()
    img = torch.zeros(6, 3, 64, 96)
    # jittering an upsampled map == upsampling the jittered low-res map (and both match the jittered truth)
    a = apply_jitter(up(lo, img), j)
    b = up(apply_jitter(lo, j), img)
    truth = apply_jitter(hi, j)
    assert (a - b).abs().mean() < 0.02 and (a - truth).abs().mean() < 0.02
    # and the test can fail: other parameters give a clearly different map
    other = sample_jitter(6, (64, 96), JitterConfig(max_pad=8), generator=torch.Generator().manual_seed(1))
    assert (apply_jitter(hi, other) - truth).abs().mean() > 0.1


def test_apply_jitter_bad_batch():
    with pytest.raises(ValueError, match="number of transforms"):
        apply_jitter(torch.zeros(3, 1, 8, 8), Jitter.identity(2))


# ---------------------------------------------------------------- downsamplers


@pytest.mark.parametrize(
    "size,k,grid,stride", [(224, 16, 14, 16), (224, 14, 16, 14), (224, 29, 14, 15), (224, 29, 16, 13)]
)
def test_stride_rule_matches_the_method(size, k, grid, stride):
    assert downsample_strides((size, size), (grid, grid), k) == (stride, stride)


def test_stride_rule_rejects_too_small():
    with pytest.raises(ValueError, match="cannot give"):
        downsample_strides((10, 20), (4, 4), 8)


def test_blur_downsampler_init_is_patch_average_non_square():
    x = torch.randn(2, 3, 24, 40)
    ds = BlurDownsampler(8)
    torch.testing.assert_close(ds(x, (3, 5)), F.avg_pool2d(x, 8))


def test_attention_downsampler_shapes_determinism_gradients():
    torch.manual_seed(0)
    ds = AttentionDownsampler(4, 8)
    x = torch.randn(2, 4, 24, 40, requires_grad=True)
    out = ds(x, (3, 5))
    assert out.shape == (2, 4, 3, 5)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in ds.named_parameters():
        assert p.grad is not None and (p.grad.abs().sum() > 0), name
    assert (ds.w.grad.abs() > 0).all() and (ds.b.grad.abs() > 0).all()  # every tap
    ds.eval()
    with torch.no_grad():
        assert torch.equal(ds(x, (3, 5)), ds(x, (3, 5)))  # eval: no patch dropout (unlike FeatUp)
        c = torch.full((1, 4, 16, 16), 3.0)
        torch.testing.assert_close(ds(c, (2, 2)), torch.full((1, 4, 2, 2), 3.0))  # attention sums to 1
    ds.train()
    with torch.no_grad():
        assert not torch.equal(ds(x, (3, 5)), ds(x, (3, 5)))


def test_attention_downsampler_groups_equal_separate():
    torch.manual_seed(0)
    grouped = AttentionDownsampler(3, 5, groups=2)
    with torch.no_grad():
        grouped.w[1].mul_(1.5)
        grouped.saliency_weight[1].add_(0.3)
    x = torch.randn(2 * 3, 3, 20, 20)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = grouped(x, (4, 4), generator=g1)
    for i in range(2):
        single = AttentionDownsampler(3, 5)
        with torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(getattr(grouped, name)[i : i + 1])
        ref = single(x[3 * i : 3 * i + 3], (4, 4), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(out[3 * i : 3 * i + 3], ref, atol=1e-5, rtol=1e-5)
    del g2


# ---------------------------------------------------------------- losses


def test_gaussian_nll_and_uncertainty_head():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mse = (pred - target).pow(2).mean()
    torch.testing.assert_close(gaussian_nll(pred, target), mse)
    s = torch.full((2, 1, 3, 3), 2.0)
    torch.testing.assert_close(gaussian_nll(pred, target, s), mse / 8 + math.log(2.0))
    head = UncertaintyHead(4)
    assert head.weight.abs().max() <= 0.1 / 2 + 1e-6  # default bound 1/sqrt(4), times 0.1
    scale = head(target)
    assert scale.shape == (2, 1, 3, 3) and (scale >= 1e-4).all()
    torch.testing.assert_close(scale.mean(), torch.tensor(math.exp(0.1)), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="expected"):
        head(torch.randn(2, 5, 3, 3))


def test_regularisers():
    const = torch.full((1, 3, 8, 8), 2.0)
    assert total_variation(const) == 0 and blur_pin_loss(const) < 1e-10
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    torch.testing.assert_close(total_variation(ramp), torch.tensor(8 * 7 / 64))
    noise = torch.randn(1, 3, 16, 16)
    assert blur_pin_loss(noise) > 0.3
    target = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    torch.testing.assert_close(magnitude_loss(torch.full((1, 1, 2, 2), 5.0), target), torch.tensor(0.0))


def test_crf_loss():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 16, 16)
    assert crf_loss(torch.ones(2, 4, 16, 16), image, generator=g) == 0
    f = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = crf_loss(f, image, cfg=LossConfig(crf_samples=50), generator=g)
    loss.backward()
    assert loss > 0 and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


# ---------------------------------------------------------------- multi-view objective


def test_random_projection_rows_unit_norm():
    p = random_projection(3, 10, 4, generator=torch.Generator().manual_seed(0))
    assert p.shape == (3, 4, 10)
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(3, 4))


@pytest.mark.parametrize("dim", [6, None], ids=["backbone-dim", "agnostic"])
def test_objective_gradients_reach_every_parameter(dim):
    bb = PatchBackbone()
    up = JBUUpsampler()
    obj = MultiViewObjective(dim, stride=8, proj_dim=4, n_jitters=2)
    image = torch.randn(2, 3, 16, 32)  # 2x4 grid: 3 stages use layers 1-3
    loss, metrics = obj.loss(up, image, bb, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(metrics["loss"]) and metrics["crf"] > 0
    used = [p for i in (1, 2, 3) for p in up.layers[i].parameters()]
    for p in used + list(obj.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in up.layers[0].parameters())


def test_projection_first_equals_projection_after():
    """Upsampling k projected channels (+ the saliency row) gives FeatUp's loss of upsampling all C."""
    bb = PatchBackbone()
    up = JBUUpsampler().eval()
    obj = MultiViewObjective(6, stride=8, proj_dim=3, n_jitters=2, loss_cfg=LossConfig(crf_weight=0.0)).eval()
    image = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        a, _ = obj.loss(up, image, bb, torch.Generator().manual_seed(4), project_first=True)
        b, _ = obj.loss(up, image, bb, torch.Generator().manual_seed(4), project_first=False)
        c, _ = obj.loss(up, image, bb, torch.Generator().manual_seed(5), project_first=True)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)


def test_backward_per_jitter_matches_single_backward():
    bb = PatchBackbone()
    image = torch.randn(1, 3, 16, 16)
    grads = []
    for per_jitter in (False, True):
        torch.manual_seed(0)
        up = JBUUpsampler().eval()
        obj = MultiViewObjective(6, stride=8, proj_dim=3, n_jitters=3).eval()
        loss, _ = obj.loss(up, image, bb, torch.Generator().manual_seed(1), backward=per_jitter)
        if not per_jitter:
            loss.backward()
        else:
            assert not loss.requires_grad
        grads.append(torch.cat([p.grad.flatten() for p in obj.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_reconstruction_error_is_fair():
    """The true high-res map scores ~0; bilinear of the low-res features scores worse; same views for both."""
    bb = PatchBackbone()
    image = F.avg_pool2d(torch.randn(2, 3, 32, 48), 3, stride=1, padding=1)
    views = fixed_views(4, (32, 48), JitterConfig(max_pad=4), seed=0)
    assert len(views) == 4 and torch.equal(views.zoom[:1], torch.ones(1))
    truth = reconstruction_error(bb.dense(image), image, bb, views)
    bilinear = reconstruction_error(BilinearUpsampler()(bb(image), image), image, bb, views)
    assert truth.shape == (2,) and (truth < 1e-3).all()
    assert (bilinear > 10 * truth.clamp_min(1e-6)).all()
    with pytest.raises(InputSizeError):
        reconstruction_error(bb.dense(image)[:1], image, bb, views)


def test_objective_rejects_wrong_dim():
    obj = MultiViewObjective(5, stride=8, proj_dim=3, n_jitters=1)
    with pytest.raises(InputSizeError, match="built for 5 channels"):
        obj.loss(JBUUpsampler(), torch.randn(1, 3, 16, 16), PatchBackbone())


def test_train_config_builds_objective():
    cfg = dataclasses.replace(TrainConfig(), projection_dim=7, n_jitters=2, downsampler=DownsamplerConfig(kind="blur"))
    obj = MultiViewObjective.from_train_config(6, 8, cfg)
    assert obj.proj_dim == 7 and obj.n_jitters == 2 and isinstance(obj.downsampler, BlurDownsampler)
