"""GPU tests of the CuPy kernels against the torch reference (skipped without CUDA and CuPy; run by
``infra/gpu_check.sh``). The reference is computed once per case in float64 on the same device from the same
(rounded) inputs; tolerances are absolute, scaled by the reference's largest magnitude, per dtype."""
from __future__ import annotations

import pytest
import torch

from kernels import adaptive_conv, adaptive_conv_reference, backend_for, jbu_fused, jbu_weights_reference

pytestmark = pytest.mark.gpu

#: per-dtype absolute tolerance, relative to max|reference|: fp32 accumulates exactly like float64 up to rounding;
#: fp16/bf16 are dominated by rounding the output (2^-11, 2^-8 relative) after a float32 sum
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)
# (B, C, H, W, K): sizes that are not multiples of the 32x8 block, C=1, C=2048, the largest K
CASES = [
    (1, 1, 5, 7, 3),
    (2, 3, 33, 35, 5),
    (1, 4, 17, 9, 7),
    (1, 2048, 9, 10, 3),
    (2, 5, 8, 8, 15),
    (1, 384, 64, 48, 7),
]


@pytest.fixture(autouse=True)
def _cupy_backend(monkeypatch):
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "auto")


def _inputs(B, C, H, W, K, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to("cuda", dtype)
    w = torch.randn(B, H, W, K, K, generator=g).to("cuda", dtype)
    go = torch.randn(B, C, H, W, generator=g).to("cuda", dtype)
    return x, w, go


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


def test_cuda_tensors_dispatch_to_cupy(monkeypatch) -> None:
    x = torch.zeros(1, device="cuda")
    assert backend_for(x) == "cupy"
    assert backend_for(x.double()) == "torch"  # float64 has no CUDA instantiation
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "torch")
    assert backend_for(x) == "torch"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,K", CASES)
def test_forward_and_gradients_match_reference(B, C, H, W, K, dtype) -> None:
    x, w, go = _inputs(B, C, H, W, K, dtype)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = adaptive_conv_reference(xr, wr)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xr, wr), go.double())
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = adaptive_conv(xc, wc)
    assert out.dtype == dtype and out.shape == (B, C, H, W)
    gx, gw = torch.autograd.grad(out, (xc, wc), go)
    assert gx.dtype == dtype and gw.dtype == dtype
    _close(out, ref.detach(), dtype, "forward")
    _close(gx, ref_gx, dtype, "grad_x")
    _close(gw, ref_gw, dtype, "grad_w")


@pytest.fixture(scope="module")
def grads_k7():
    x, w, go = _inputs(2, 6, 13, 11, 7, torch.float32, seed=1)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.autograd.grad(adaptive_conv_reference(xr, wr), wr, go.double())[0]
    wc = w.clone().requires_grad_()
    ours = torch.autograd.grad(adaptive_conv(x, wc), wc, go)[0]
    return ours, ref


@pytest.mark.parametrize("tap", range(49))
def test_every_tap_gets_its_filter_gradient(grads_k7, tap: int) -> None:
    # FeatUp's filter-gradient kernel indexes taps with blockIdx.z*blockIdx.z: 42 of 49 taps stay zero
    ours, ref = grads_k7
    i, j = divmod(tap, 7)
    assert ref[..., i, j].abs().max() > 0.1
    _close(ours[..., i, j], ref[..., i, j], torch.float32, f"tap ({i},{j})")


@pytest.mark.filterwarnings("ignore:Input #.* requires gradient and is not a double:UserWarning")
def test_gradcheck_float32() -> None:
    # the op is linear in x and in w separately, so central differences are exact up to float32 rounding
    x, w, _ = _inputs(1, 2, 5, 6, 3, torch.float32, seed=2)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(adaptive_conv, (x, w), eps=0.5, atol=2e-3, rtol=2e-3, nondet_tol=0.0)


def test_deterministic() -> None:
    x, w, go = _inputs(2, 64, 40, 37, 7, torch.float32, seed=3)
    runs = []
    for _ in range(2):
        xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = adaptive_conv(xc, wc)
        runs.append((out.detach(), *torch.autograd.grad(out, (xc, wc), go)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_runs_on_torchs_current_stream() -> None:
    x, w, _ = _inputs(1, 256, 96, 96, 7, torch.float32, seed=4)
    expected = adaptive_conv_reference(x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = adaptive_conv(x, w)
        out2 = out * 2  # queued behind the kernel on the same stream
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(out2, 2 * expected, rtol=0, atol=2e-4)


def test_grid_z_larger_than_the_cuda_limit() -> None:
    # B * ceil(C/4) = 65,537 > 65,535: the kernels' grid-stride loop over z must cover every channel group
    x, w, go = _inputs(1, 4 * 65537, 1, 2, 3, torch.float32, seed=5)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = adaptive_conv_reference(xr, wr)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xr, wr), go.double())
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = adaptive_conv(xc, wc)
    gx, gw = torch.autograd.grad(out, (xc, wc), go)
    _close(out, ref.detach(), torch.float32, "forward")
    _close(gx, ref_gx, torch.float32, "grad_x")
    _close(gw, ref_gw, torch.float32, "grad_w")


def _jbu_inputs(B, C, D, H, W, K, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to("cuda", dtype)
    keys = torch.randn(B, D, H + K - 1, W + K - 1, generator=g).to("cuda", dtype)
    temperature = torch.tensor(0.8, device="cuda")
    spatial = (torch.rand(K, K, generator=g) + 0.05).to("cuda")
    return x, keys, temperature, spatial


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,D,H,W,K", [(1, 1, 3, 5, 7, 3), (2, 130, 32, 33, 20, 7), (1, 8, 4, 9, 9, 15)])
def test_fused_forward_matches_reference(B, C, D, H, W, K, dtype) -> None:
    x, keys, t, s = _jbu_inputs(B, C, D, H, W, K, dtype)
    ref = adaptive_conv_reference(x.double(), jbu_weights_reference(keys.double(), t.double(), s.double()))
    with torch.no_grad():
        out = jbu_fused(x, keys, t, s)
    assert out.dtype == dtype
    _close(out, ref, dtype, "jbu_fused")


def test_fused_with_gradients_matches_reference() -> None:
    x, keys, t, s = _jbu_inputs(2, 16, 8, 12, 10, 7, torch.float32, seed=6)
    leaves = [v.clone().requires_grad_() for v in (x, keys, t, s)]
    out = jbu_fused(*leaves)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [v.double().requires_grad_() for v in (x, keys, t, s)]
    ref = adaptive_conv_reference(ref_leaves[0], jbu_weights_reference(*ref_leaves[1:]))
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    _close(out, ref.detach(), torch.float32, "forward")
    for name, g, r in zip(("x", "keys", "temperature", "spatial"), grads, ref_grads):
        scale = r.abs().max().item() + 1e-6
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4 * scale, msg=lambda m, n=name: f"grad {n}: {m}")


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,C,D,H,W,K,misaligned_x",
    [
        (2, 130, 32, 33, 20, 7, False),  # x column pairs, 16-byte key chunks, channel tail
        (1, 9, 5, 9, 35, 5, False),      # odd W: scalar x, no pixel B in the last column; D=5 padded
        (1, 70, 32, 16, 64, 7, True),    # x one element off alignment: scalar x path
        (1, 8, 4, 9, 10, 15, False),     # K=15: 16-thread-wide blocks
    ],
)
def test_fused_vectorised_kernel_matches_scalar_kernel_and_reference(B, C, D, H, W, K, misaligned_x, dtype) -> None:
    # jbu_fused_forward_vec sums in the same order as jbu_fused_forward: expected bit-identical (reported), and
    # both within the reference tolerance
    from kernels._cupy import jbu_fused_cupy

    x, keys, t, s = _jbu_inputs(B, C, D, H, W, K, dtype, seed=7)
    if misaligned_x:
        x = _misaligned_copy(x)
        assert x.data_ptr() % (2 * x.element_size()) != 0
    ref = adaptive_conv_reference(x.double(), jbu_weights_reference(keys.double(), t.double(), s.double()))
    with torch.no_grad():
        vec = jbu_fused_cupy(x, keys, t, s, vectorized=True)
        scalar = jbu_fused_cupy(x, keys, t, s, vectorized=False)
    torch.cuda.synchronize()
    diff = (vec.double() - scalar.double()).abs().max().item()
    print(f"vectorised vs scalar fused kernel, {dtype}, {(B, C, D, H, W, K)}: max |diff| = {diff:.3g}"
          f"{' (bit-identical)' if torch.equal(vec, scalar) else ''}")
    _close(vec, ref, dtype, "jbu_fused vectorised")
    _close(vec, scalar.double(), dtype, "vectorised vs scalar")
