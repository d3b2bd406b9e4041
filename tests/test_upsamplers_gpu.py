"""Every published upsampler kind on CUDA against the same code on CPU (float32), and in half precision (skipped
without CUDA; run by ``infra/gpu_check.sh``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import featup_ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FIXTURES = Path(__file__).parent / "fixtures"
#: spec, feature grid, image pixels per cell
CASES = {
    "featup": (f"featup:dinov2={FIXTURES / 'featup_jbu' / 'dinov2_jbu_stack_norm.ckpt'}", (14, 14), 16),
    "uplift": (f"uplift:dinov2-s14={FIXTURES / 'uplift' / 'uplift_dinov2-s14.safetensors'}", (16, 16), 14),
    "anyup": (f"anyup:paper={FIXTURES / 'anyup' / 'anyup_paper.pth'}", (16, 16), 14),
    "loftup": (f"loftup:dinov2s={FIXTURES / 'loftup' / 'pytorch_model.bin.xz'}", (16, 16), 14),
}


def _inputs(grid: tuple[int, int], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 384, *grid, generator=g)
    image = torch.randn(2, 3, grid[0] * scale, grid[1] * scale, generator=g)
    return feats, image


@pytest.mark.parametrize("kind", sorted(CASES))
def test_cuda_float32_equals_cpu(kind):
    spec, grid, scale = CASES[kind]
    feats, image = _inputs(grid, scale)
    size = (image.shape[-2], image.shape[-1])
    with torch.no_grad():
        cpu = featup_ops.load_upsampler(spec)(feats, image, size)
        gpu = featup_ops.load_upsampler(spec, map_location="cuda")(feats.cuda(), image.cuda(), size).cpu()
    scale_ = cpu.abs().max().item()
    assert (gpu - cpu).abs().max().item() <= 1e-3 * scale_, kind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_half_precision_on_cuda_stays_close_to_float32(kind, dtype):
    spec, grid, scale = CASES[kind]
    feats, image = _inputs(grid, scale)
    size = (image.shape[-2], image.shape[-1])
    up = featup_ops.load_upsampler(spec, map_location="cuda")
    with torch.no_grad():
        ref = up(feats.cuda(), image.cuda(), size).float()
        half = up.to(dtype)(feats.cuda().to(dtype), image.cuda().to(dtype), size)
    assert half.dtype == dtype and torch.isfinite(half).all()
    rel = ((half.float() - ref).abs().mean() / ref.abs().mean()).item()
    assert rel < 0.05, (kind, dtype, rel)
