"""CPU tests of the JBU ops: the torch reference against a naive definition (unfold + einsum), float64 gradcheck,
every tap's filter gradient, the fused JBU weights, dispatch and input validation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import (
    KernelBackendError,
    KernelInputError,
    adaptive_conv,
    adaptive_conv_reference,
    backend_for,
    jbu_fused,
    jbu_fused_reference,
    jbu_weights_reference,
)
from kernels import _cpu_compiled
from kernels import reference as ref_module


def naive_adaptive_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition, the memory-hungry way: unfold copies x K*K times (the test oracle on tiny sizes)."""
    B, C = x.shape[:2]
    _, H, W, K, _ = w.shape
    cols = F.unfold(x, K).view(B, C, K * K, H, W)
    return torch.einsum("bcthw,bhwt->bchw", cols, w.reshape(B, H, W, K * K))


def naive_jbu_weights(keys: torch.Tensor, temperature: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    B, D, Hp, Wp = keys.shape
    K = spatial.shape[0]
    H, W, r = Hp - K + 1, Wp - K + 1, K // 2
    nb = F.unfold(keys, K).view(B, D, K * K, H, W)
    center = keys[:, :, r : r + H, r : r + W].unsqueeze(2)
    p = torch.softmax(temperature * (nb * center).sum(1), dim=1)
    ws = p * spatial.reshape(1, K * K, 1, 1)
    ws = ws / ws.sum(1, keepdim=True).clamp_min(1e-7)
    return ws.permute(0, 2, 3, 1).reshape(B, H, W, K, K)


def _inputs(B, C, H, W, K, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g, dtype=dtype).requires_grad_(grad)
    w = torch.randn(B, H, W, K, K, generator=g, dtype=dtype).requires_grad_(grad)
    return x, w


SHAPES = [(1, 1, 4, 4, 3), (2, 3, 5, 7, 3), (1, 4, 6, 3, 5), (2, 2, 3, 9, 7), (1, 5, 8, 8, 1)]


@pytest.mark.parametrize("B,C,H,W,K", SHAPES)
def test_forward_matches_naive_definition(B, C, H, W, K) -> None:
    x, w = _inputs(B, C, H, W, K)
    torch.testing.assert_close(adaptive_conv_reference(x, w), naive_adaptive_conv(x, w), rtol=0, atol=1e-12)


def test_forward_uses_channel_blocks_exactly(monkeypatch) -> None:
    # force one channel per block: the blocked path must give the same numbers as one whole-tensor pass
    x, w = _inputs(2, 7, 5, 6, 3)
    whole = adaptive_conv_reference(x, w)
    monkeypatch.setattr(ref_module, "BLOCK_BYTES", 1)
    torch.testing.assert_close(adaptive_conv_reference(x, w), whole, rtol=0, atol=0)


@pytest.mark.parametrize("B,C,H,W,K", [(1, 2, 3, 4, 3), (2, 1, 4, 3, 3), (1, 3, 2, 5, 5)])
def test_gradcheck_float64(B, C, H, W, K) -> None:
    x, w = _inputs(B, C, H, W, K, grad=True)
    assert torch.autograd.gradcheck(adaptive_conv_reference, (x, w), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("B,C,H,W,K", SHAPES[:4])
def test_gradients_match_naive_autograd(B, C, H, W, K) -> None:
    x, w = _inputs(B, C, H, W, K, grad=True, seed=1)
    go = torch.randn(B, C, H, W, dtype=torch.float64)
    gx, gw = torch.autograd.grad(adaptive_conv_reference(x, w), (x, w), go)
    nx, nw = torch.autograd.grad(naive_adaptive_conv(x, w), (x, w), go)
    torch.testing.assert_close(gx, nx, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw, nw, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def grads_k7():
    x, w = _inputs(2, 3, 5, 6, 7, grad=True, seed=2)
    go = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    ours = torch.autograd.grad(adaptive_conv_reference(x, w), (x, w), go)[1]
    naive = torch.autograd.grad(naive_adaptive_conv(x, w), (x, w), go)[1]
    return ours, naive


@pytest.mark.parametrize("tap", range(49))
def test_every_tap_gets_its_filter_gradient(grads_k7, tap: int) -> None:
    # FeatUp's CUDA filter-gradient kernel leaves 42 of 49 taps at zero; check each tap separately
    ours, naive = grads_k7
    i, j = divmod(tap, 7)
    assert naive[..., i, j].abs().max() > 0.1
    torch.testing.assert_close(ours[..., i, j], naive[..., i, j], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_inputs_accumulate_in_float32(dtype) -> None:
    x, w = _inputs(1, 6, 7, 5, 5, dtype=torch.float32, seed=3)
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = adaptive_conv_reference(x, w)
    assert out.dtype == dtype
    exact = naive_adaptive_conv(x.double(), w.double())
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=tol * (exact.abs().max().item() + 1))
    out.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_only_requested_gradients_are_computed() -> None:
    x, w = _inputs(1, 2, 3, 3, 3)
    w.requires_grad_()
    (gw,) = torch.autograd.grad(adaptive_conv_reference(x, w).sum(), (w,))
    assert gw.shape == w.shape and x.grad is None


def test_deterministic() -> None:
    x, w = _inputs(2, 9, 6, 7, 3, dtype=torch.float32, grad=True, seed=4)
    runs = []
    for _ in range(2):
        x.grad = w.grad = None
        out = adaptive_conv_reference(x, w)
        out.square().sum().backward()
        runs.append((out.detach().clone(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "x_shape,w_shape",
    [
        ((1, 2, 6, 6), (1, 4, 4, 3, 4)),  # non-square taps
        ((1, 2, 6, 6), (1, 4, 4, 2, 2)),  # even K
        ((1, 2, 7, 6), (1, 4, 4, 3, 3)),  # x not padded by K-1
        ((2, 2, 6, 6), (1, 4, 4, 3, 3)),  # batch mismatch
        ((2, 6, 6), (1, 4, 4, 3, 3)),  # x rank
    ],
)
def test_bad_shapes_raise_one_clear_error(x_shape, w_shape) -> None:
    with pytest.raises(KernelInputError) as info:
        adaptive_conv(torch.zeros(x_shape), torch.zeros(w_shape))
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "adaptive_conv" in str(info.value)


# ------------------------------------------------------------------------------------------------ JBU weights
def _jbu_inputs(B=2, C=3, D=4, H=5, W=6, K=5, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g, dtype=dtype)
    keys = torch.randn(B, D, H + K - 1, W + K - 1, generator=g, dtype=dtype)
    temperature = torch.tensor(0.7, dtype=dtype)
    spatial = torch.rand(K, K, generator=g, dtype=dtype) + 0.05
    return x, keys, temperature, spatial


def test_jbu_weights_match_naive_definition() -> None:
    _, keys, t, s = _jbu_inputs()
    w = jbu_weights_reference(keys, t, s)
    torch.testing.assert_close(w, naive_jbu_weights(keys, t, s), rtol=0, atol=1e-12)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(w.shape[:3], dtype=w.dtype))


def test_jbu_weights_renormalisation_is_clamped() -> None:
    _, keys, t, s = _jbu_inputs(K=3)
    w = jbu_weights_reference(keys, t, torch.full_like(s, 1e-12))  # sum of taps < 1e-7: divided by 1e-7
    assert w.sum((-1, -2)).max() < 1e-4


def test_jbu_weights_gradcheck_float64() -> None:
    _, keys, t, s = _jbu_inputs(B=1, D=2, H=3, W=4, K=3)
    keys.requires_grad_(), t.requires_grad_(), s.requires_grad_()
    assert torch.autograd.gradcheck(jbu_weights_reference, (keys, t, s), eps=1e-6, atol=1e-8)


def test_jbu_fused_equals_adaptive_conv_of_the_weights_and_has_gradients() -> None:
    x, keys, t, s = _jbu_inputs()
    for v in (x, keys, t, s):
        v.requires_grad_()
    out = jbu_fused(x, keys, t, s)
    torch.testing.assert_close(out, naive_adaptive_conv(x, naive_jbu_weights(keys, t, s)), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, keys, t, s))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_jbu_fused_inference_row_blocks_match(monkeypatch) -> None:
    x, keys, t, s = _jbu_inputs(H=11, W=4)
    with torch.no_grad():
        whole = jbu_fused_reference(x, keys, t, s)
        monkeypatch.setattr(ref_module, "FUSED_ROW_BLOCK_BYTES", 1)  # one output row per block
        blocked = jbu_fused_reference(x, keys, t, s)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-12)


def test_jbu_accepts_float_temperature_and_rejects_bad_spatial() -> None:
    x, keys, _, s = _jbu_inputs(K=3)
    torch.testing.assert_close(jbu_fused(x, keys, 0.7, s), jbu_fused(x, keys, torch.tensor(0.7, dtype=x.dtype), s))
    with pytest.raises(KernelInputError):
        jbu_fused(x, keys, 0.7, torch.ones(3, 4))
    with pytest.raises(KernelInputError):
        jbu_fused(x[:, :, :-1], keys, 0.7, s)


# ---------------------------------------------------------------------------------------------------- dispatch
def test_cpu_dispatch(monkeypatch) -> None:
    monkeypatch.delenv("FEATUP_KERNELS_BACKEND", raising=False)
    x, w = _inputs(1, 2, 3, 3, 3)
    assert backend_for(x) == "torch"  # float64: the reference
    expected = "cpu" if _cpu_compiled.available() else "torch"
    assert backend_for(x.float()) == expected, _cpu_compiled.unavailable_reason()
    torch.testing.assert_close(adaptive_conv(x, w), adaptive_conv_reference(x, w), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- compiled CPU path (float32)
@pytest.fixture(scope="module")
def cpu_lib():
    if not _cpu_compiled.available():
        pytest.skip(f"compiled CPU path unavailable: {_cpu_compiled.unavailable_reason()}")


@pytest.mark.parametrize("B,C,H,W,K", SHAPES)
def test_compiled_cpu_path_matches_reference(cpu_lib, B, C, H, W, K) -> None:
    x, w = _inputs(B, C, H, W, K, grad=True, seed=7)
    go = torch.randn(B, C, H, W, dtype=torch.float64)
    ref = adaptive_conv_reference(x, w)
    ref_grads = torch.autograd.grad(ref, (x, w), go)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    out = _cpu_compiled.adaptive_conv_cpu(xf, wf)
    grads = torch.autograd.grad(out, (xf, wf), go.float())
    for name, got, want in (("out", out, ref), ("grad_x", grads[0], ref_grads[0]), ("grad_w", grads[1], ref_grads[1])):
        torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=1e-5 * (want.abs().max().item() + 1),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def compiled_grads_k7(cpu_lib):
    x, w = _inputs(2, 3, 5, 6, 7, grad=True, seed=2)
    go = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    naive = torch.autograd.grad(naive_adaptive_conv(x, w), (x, w), go)[1]
    wf = w.detach().float().requires_grad_()
    ours = torch.autograd.grad(_cpu_compiled.adaptive_conv_cpu(x.detach().float(), wf), wf, go.float())[0]
    return ours, naive


@pytest.mark.parametrize("tap", range(49))
def test_compiled_cpu_path_every_tap(compiled_grads_k7, tap: int) -> None:
    ours, naive = compiled_grads_k7
    i, j = divmod(tap, 7)
    torch.testing.assert_close(ours[..., i, j].double(), naive[..., i, j], rtol=0, atol=1e-5)


def _start_python(code: str, **env: str) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **env), cwd=str(__import__("pathlib").Path(kernels.__file__).parents[1]))


def _result(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.strip()


def test_cpu_library_can_be_disabled_and_a_failed_build_falls_back(tmp_path) -> None:
    # also: importing and using kernels on CPU never imports CuPy or the CuPy backend
    code = (
        "import sys, torch, kernels\n"
        "from kernels import _cpu_compiled\n"
        "x = torch.randn(1, 2, 5, 5); w = torch.randn(1, 3, 3, 3, 3)\n"
        "out = kernels.adaptive_conv(x, w)\n"
        "assert torch.allclose(out, kernels.adaptive_conv_reference(x, w))\n"
        "kernels.jbu_fused(x, x, 1.0, torch.ones(3, 3))\n"
        "assert 'cupy' not in sys.modules and 'kernels._cupy' not in sys.modules\n"
        "print(kernels.backend_for(x), '|', _cpu_compiled.unavailable_reason())\n"
    )
    disabled = _start_python(code, FEATUP_KERNELS_COMPILE="0")  # both at once: each pays a torch import
    failing = _start_python(code, CXX="false", FEATUP_KERNELS_CACHE=str(tmp_path))
    assert _result(disabled) == "torch | FEATUP_KERNELS_COMPILE=0"
    out = _result(failing)
    assert out.startswith("torch | build failed"), out


def test_backend_switch(monkeypatch) -> None:
    x = torch.zeros(1, 1, 3, 3)
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "torch")
    assert backend_for(x) == "torch"
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "cupy")
    with pytest.raises(KernelBackendError, match="CUDA"):
        backend_for(x)
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "cpu")
    with pytest.raises(KernelBackendError, match="float32"):
        backend_for(x.double())
    monkeypatch.setenv("FEATUP_KERNELS_BACKEND", "triton")
    with pytest.raises(KernelBackendError, match="FEATUP_KERNELS_BACKEND"):
        backend_for(x)


def test_public_names() -> None:
    for name in kernels.__all__:
        assert getattr(kernels, name) is not None


def test_bench_worker_measures_each_method() -> None:
    from kernels import bench

    for method in ("ours", "torch", "unfold", "bilinear"):
        r = bench._cpu_worker({"method": method, "size": 8, "C": 4, "K": 3, "backward": True, "warmup": True})
        assert r["seconds"] > 0 and r["peak_bytes"] >= 0, (method, r)


def test_bench_summary_reports_the_fused_kernels_and_the_stack_target(capsys) -> None:
    from kernels import bench

    row = lambda ms, mib: {"seconds": ms / 1e3, "peak_bytes": mib * 2**20}  # noqa: E731
    cases = {
        "fused JBU 448x448 float16 inference": {"fused vectorised (cupy)": row(2.0, 150),
                                                "fused scalar (cupy)": row(3.9, 148)},
        "fused JBU 448x448 float32 inference": {"fused scalar (cupy)": row(3.0, 290)},
        "jbu stack": {"kernels JBU stack (fused, keys given)": row(4.9, 470)},
    }
    bench._summary({"device": "cuda", "C": 384, "K": 7, "cases": cases})
    out = capsys.readouterr().out
    assert "float32 scalar 3.00 ms, float16 scalar 3.90 ms, float16 vectorised 2.00 ms" in out
    assert "fp16 fwd <= 5 ms and <= 0.5 GB): MET (4.9 ms, 470 MiB)" in out
    cases["jbu stack"] = {"x": row(4.9, 480)}  # 503 MB > 0.5 GB
    bench._summary({"device": "cuda", "C": 384, "K": 7, "cases": cases})
    assert "MISSED" in capsys.readouterr().out
