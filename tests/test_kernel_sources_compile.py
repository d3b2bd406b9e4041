"""The CUDA sources compile for every dtype instantiation, without a GPU, and their index arithmetic is right.

1. NVRTC (``cuda.bindings.nvrtc``, what CuPy uses at run time) compiles the exact text CuPy gets, with every
   template instantiation CuPy asks for, to CUBIN for sm_80 and sm_90 (so ptxas also checks the inline PTX).
2. ``nvcc -cubin`` compiles the files as they are on disk (with their ``#include``), all instantiations.
3. Host emulation: g++ builds the kernels for the CPU (``tests/_kernels_host_emulation.cpp`` runs every block and
   thread in turn) and we launch them with the *same grid geometry* the CuPy backend uses, comparing with the torch
   reference. This checks indexing, bounds, grid-stride loops and the tap layout without a GPU.
4. The vectorised fused kernel (``jbu_fused_forward_vec``) against the scalar one (``jbu_fused_forward``), both
   emulated: the same bits in every dtype (their float32 sums run in the same order), on shapes and pointer offsets
   that select each load path (16-byte key chunks or one channel at a time; x column pairs or scalar), with the
   emulation's counters proving which path ran and that no vector load was misaligned.

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
from kernels.reference import keys_channel_last
from kernels._sources import (
    CUDA_TYPES,
    FUSED_VEC_FIXED_K,
    KERNELS,
    SOURCE_DIR,
    launch_geometry,
    load_source,
    name_expressions,
    template_k,
)

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
    per_type = sum(1 + len(FUSED_VEC_FIXED_K) * (k == "jbu_fused_forward_vec") for k in KERNELS[source])
    assert len(exprs) == per_type * len(CUDA_TYPES) == len(set(exprs))
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
def _build_emulator(source_dir: Path, lib: Path) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the host emulation of the CUDA kernels")
    proc = subprocess.run(
        [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-DFEATUP_HOST_EMULATION", f"-I{source_dir}",
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
    dll.featup_emu_counters.restype = None
    return dll


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> ctypes.CDLL:
    return _build_emulator(SOURCE_DIR, tmp_path_factory.mktemp("emu") / "featup_emu.so")


def _counters(dll) -> dict[str, int]:
    """Read and reset the emulation's counters (see tests/_kernels_host_emulation.cpp)."""
    buf = (ctypes.c_longlong * 5)()
    dll.featup_emu_counters(buf)
    return dict(zip(("misaligned", "keys_vec", "keys_scalar", "x_pairs", "x_scalar"), buf))


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


# ------------------------------------------------------------------------------ vectorised fused kernel vs scalar
def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element past an aligned allocation."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % (2 * t.element_size()) != 0
    return out


# (B, C, D, H, W, K, keys_layout, x_offset): keys_layout "padded" = keys_channel_last (what the CuPy backend
# passes), "unpadded" = channel-last with D as given, "offset" = padded but one element off 16-byte alignment.
# W+K-1 even and x aligned -> x column pairs; otherwise scalar x (odd W also leaves the last thread without pixel B).
VEC_CASES = [
    (2, 70, 32, 5, 36, 3, "padded", False),   # both vector paths, channel tail (70 = 64 + 4 + 2), 2 batch items
    (1, 9, 5, 9, 34, 5, "padded", False),     # D=5 padded to a whole chunk; H not a multiple of the block's rows
    (1, 6, 16, 4, 33, 7, "padded", False),    # odd W: scalar x, pixel B missing in the last column
    (1, 5, 12, 3, 10, 7, "unpadded", False),  # D=12: whole chunks for float (4), not for 16-bit (8) -> per type
    (1, 7, 3, 6, 12, 3, "unpadded", False),   # D=3: keys one channel at a time, x pairs
    (1, 4, 8, 5, 14, 5, "offset", True),      # misaligned keys and x: both scalar fallbacks
    (1, 3, 8, 3, 10, 1, "padded", False),     # K=1: one tap, the pair (0, 1) serves A's tap 0 and B's tap 0
    (1, 5, 8, 3, 20, 15, "padded", False),    # K=15: 16-thread-wide blocks (2*32*225 floats exceed 48 KB)
    (1, 130, 4, 2, 66, 7, "padded", False),   # three channel chunks, grid.z stride loop (grid.z capped at 3)
]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("B,C,D,H,W,K,keys_layout,x_offset", VEC_CASES)
def test_emulated_jbu_fused_vec_equals_scalar_kernel(emulator, dtype, B, C, D, H, W, K, keys_layout, x_offset) -> None:
    g = torch.Generator().manual_seed(C * 7 + D * 3 + K + W)
    x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to(dtype)
    keys = (0.5 * torch.randn(B, D, H + K - 1, W + K - 1, generator=g)).to(dtype)
    temperature = torch.tensor(1.3).reshape(1)
    spatial = torch.rand(K, K, generator=g) + 0.05
    dims = dict(B=B, C=C, H=H, W=W, K=K)
    ints = [B, C, D, H, W, K, launch_geometry("jbu_fused_forward", **dims)[3]]

    scalar = torch.full((B, C, H, W), float("nan"), dtype=dtype)
    _emulate(emulator, "jbu_fused_forward", dtype, dims, [x, keys, temperature, spatial, scalar], ints)
    _counters(emulator)

    if keys_layout == "unpadded":
        kcl = keys.permute(0, 2, 3, 1).contiguous()
    else:
        kcl = keys_channel_last(keys, dtype)
        if keys_layout == "offset":
            kcl = _misaligned(kcl)
    xin = _misaligned(x) if x_offset else x
    # the run-time-K instantiation, the compile-time-K one where it exists, and an odd channels-per-step count
    variants = [(0, None)] + [(K, None)] * (K in FUSED_VEC_FIXED_K) + [(template_k("jbu_fused_forward_vec", K), 6)]
    results = []
    for kc, cpb in variants:
        vdims = dict(dims, channels_per_block=cpb)
        vec_ints = [B, C, kcl.shape[-1], H, W, K, launch_geometry("jbu_fused_forward_vec", **vdims)[3], kc]
        vec = torch.full((B, C, H, W), float("nan"), dtype=dtype)
        _emulate(emulator, "jbu_fused_forward_vec", dtype, vdims, [xin, kcl, temperature, spatial, vec], vec_ints)
        results.append(((kc, cpb), vec))
    counts = _counters(emulator)

    per_chunk = 16 // x.element_size()
    keys_vec = keys_layout != "offset" and kcl.shape[-1] % per_chunk == 0
    x_pairs = not x_offset and (W + K - 1) % 2 == 0
    assert counts["misaligned"] == 0, counts
    assert (counts["keys_vec"] > 0, counts["keys_scalar"] > 0) == (keys_vec, not keys_vec), counts
    assert (counts["x_pairs"] > 0, counts["x_scalar"] > 0) == (x_pairs, not x_pairs), counts
    for (kc, cpb), vec in results:
        what = f"K={K} compiled as {kc}, {cpb or 'default'} channels per step"
        assert not vec.isnan().any(), f"{what}: an output element was never written"
        diff = (vec.float() - scalar.float()).abs().max().item()
        assert torch.equal(vec, scalar), f"{what}: max |vec - scalar| = {diff}"
    ref = jbu_fused_reference(x.float(), keys.float(), temperature.reshape(()), spatial)
    vec = results[0][1]
    torch.testing.assert_close(vec.float(), ref, atol=TOL[dtype] * (ref.abs().max().item() + 1.0), rtol=0)


def test_emulated_alignment_counter_catches_an_unchecked_vector_path(tmp_path: Path) -> None:
    # mutation: drop x's alignment test, so a misaligned x takes the pair path; x86 would not fault, the counter must
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    for f in SOURCE_DIR.glob("*.cu*"):
        (tmp_path / f.name).write_text(f.read_text())
    src = (tmp_path / "jbu_fused.cu").read_text()
    check = "featup_aligned(x, 2 * (int)sizeof(T))"
    assert src.count(check) == 1
    (tmp_path / "jbu_fused.cu").write_text(src.replace(check, "true"))
    dll = _build_emulator(tmp_path, tmp_path / "mutant.so")
    x = _misaligned(torch.randn(1, 2, 4, 8).to(torch.float16))
    kcl = keys_channel_last(torch.randn(1, 8, 4, 8).to(torch.float16), torch.float16)
    out = torch.empty(1, 2, 2, 6, dtype=torch.float16)
    _emulate(dll, "jbu_fused_forward_vec", torch.float16, dict(B=1, C=2, H=2, W=6, K=3),
             [x, kcl, torch.ones(1), torch.ones(3, 3), out], [1, 2, 8, 2, 6, 3, 2, 3])
    counts = _counters(dll)
    assert counts["x_pairs"] > 0 and counts["misaligned"] > 0, counts


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_cupy_fused_launch_arguments_run_the_emulated_kernels(emulator, monkeypatch, dtype) -> None:
    # the CuPy backend's host side (keys layout, padded key dim, channels per block, argument order) driven into the
    # emulated kernels: CuPy is stubbed, _launch runs the emulation with the arguments the backend built
    import importlib
    import sys
    import types

    import kernels

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.delitem(sys.modules, "kernels._cupy", raising=False)
    try:
        mod = importlib.import_module("kernels._cupy")
        launched = []

        def fake_launch(source, name, launch_dtype, dims, args, device):
            assert source == "jbu_fused.cu" and launch_dtype == dtype
            grid, block, _, _ = launch_geometry(name, **dims, max_grid_z=3)  # dims may set channels_per_block
            launched.append(name)
            rc = emulator.featup_launch(
                name.encode(), CUDA_TYPES[str(dtype).removeprefix("torch.")].encode(),
                (ctypes.c_int * 3)(*grid), (ctypes.c_int * 3)(*block),
                (ctypes.c_void_p * 5)(*[int(a) for a in args[:5]]),
                (ctypes.c_int * 8)(*[int(a) for a in args[5:]], template_k(name, dims["K"]) or 0),
            )
            assert rc == 0

        monkeypatch.setattr(mod, "_check_cuda", lambda x, K: None)
        monkeypatch.setattr(mod, "_launch", fake_launch)
        g = torch.Generator().manual_seed(11)
        B, C, D, H, W, K = 2, 67, 6, 5, 18, 5
        x = torch.randn(B, C, H + K - 1, W + K - 1, generator=g).to(dtype)
        keys = torch.randn(B, D, H + K - 1, W + K - 1, generator=g)  # float32: the backend casts to x's dtype
        t, s = torch.tensor(0.9), torch.rand(K, K, generator=g) + 0.05
        outs = {v: mod.jbu_fused_cupy(x, keys, t, s, vectorized=v) for v in (None, True, False)}
        outs["cpb"] = mod.jbu_fused_cupy(x, keys, t, s, vectorized=True, channels_per_block=10)
        default = "jbu_fused_forward" if dtype == torch.float32 else "jbu_fused_forward_vec"
        assert launched == [default, "jbu_fused_forward_vec", "jbu_fused_forward", "jbu_fused_forward_vec"]
        for v in (None, True, "cpb"):
            assert torch.equal(outs[v], outs[False]), v
        ref = jbu_fused_reference(x.float(), keys.to(dtype).float(), t, s)
        torch.testing.assert_close(outs[None].float(), ref, atol=TOL[dtype] * (ref.abs().max().item() + 1), rtol=0)
    finally:
        sys.modules.pop("kernels._cupy", None)
        if hasattr(kernels, "_cupy"):
            delattr(kernels, "_cupy")


@pytest.mark.parametrize("K", range(1, 16, 2))
def test_fused_launch_geometry_fits_48kb_and_covers_the_image(K: int) -> None:
    # dynamic shared memory above 48 KB needs an opt-in the backend does not make: every K must fit
    for kernel, px_per_thread in (("jbu_fused_forward", 1), ("jbu_fused_forward_vec", 2)):
        for W, H in ((1, 1), (448, 448), (35, 9)):
            grid, block, shared, cpb = launch_geometry(kernel, B=1, C=384, H=H, W=W, K=K)
            assert 0 < shared <= 48 * 1024, (kernel, K, shared)
            assert shared == 4 * K * K * px_per_thread * block[0] * block[1]
            assert grid[0] * block[0] * px_per_thread >= W and grid[1] * block[1] >= H
            assert block[0] * block[1] <= 1024 and cpb == 64
    assert launch_geometry("jbu_fused_forward_vec", B=1, C=384, H=8, W=8, K=K, channels_per_block=1000)[3] == 384
