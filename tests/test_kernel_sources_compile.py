"""The CUDA sources compile for every dtype instantiation, without a GPU, and their index arithmetic is right.

1. NVRTC (``cuda.bindings.nvrtc``, what CuPy uses at run time) compiles the exact text CuPy gets, with every
   template instantiation CuPy asks for, to CUBIN for sm_80 and sm_90 (so ptxas also checks the inline PTX).
2. ``nvcc -cubin`` compiles the files as they are on disk (with their ``#include``), all instantiations.
3. Host emulation: g++ builds the kernels for the CPU (``tests/_kernels_host_emulation.cpp`` runs every block and
   thread in turn) and we launch them with the *same grid geometry* the CuPy backend uses, comparing with the torch
   reference. This checks indexing, bounds, grid-stride loops and the tap layout without a GPU.

A missing compiler skips with a message; a compile error fails.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kernels import adaptive_conv_reference, jbu_fused_reference
from kernels._sources import CUDA_TYPES, KERNELS, SOURCE_DIR, launch_geometry, load_source, name_expressions

HERE = Path(__file__).resolve().parent
EMULATION_CPP = HERE / "_kernels_host_emulation.cpp"
ARCHS = ("sm_80", "sm_90")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"NVRTC Python binding not importable ({e}); pip install cuda-bindings nvidia-cuda-nvrtc")
    try:
        err, _, _ = nvrtc.nvrtcVersion()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"libnvrtc not loadable ({e})")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:  # pragma: no cover
        pytest.skip(f"libnvrtc not usable: {err}")
    return nvrtc


def nvrtc_compile(code: str, exprs: list[str], arch: str) -> tuple[bool, str]:
    """Compile ``code`` with NVRTC to CUBIN for ``arch``; returns (ok, log)."""
    nvrtc = _nvrtc()
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), b"featup.cu", 0, [], [])
    assert err == ok
    try:
        for e in exprs:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, e.encode())
            assert err == ok
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        # a fresh mutable buffer: NVRTC writes into it, and `b" " * 1` would be CPython's shared one-byte object
        # (overwriting it corrupted every later b" " in the process, e.g. torch.load's unpickling)
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, log)
        if err != ok:
            return False, log.decode(errors="replace")
        for e in exprs:
            err, lowered = nvrtc.nvrtcGetLoweredName(prog, e.encode())
            if err != ok or not lowered:
                return False, f"no kernel for {e}"
        err, cubin_size = nvrtc.nvrtcGetCUBINSize(prog)
        return err == ok and cubin_size > 0, log.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_nvrtc_compiles_every_instantiation(source: str, arch: str) -> None:
    exprs = name_expressions(source)
    assert len(exprs) == len(KERNELS[source]) * len(CUDA_TYPES)
    ok, log = nvrtc_compile(load_source(source), exprs, arch)
    assert ok, f"{source} failed to compile for {arch}:\n{log}"


def test_nvrtc_check_rejects_a_syntax_error() -> None:
    broken = load_source("adaptive_conv.cu").replace("acc[cc] = 0.f;", "acc[cc] = 0.f", 1)
    ok, log = nvrtc_compile(broken, name_expressions("adaptive_conv.cu"), "sm_80")
    assert not ok and "error" in log


@pytest.mark.parametrize("source", sorted(KERNELS))
def test_nvcc_compiles_every_instantiation(source: str, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH (the NVRTC check covers the same sources)")
    refs = ", ".join(f"(void*){e}" for e in name_expressions(source))
    wrapper = tmp_path / "instantiate.cu"
    wrapper.write_text(f'#include "{source}"\nvoid* featup_instances[] = {{{refs}}};\n')
    proc = subprocess.run(
        [nvcc, "-cubin", "-arch=sm_80", "-std=c++17", f"-I{SOURCE_DIR}", str(wrapper), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr}"
    assert (tmp_path / "k.cubin").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- host emulation
@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the host emulation of the CUDA kernels")
    lib = tmp_path_factory.mktemp("emu") / "featup_emu.so"
    proc = subprocess.run(
        [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-DFEATUP_HOST_EMULATION", f"-I{SOURCE_DIR}",
         str(EMULATION_CPP), "-o", str(lib)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "_Float16" in proc.stderr:  # pragma: no cover - very old g++
        pytest.skip(f"{cxx} lacks _Float16: {proc.stderr.splitlines()[0]}")
    assert proc.returncode == 0, proc.stderr
    dll = ctypes.CDLL(str(lib))
    dll.featup_launch.restype = ctypes.c_int
    return dll


def _emulate(dll, kernel: str, dtype: torch.dtype, dims: dict, tensors: list[torch.Tensor], ints: list[int]) -> None:
    grid, block, _, _ = launch_geometry(kernel, **dims, max_grid_z=3)  # small grid.z: exercise the stride loop
    for t in tensors:
        assert t.is_contiguous()
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    rc = dll.featup_launch(
        kernel.encode(),
        CUDA_TYPES[str(dtype).removeprefix("torch.")].encode(),
        (ctypes.c_int * 3)(*grid),
        (ctypes.c_int * 3)(*block),
        ptrs,
        (ctypes.c_int * len(ints))(*ints),
    )
    assert rc == 0


TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
CASES = [(2, 5, 7, 37, 3), (1, 9, 10, 33, 5), (1, 4, 3, 4, 7)]  # (B, C, H, W, K): odd sizes, W not a multiple of 32


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("B,C,H,W,K", CASES)
def test_emulated_adaptive_conv_matches_reference(emulator, dtype, B, C, H, W, K) -> None:
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + K)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to(dtype)
    w = torch.randn(B, H, W, K, K, generator=g).to(dtype)
    go = torch.randn(B, C, H, W, generator=g).to(dtype)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    ref = adaptive_conv_reference(xr, wr)
    ref.backward(go.float())
    dims = dict(B=B, C=C, H=H, W=W, K=K)
    out = torch.full((B, C, H, W), float("nan"), dtype=dtype)
    _emulate(emulator, "adaptive_conv_forward", dtype, dims, [x, w, out], [B, C, H, W, K])
    gx = torch.full_like(x, float("nan"))
    _emulate(emulator, "adaptive_conv_grad_input", dtype, dims, [go, w, gx], [B, C, H, W, K])
    gw = torch.full_like(w, float("nan"))
    _emulate(emulator, "adaptive_conv_grad_filter", dtype, dims, [go, x, gw], [B, C, H, W, K])
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("grad_x", gx, xr.grad), ("grad_w", gw, wr.grad)):
        scale = want.abs().max().item() + 1.0
        torch.testing.assert_close(got.float(), want, atol=tol * scale, rtol=0, msg=f"{name} differs")


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("B,C,D,H,W,K", [(2, 70, 3, 5, 35, 3), (1, 3, 4, 9, 6, 7)])
def test_emulated_jbu_fused_matches_reference(emulator, dtype, B, C, D, H, W, K) -> None:
    g = torch.Generator().manual_seed(C + D + K)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to(dtype)
    keys = torch.randn(B, D, H + K - 1, W + K - 1, generator=g).to(dtype)
    temperature = torch.tensor(1.7)
    spatial = torch.rand(K, K, generator=g)
    ref = jbu_fused_reference(x.float(), keys.float(), temperature, spatial)
    dims = dict(B=B, C=C, H=H, W=W, K=K)
    cpb = launch_geometry("jbu_fused_forward", **dims)[3]
    out = torch.full((B, C, H, W), float("nan"), dtype=dtype)
    _emulate(emulator, "jbu_fused_forward", dtype, dims,
             [x, keys, temperature.reshape(1).contiguous(), spatial, out], [B, C, D, H, W, K, cpb])
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype] * scale, rtol=0)
