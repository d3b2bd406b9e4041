"""GPU tests of the paths around the kernels (skipped without CUDA and CuPy; run by ``infra/gpu_check.sh``):
the featurize stage, a training step and the implicit fit on CUDA must give what the CPU path gives.

Parity is checked with TF32 off (cuDNN and matmul), so the only differences left are float32 summation order; the
production default keeps TF32 on. No Ray or Zarr here: the GPU machines used for these checks have neither."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from featup_ops import JBUUpsampler, MultiViewObjective, fit_implicit, save_upsampler
from featup_ops.config import JBUConfig
from kernels import backend_for
from pipeline.featurize.stages import DecodeSpec, Featurizer, ModelSpec, decode_units, featurize_pixels

from conftest import SAMPLES
from test_implicit import TINY

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_float32(monkeypatch):
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "auto")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))


def _decoded_samples(size: int, rows: int = 4) -> dict[str, np.ndarray]:
    uris = [str(p) for p in sorted(SAMPLES.glob("*.jpg"))[:rows]]
    units = {"shard": np.array([0]), "start": np.array([0]),
             "meta": np.array([json.dumps({"image_id": list(range(len(uris))), "uri": uris})], dtype=object)}
    return decode_units(units, DecodeSpec((size, size), "crop", 8, rows_per_shard=len(uris)))


@pytest.mark.parametrize("upsampler", ["default", "jbu-checkpoint"])
def test_featurizer_stage_on_cuda_equals_the_cpu_path(upsampler: str, tmp_path) -> None:
    path = None
    if upsampler == "jbu-checkpoint":
        torch.manual_seed(0)
        path = str(tmp_path / "jbu")
        save_upsampler(path, JBUUpsampler().eval())
    batch = _decoded_samples(64)
    assert batch["ok"].all()
    stage = Featurizer(ModelSpec("efficientnet_lite0", "random", path, (48, 64), "float32", 2))
    assert stage.device == "cuda" and next(stage.backbone.parameters()).is_cuda
    assert backend_for(torch.empty(1, device="cuda")) == "cupy"
    out = stage(batch)

    pixels = np.asarray(batch["pixels"])[0]
    low, high = featurize_pixels(pixels, copy.deepcopy(stage.backbone).cpu(), copy.deepcopy(stage.upsampler).cpu(),
                                 output_size=(48, 64), batch_size=2)
    assert out["hires"].shape == (1, 4, 320, 48, 64) and out["status"].tolist() == [[1, 1, 1, 1]]
    assert _rel_err(torch.from_numpy(out["lowres"][0]), low) < 1e-5
    assert _rel_err(torch.from_numpy(out["hires"][0]), high) < 1e-4
    assert float(high.std()) > 0  # a real map, not zeros on both sides


class _ConvBackbone(nn.Module):
    """A random frozen stride-8 conv backbone with the attributes the objective reads."""

    stride, dim = 8, 16
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.dim, 8, stride=8)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def _step_gradients(device: str, fixup: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    backbone = _ConvBackbone().to(device).eval()
    # dropouts inside the JBU draw from the device's RNG, which differs between devices: off for parity
    cfg = JBUConfig(fixup=fixup, range_dropout=0.0, fixup_dropout=0.0)
    upsampler = JBUUpsampler(cfg=cfg).to(device).train()
    objective = MultiViewObjective(backbone.dim, stride=backbone.stride, n_jitters=2).to(device).train()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    loss, _ = objective.loss(upsampler, image, backbone, torch.Generator().manual_seed(2))
    loss.backward()
    named = [*upsampler.named_parameters("up"), *objective.named_parameters("obj")]
    return float(loss.detach()), {n: p.grad.detach().cpu() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("fixup", [False, True], ids=["plain-jbu", "fixup-jbu"])
def test_training_step_on_cuda_equals_the_cpu_step(fixup: bool) -> None:
    """Loss and upsampler gradients of one multi-view step agree between the CUDA path (CuPy kernel forward and
    backward) and the CPU path.

    Measured on an H100 (TF32 off): loss within 1e-5 relative; upsampler gradients within 1e-3 relative as a
    whole and 5e-3 per tensor (a layer's log-temperature gradient is a sum of cancelling softmax terms). The
    downsampler's gradients are left out: they differ by 10-50% between torch's own CPU and CUDA ops even with a
    plain bilinear upsampler and no kernel of ours in the step (they are near zero at initialisation, e.g. the
    saliency bias's is exactly zero in exact arithmetic), so they measure torch, not this code."""
    cpu_loss, cpu_grads = _step_gradients("cpu", fixup)
    cuda_loss, cuda_grads = _step_gradients("cuda", fixup)
    assert cpu_grads.keys() == cuda_grads.keys()
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    up = [n for n in cpu_grads if n.startswith("up.") and cpu_grads[n].abs().max() > 0]
    assert len(up) >= 18  # every JBU layer's temperature, sigma and range projection got a gradient on both
    errors = sorted(((_rel_err(cuda_grads[n], cpu_grads[n]), n) for n in up), reverse=True)
    assert errors[0][0] < 2e-2, errors[:3]
    flat = [torch.cat([grads[n].flatten() for n in up]) for grads in (cuda_grads, cpu_grads)]
    assert _rel_err(*flat) < 2e-3, errors[:3]
    for name in ("obj.uncertainty.weight", "obj.uncertainty.bias"):
        assert _rel_err(cuda_grads[name], cpu_grads[name]) < 1e-2, name


def test_implicit_fit_on_cuda_with_autocast_lowers_the_reconstruction_error() -> None:
    cfg = dataclasses.replace(TINY, steps=80, amp="auto")  # the CPU tests' tiny fit, longer, bf16 autocast
    torch.manual_seed(0)
    backbone = _ConvBackbone().cuda().eval()
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.interpolate(torch.randn(2, 3, 8, 10, generator=g), size=(32, 40),
                                             mode="bilinear").cuda()
    info: dict = {}
    out = fit_implicit(images, backbone, cfg=cfg, output_size=(48, 60), info=info)
    assert out.shape == (2, 16, 48, 60) and out.is_cuda and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for mse in info["mse_history"]:
        assert np.mean(mse[-5:]) < 0.85 * np.mean(mse[:5])


def test_implicit_fit_as_a_cuda_graph_equals_eager_and_does_not_depend_on_the_group() -> None:
    """The captured training step (forward, backward, NAdam in one CUDA graph) fits as the eager step does, and
    an image fitted alone and in a group of 4 (same seed) gets the same held-out error, with early stopping on."""
    from featup_ops.multiview import fixed_views, reconstruction_error

    cfg = dataclasses.replace(TINY, steps=40, amp="off", cuda_graph="on", early_stop=True, early_stop_window=5)
    torch.manual_seed(0)
    backbone = _ConvBackbone().cuda().eval()
    g = torch.Generator().manual_seed(5)
    images = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 10, generator=g), size=(32, 40),
                                             mode="bilinear").cuda()
    views = fixed_views(4, (32, 40), TINY.jitter, seed=1234)

    def error(feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_error(feats, x, backbone, views).cpu()

    info_graph: dict = {}
    graph = fit_implicit(images, backbone, cfg=cfg, seed=7, info=info_graph)
    assert info_graph["step_mode"] == "cuda_graph" and graph.is_cuda and torch.isfinite(graph).all()
    info_eager: dict = {}
    eager = fit_implicit(images, backbone, cfg=dataclasses.replace(cfg, cuda_graph="off"), seed=7, info=info_eager)
    assert info_eager["step_mode"] == "eager"
    err_graph, err_eager = error(graph, images), error(eager, images)
    torch.testing.assert_close(err_graph, err_eager, rtol=2e-2, atol=0)
    for mse in info_graph["mse_history"]:
        assert np.mean(mse[-5:]) < np.mean(mse[:5])
    alone = fit_implicit(images[2:3], backbone, cfg=cfg, seed=7)
    assert float(error(alone, images[2:3])[0]) == pytest.approx(float(err_graph[2]), rel=2e-2)
