"""Implicit upsampler: network shapes, grouped == separate, the fit lowers its loss, presets, early stopping."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import featup_ops.implicit as implicit
from featup_ops.config import IMPLICIT_PRESETS, ImplicitConfig
from featup_ops.errors import InputSizeError
from featup_ops.implicit import ImplicitUpsampler
from featup_ops.implicit_fit import fit_implicit
from featup_ops.implicit_step import attention_downsample, step_plan
from featup_ops.pca import principal_components


# one torch thread: 2 cores shared by many processes, and OpenMP spinning costs ~20x on tiny tensors
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyBackbone(nn.Module):
    """Random frozen conv backbone with the Backbone attributes fit_implicit reads."""

    stride = 8
    dim = 12
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.dim, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


TINY = dataclasses.replace(
    IMPLICIT_PRESETS["fast"],
    n_views=16,
    pca_views=4,
    view_batch=32,
    steps=30,
    proj_dim=6,
    hidden_dim=32,
    n_freqs=6,
    views_per_step=4,
    downsampler_kernel=11,
    early_stop=False,
    lr=1e-2,  # a few dozen steps must show progress
)


def _images(n=2, size=(32, 40), seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, size[0] // 4, size[1] // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)


def test_network_matches_the_method_and_any_size():
    net = ImplicitUpsampler(128)
    assert net.cfg.in_channels == 303
    assert sum(p.numel() for p in net.parameters()) == 73098  # the method's ~73.1k
    torch.testing.assert_close(net.freqs[[0, -1]], torch.exp(torch.tensor([-2.0, 10.0])))
    img = torch.randn(1, 3, 16, 20)
    assert net(img).shape == (1, 128, 16, 20)
    assert net.eval()(img, (37, 23)).shape == (1, 128, 37, 23)
    with pytest.raises(InputSizeError, match="one per network"):
        net(torch.randn(2, 3, 16, 20))


def test_chunked_eval_equals_whole(monkeypatch):
    net = ImplicitUpsampler(5, cfg=TINY).eval()
    img = torch.randn(1, 3, 12, 10)
    whole = net(img, (30, 17))  # gradients on: one block
    monkeypatch.setattr(implicit, "EVAL_BLOCK_BYTES", 1)  # one row per block
    with torch.no_grad():
        rows = net(img, (30, 17))
    torch.testing.assert_close(rows, whole.detach())


def test_grouped_network_equals_separate_networks():
    grouped = ImplicitUpsampler(4, cfg=TINY, groups=2).eval()
    with torch.no_grad():
        for p in grouped.parameters():
            p[1].add_(0.1 * torch.randn_like(p[1]))
    img = torch.randn(2, 3, 9, 11)
    out = grouped(img)
    for i in range(2):
        single = ImplicitUpsampler(4, cfg=TINY).eval()
        with torch.no_grad():
            for (name, p) in single.named_parameters():
                p.copy_(getattr(grouped, name)[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], single(img[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_pca_is_exact_and_deterministic():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:, :2]  # data in a 2-d subspace
    coef = torch.randn(3 * 5 * 5, 2, generator=g) * torch.tensor([3.0, 1.0])
    x = (coef @ basis.T + 0.5).reshape(3, 5, 5, 8).permute(0, 3, 1, 2)
    samples = x.permute(0, 2, 3, 1).reshape(-1, 8)  # every pixel one sample, as the fit's view bank does
    mean, comps = (t.float() for t in principal_components(samples, 2)[:2])
    recon = torch.einsum("vchw,kc->vkhw", x - mean[None, :, None, None], comps)
    back = torch.einsum("vkhw,kc->vchw", recon, comps) + mean[None, :, None, None]
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)
    assert torch.equal(principal_components(samples, 2)[1].float(), comps)


def test_fit_grouped_equals_separate():
    # Few steps: NAdam turns rounding-level gradient differences (e.g. kernels picked by memory alignment) into
    # lr-sized steps on near-zero gradients, so long fits agree statistically, not to 1e-4.
    bb, imgs = TinyBackbone(), _images()
    cfg = dataclasses.replace(TINY, steps=4)
    both = fit_implicit(imgs, bb, cfg=cfg, seed=3)
    assert both.shape == (2, 12, 32, 40) and both.dtype == torch.float32
    alone = fit_implicit(imgs[1:], bb, cfg=cfg, seed=3)  # the second row, fitted on its own
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[:1], alone, atol=1e-2)  # and the test can fail: rows differ


def test_short_fit_lowers_the_loss():
    bb, imgs = TinyBackbone(), _images()
    info: dict = {}
    fit_implicit(imgs, bb, cfg=TINY, seed=3, info=info)
    assert info["steps"] == [30, 30] and info["proj_dim"] == 6
    for hist in info["mse_history"]:
        first, last = sum(hist[:5]) / 5, sum(hist[-5:]) / 5
        assert last < 0.95 * first, (first, last)


def test_fit_any_output_size_and_group_size():
    bb, imgs = TinyBackbone(), _images(n=3, size=(24, 32))
    cfg = dataclasses.replace(TINY, steps=4, group_size=2)
    out = fit_implicit(imgs, bb, cfg=cfg, output_size=(45, 17))
    assert out.shape == (3, 12, 45, 17) and torch.isfinite(out).all()
    ref = fit_implicit(imgs[2:], bb, cfg=dataclasses.replace(cfg, group_size=None), output_size=(45, 17))
    torch.testing.assert_close(out[2:], ref, atol=1e-4, rtol=1e-4)


def test_early_stopping_stops_each_image_and_keeps_grouping():
    bb, imgs = TinyBackbone(), _images()
    # a tolerance no window can meet: stop after the first window plus `patience` windows
    cfg = dataclasses.replace(TINY, early_stop=True, early_stop_window=1, early_stop_patience=2, early_stop_tol=10.0)
    info: dict = {}
    out = fit_implicit(imgs, bb, cfg=cfg, info=info)
    assert info["steps"] == [3, 3] and all(len(h) == 3 for h in info["mse_history"])
    torch.testing.assert_close(out[1:], fit_implicit(imgs[1:], bb, cfg=cfg), atol=1e-4, rtol=1e-4)


def test_presets_and_bad_arguments():
    assert IMPLICIT_PRESETS["paper"] == ImplicitConfig()
    bb = TinyBackbone()
    with pytest.raises(ValueError, match="unknown implicit preset"):
        fit_implicit(_images(n=1), bb, cfg="fastest")
    with pytest.raises(InputSizeError, match="multiple of the backbone stride"):
        fit_implicit(torch.randn(1, 3, 30, 40), bb, cfg=TINY)
    with pytest.raises(InputSizeError, match=r"\(N,3,H,W\)"):
        fit_implicit(torch.randn(3, 32, 40), bb, cfg=TINY)
    with pytest.raises(ValueError, match="kernel"):
        fit_implicit(_images(n=1, size=(16, 16)), bb, cfg=dataclasses.replace(TINY, downsampler_kernel=17))


def test_fit_with_random_vit_backbone():
    import featup_ops

    bb = featup_ops.load_backbone("vit_s16", weights="random")
    cfg = dataclasses.replace(TINY, steps=3, n_views=6, pca_views=3, downsampler_kernel=None)  # k = 29
    out = fit_implicit(_images(n=1, size=(32, 48)), bb, cfg=cfg, output_size=(20, 30))
    assert out.shape == (1, bb.dim, 20, 30) and torch.isfinite(out).all()


@pytest.mark.gpu
def test_fit_on_gpu_bfloat16_grouped_equals_separate():
    bb = TinyBackbone().cuda()
    imgs = _images().cuda()
    cfg = dataclasses.replace(TINY, amp="auto")
    both = fit_implicit(imgs, bb, cfg=cfg)
    alone = fit_implicit(imgs[1:], bb, cfg=cfg)
    assert both.is_cuda and torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], alone, atol=5e-2, rtol=5e-2)


def _held_out_error(feats: torch.Tensor, imgs: torch.Tensor, bb: nn.Module) -> torch.Tensor:
    from featup_ops.multiview import fixed_views, reconstruction_error

    views = fixed_views(4, tuple(imgs.shape[-2:]), TINY.jitter, seed=1234)
    return reconstruction_error(feats, imgs, bb, views)


@pytest.mark.parametrize("train_scale", [1.0, 0.5])
def test_image_alone_and_in_a_group_of_four_give_the_same_error(train_scale):
    # A longer fit than test_fit_grouped_equals_separate, with early stopping on (the images stop at different
    # steps): an image's held-out error must not depend on the group it was fitted in beyond float noise. Measured:
    # equal to ~1e-6 and the same stopping step; the bounds allow a stopping decision that rounding flips by one
    # window (NAdam amplifies rounding-level differences, e.g. from kernels picked by memory alignment).
    bb, imgs = TinyBackbone(), _images(n=4, seed=5)
    cfg = dataclasses.replace(TINY, steps=40, early_stop=True, early_stop_window=5, train_scale=train_scale)
    group_info: dict = {}
    group = fit_implicit(imgs, bb, cfg=cfg, seed=7, info=group_info)
    err_group = _held_out_error(group, imgs, bb)
    for i in (0, 2):
        alone_info: dict = {}
        alone = fit_implicit(imgs[i : i + 1], bb, cfg=cfg, seed=7, info=alone_info)
        assert abs(alone_info["steps"][0] - group_info["steps"][i]) <= cfg.early_stop_window
        err_alone = float(_held_out_error(alone, imgs[i : i + 1], bb)[0])
        assert err_alone == pytest.approx(float(err_group[i]), rel=2e-2), (i, err_alone, err_group.tolist())
    assert float(err_group.max() - err_group.min()) > 0.02  # the images differ, so the check can fail


def test_progress_reports_steps_and_active_images():
    bb, imgs = TinyBackbone(), _images()
    calls: list[tuple[int, int, int]] = []
    fit_implicit(imgs, bb, cfg=dataclasses.replace(TINY, steps=5), progress=lambda *a: calls.append(a))
    assert calls == [(s, 5, 2) for s in range(1, 6)]
    # early stopping: every image stops after 3 steps (see test_early_stopping...): the active count drops to 0;
    # two groups of one image: steps count on across groups, out of groups x steps, and stay increasing
    cfg = dataclasses.replace(TINY, early_stop=True, early_stop_window=1, early_stop_patience=2, early_stop_tol=10.0)
    calls.clear()
    fit_implicit(imgs, bb, cfg=cfg, progress=lambda *a: calls.append(a))
    assert calls == [(1, 30, 2), (2, 30, 2), (3, 30, 0)]
    calls.clear()
    fit_implicit(imgs, bb, cfg=dataclasses.replace(cfg, group_size=1), progress=lambda *a: calls.append(a))
    assert calls == [(1, 60, 1), (2, 60, 1), (3, 60, 0), (31, 60, 1), (32, 60, 1), (33, 60, 0)]


def test_dense_attention_downsample_equals_the_module():
    from featup_ops.config import DownsamplerConfig
    from featup_ops.downsamplers import AttentionDownsampler

    g, v, c, size = 2, 3, 5, (32, 40)
    plan = step_plan(size, 8, dataclasses.replace(TINY, downsampler_kernel=9), torch.device("cpu"))
    assert plan.grid == (4, 5) and plan.kernel == 9
    down = AttentionDownsampler(c, 9, cfg=DownsamplerConfig(init_noise=0.5), groups=g)
    with torch.no_grad():
        for p in down.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(g * v, c, *size)
    torch.testing.assert_close(
        attention_downsample(down.eval(), x, plan, None, None), down(x, plan.grid), atol=1e-5, rtol=1e-5
    )
    # training mode: the same masks (drawn in the module's order from the same generator)
    want = down.train()(x, plan.grid, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    keep_s, keep_p = 1 - down.cfg.saliency_dropout, 1 - down.cfg.patch_dropout
    sal = (torch.rand((v, c, *plan.crop), generator=gen) < keep_s).float() / keep_s
    patch = (torch.rand((v, 1, 20), generator=gen) < keep_p).float()
    got = attention_downsample(down, x, plan, sal, patch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_train_scale_renders_smaller_while_fitting_and_outputs_the_requested_size():
    bb, imgs = TinyBackbone(), _images(size=(32, 48))
    info: dict = {}
    out = fit_implicit(imgs, bb, cfg=dataclasses.replace(TINY, train_scale=0.5), output_size=(40, 60), info=info)
    assert out.shape == (2, 12, 40, 60) and torch.isfinite(out).all()
    assert info["train_size"] == (16, 24) and info["step_mode"] == "eager"
    for hist in info["mse_history"]:
        assert sum(hist[-5:]) < 0.95 * sum(hist[:5])
    with pytest.raises(ValueError, match="train_scale"):
        fit_implicit(imgs, bb, cfg=dataclasses.replace(TINY, train_scale=1.5))
