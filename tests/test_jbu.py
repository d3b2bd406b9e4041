"""JBU layer and upsampler, and the baseline upsamplers: shapes, gradients, determinism, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from featup_ops.baselines import BilateralUpsampler, BilinearUpsampler
from featup_ops.checkpoint import build_upsampler
from featup_ops.config import JBUConfig
from featup_ops.errors import CheckpointError, ConfigError, FeatupError, InputSizeError
from featup_ops.jbu import JBULayer, JBUUpsampler, plan_stages


# one torch thread: 2 cores shared by many processes, and OpenMP spinning costs ~20x on tiny tensors
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(b=2, c=4, grid=(4, 4), size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, *grid, generator=g), torch.randn(b, 3, *size, generator=g)


@pytest.mark.parametrize(
    "grid,size,expected",
    [
        ((16, 16), (224, 224), [(32, 32), (64, 64), (128, 128), (224, 224)]),  # stride 14
        ((14, 14), (224, 224), [(28, 28), (56, 56), (112, 112), (224, 224)]),  # stride 16
        ((7, 7), (224, 224), [(14, 14), (28, 28), (56, 56), (112, 112), (224, 224)]),  # stride 32
        ((14, 21), (224, 336), [(28, 42), (56, 84), (112, 168), (224, 336)]),  # non-square
        ((5, 5), (5, 5), [(5, 5)]),
        ((4, 4), (9, 7), [(9, 7)]),
    ],
)
def test_plan_stages(grid, size, expected):
    assert plan_stages(grid, size) == expected


@pytest.mark.parametrize(
    "grid,size,output_size",
    [
        ((4, 4), (56, 56), None),  # stride 14
        ((3, 5), (48, 80), None),  # stride 16, non-square
        ((4, 4), (32, 32), (30, 50)),  # non-power-of-two, different ratios per axis
        ((4, 6), (32, 48), (4, 6)),  # same size: one guided-filter stage
    ],
)
@pytest.mark.parametrize("cfg", [JBUConfig(), JBUConfig(fixup=True, final_mix=True)], ids=["agnostic", "featup"])
def test_output_shapes(grid, size, output_size, cfg):
    feats, image = _inputs(grid=grid, size=size)
    up = JBUUpsampler(None if not cfg.final_mix else 4, cfg=cfg).eval()
    with torch.no_grad():
        out = up(feats, image, output_size)
    assert out.shape == (2, 4, *(output_size or size))
    assert out.dtype == feats.dtype and torch.isfinite(out).all()


def test_stride14_full_size():
    feats, image = _inputs(b=1, c=2, grid=(16, 16), size=(224, 224))
    with torch.no_grad():
        out = JBUUpsampler().eval()(feats, image)
    assert out.shape == (1, 2, 224, 224)


@pytest.mark.parametrize(
    "cfg,dim", [(JBUConfig(), None), (JBUConfig(fixup=True, final_mix=True, fixup_zero_init=False), 4)]
)
def test_gradients_reach_every_parameter(cfg, dim):
    feats, image = _inputs(grid=(2, 2), size=(32, 32))  # 4 stages: every layer runs
    up = JBUUpsampler(dim, cfg=cfg)
    out = up(feats, image)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_every_tap_gets_gradient_explicit_and_fused():
    layer = JBULayer(cfg=JBUConfig(fixup=True))
    g = torch.Generator().manual_seed(1)
    guidance = torch.randn(2, 3, 12, 10, generator=g)
    src = F.pad(torch.randn(2, 5, 12, 10, generator=g), (3, 3, 3, 3), mode="reflect")
    w = layer.kernel(guidance)
    w.retain_grad()
    out = kernels.adaptive_conv(src, w)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    per_tap = w.grad.abs().sum(dim=(0, 1, 2))
    assert per_tap.shape == (7, 7) and (per_tap > 0).all()
    # fused path: every tap of the spatial kernel and the temperature get gradient
    keys = layer.keys(guidance).detach()
    spatial = layer.spatial_kernel().detach().requires_grad_(True)
    temp = torch.tensor(1.0, requires_grad=True)
    out = kernels.jbu_fused(src, keys, temp, spatial)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert (spatial.grad.abs() > 0).all() and temp.grad.abs() > 0


def test_zero_init_fixup_starts_as_the_plain_layer_and_learns():
    torch.manual_seed(3)
    fixup = JBULayer(cfg=JBUConfig(fixup=True)).eval()
    plain = JBULayer().eval()
    plain.load_state_dict({k: v for k, v in fixup.state_dict().items() if not k.startswith("fixup.")})
    feats, image = _inputs(grid=(5, 6), size=(10, 12))
    with torch.no_grad():
        torch.testing.assert_close(fixup(feats, image), plain(feats, image), atol=1e-5, rtol=0)
    # the zero conv still gets gradient, so training moves the kernels away from the plain JBU
    out = fixup(feats, image)
    (out * torch.randn_like(out)).sum().backward()
    assert fixup.fixup[-1].weight.grad.abs().sum() > 0 and fixup.fixup[-1].bias.grad.abs().sum() > 0
    # FeatUp's own init perturbs every kernel from the start
    torch.manual_seed(3)
    featup = JBULayer(cfg=JBUConfig(fixup=True, fixup_zero_init=False)).eval()
    with torch.no_grad():
        assert (featup(feats, image) - plain(feats, image)).abs().max() > 1e-3


def test_fused_equals_explicit_weights():
    layer = JBULayer().eval()
    feats, image = _inputs(grid=(5, 6), size=(10, 12))
    with torch.no_grad():
        fused = layer(feats, image)
        src = F.pad(F.interpolate(feats, size=(10, 12), mode="bicubic", align_corners=False), (3,) * 4, mode="reflect")
        explicit = kernels.adaptive_conv(src, layer.kernel(image))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    w = layer.kernel(image)
    torch.testing.assert_close(w.sum(dim=(-1, -2)), torch.ones(2, 10, 12), atol=1e-5, rtol=0)


def test_init_spatial_kernel_and_temperature():
    layer = JBULayer()
    s = layer.spatial_kernel().detach()
    assert s[3, 3] == pytest.approx(1.0) and s[0, 0] == pytest.approx(0.3679, abs=1e-3)  # flat at init
    assert float(layer.temperature().detach()) == pytest.approx(1.0)
    assert sum(p.numel() for p in layer.range_proj.parameters()) == 1184  # the method's count
    assert sum(p.numel() for p in JBULayer(cfg=JBUConfig(fixup=True)).fixup.parameters()) == 5047


def test_eval_is_deterministic_and_train_is_not():
    feats, image = _inputs(grid=(2, 2), size=(32, 32))
    up = JBUUpsampler(4, cfg=JBUConfig(fixup=True, final_mix=True))
    up.eval()
    with torch.no_grad():
        a, b = up(feats, image), up(feats, image)
    assert torch.equal(a, b)
    up.train()
    with torch.no_grad():
        c = up(feats, image)
    assert not torch.equal(a, c)  # dropout is active in training


def test_feature_agnostic_commutes_with_channel_projection():
    feats, image = _inputs(c=6, grid=(4, 4), size=(32, 32))
    up = JBUUpsampler().eval()
    proj = torch.randn(3, 6)
    with torch.no_grad():
        a = up(torch.einsum("kc,bchw->bkhw", proj, feats), image)
        b = torch.einsum("kc,bchw->bkhw", proj, up(feats, image))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert up.channel_agnostic and not JBUUpsampler(6).channel_agnostic  # dim-bound: only C channels
    assert all(p.shape != (6, 6) for p in up.parameters())  # nothing depends on C


def test_config_dict_rebuilds():
    for up in (
        JBUUpsampler(),
        JBUUpsampler(8, cfg=JBUConfig(fixup=True, final_mix=True, radius=2)),
        BilateralUpsampler(radius=1, sigma_range=0.3),
        BilinearUpsampler(),
    ):
        d = up.config_dict()
        rebuilt = build_upsampler(d)
        assert type(rebuilt) is type(up) and rebuilt.config_dict() == d
        rebuilt.load_state_dict(up.state_dict(), strict=True)
    with pytest.raises(CheckpointError, match="unknown upsampler kind"):
        build_upsampler({"kind": "carafe"})


@pytest.mark.parametrize("up", [JBUUpsampler(4), BilateralUpsampler(), BilinearUpsampler()], ids=type)
def test_bad_arguments(up):
    feats, image = _inputs(grid=(4, 4), size=(32, 32))
    with pytest.raises(InputSizeError, match="batch"):
        up(feats, image[:1])
    with pytest.raises(InputSizeError, match="smaller than the feature grid"):
        up(feats, image, (3, 8))
    with pytest.raises(InputSizeError, match=r"\(B,3,H,W\)"):
        up(feats, image[:, :2])
    with pytest.raises(FeatupError):
        up(feats[0], image)
    if isinstance(up, JBUUpsampler):
        with pytest.raises(InputSizeError, match="built for 4 channels"):
            up(torch.randn(2, 5, 4, 4), image)


def test_final_mix_needs_dim():
    with pytest.raises(ConfigError, match="needs dim"):
        JBUUpsampler(cfg=JBUConfig(final_mix=True))


def _step_scene(size=(40, 56), grid=(5, 7)):
    """Image: dark left / bright right with an edge off the low-res grid; features: indicator of the bright side."""
    h, w = size
    image = torch.full((1, 3, h, w), -1.5)
    edge = 27  # not a multiple of the 8-px cell
    image[..., edge:] = 1.5
    truth = torch.zeros(1, 1, h, w)
    truth[..., edge:] = 1.0
    return F.adaptive_avg_pool2d(truth, grid), image, truth


def test_bilateral_preserves_edges_better_than_bilinear():
    feats, image, truth = _step_scene()
    bil = BilinearUpsampler()(feats, image)
    bf = BilateralUpsampler()(feats, image)
    err_bil = (bil - truth).abs().mean()
    err_bf = (bf - truth).abs().mean()
    assert bf.shape == truth.shape
    assert err_bf < 0.5 * err_bil


def test_bilateral_keeps_constants_and_non_square():
    feats = torch.full((2, 3, 4, 5), 2.5)
    image = torch.randn(2, 3, 32, 40)
    out = BilateralUpsampler()(feats, image, (21, 47))
    assert out.shape == (2, 3, 21, 47)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize("grid,out,radius", [((4, 6), (32, 48), 2), ((3, 5), (9, 25), 3), ((7, 7), (7, 7), 1),
                                             ((4, 4), (16, 16), 0)])
def test_bilateral_block_path_equals_the_tap_path(grid, out, radius):
    """Output sizes that are integer multiples of the grid take the block-wise matrix-product path (31-63x faster
    on the CPU at C=384); it must equal the per-tap gather every other size takes, borders included."""
    g = torch.Generator().manual_seed(4)
    feats, image = torch.randn(2, 5, *grid, generator=g), torch.randn(2, 3, *out, generator=g)
    up = BilateralUpsampler(radius=radius)
    weights, cells = up._tap_weights(feats, image, out)
    block = up._blockwise_sum(feats, weights)
    torch.testing.assert_close(block, up._tapwise_sum(feats, weights, cells), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up(feats, image, out), block)
