"""Compiled CPU path for float32 ``adaptive_conv``: ``adaptive_conv_cpu.cpp`` built with g++ on first use.

Why: the pure-torch reference runs 49 ops per channel block (x3 in backward), and every torch op is a parallel
region with a thread-pool barrier; on an oversubscribed machine each barrier can cost a scheduler time slice. The C++
file does each of forward / grad_x / grad_w as ONE parallel region of vectorised row loops.

Build: plain C++17 with no torch headers (``g++ -O3 -shared``, a few seconds), cached under
``$FEATUP_KERNELS_CACHE`` (default ``~/.cache/featup_kernels``) keyed by a hash of the source, flags, compiler and
machine, written atomically so concurrent processes never load a half-written file. Nothing is built at install.
When no compiler works, or ``FEATUP_KERNELS_COMPILE=0``, :func:`available` is False and callers use the torch
reference; the reason is kept in :func:`unavailable_reason`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).resolve().parent / "adaptive_conv_cpu.cpp"
ENV_COMPILE = "FEATUP_KERNELS_COMPILE"
ENV_CACHE = "FEATUP_KERNELS_CACHE"
#: -march=native: the cache key includes the machine, so a cached build never runs on a CPU it was not built for
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_reason: str | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "featup_kernels")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get(ENV_COMPILE, "1").strip() == "0":
        _reason = f"{ENV_COMPILE}=0"
        return None
    if not SOURCE.is_file():  # e.g. an install whose package data lacks *.cpp
        _reason = f"{SOURCE.name} not found next to {__name__}"
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        _reason = "no C++ compiler (g++/c++) on PATH"
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((CXXFLAGS, cxx, platform.machine(), _cpu_model())).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"adaptive_conv_cpu_{key}.so"
    with _lock:
        if not lib.exists():
            try:
                lib.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
                os.close(fd)
                proc = subprocess.run([cxx, *CXXFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S)
                if proc.returncode != 0:
                    os.unlink(tmp)
                    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or [str(proc.returncode)]
                    _reason = f"build failed: {errors[0].strip()}"
                    return None
                os.replace(tmp, lib)  # atomic: other processes see either nothing or the whole file
            except (OSError, subprocess.SubprocessError) as e:
                _reason = f"build failed: {e}"
                return None
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError as e:
            _reason = f"cannot load {lib}: {e}"
            return None
    for name in ("featup_cpu_forward", "featup_cpu_grad_input", "featup_cpu_grad_filter"):
        fn = getattr(dll, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
    return dll


def available() -> bool:
    """True when the compiled CPU library is built (or cached) and loaded; builds it on the first call."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    return _reason


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _call(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, dims: tuple[int, ...]) -> None:
    getattr(_library(), name)(a.data_ptr(), b.data_ptr(), out.data_ptr(), *dims, _threads())


class _AdaptiveConvCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, Hp, Wp = x.shape
        _, H, W, K, _ = w.shape
        xc = x.detach().contiguous()
        wt = w.detach().permute(0, 3, 4, 1, 2).contiguous()  # taps-first (B, K, K, H, W)
        out = torch.empty(B, C, H, W, dtype=x.dtype)
        _call("featup_cpu_forward", xc, wt, out, (B, C, H, W, K))
        ctx.save_for_backward(xc, wt)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        xc, wt = ctx.saved_tensors
        B, C = xc.shape[:2]
        K, H, W = wt.shape[1], wt.shape[3], wt.shape[4]
        g = grad_out.to(torch.float32).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(xc)
            _call("featup_cpu_grad_input", g, wt, gx, (B, C, H, W, K))
        if ctx.needs_input_grad[1]:
            gwt = torch.empty_like(wt)
            _call("featup_cpu_grad_filter", g, xc, gwt, (B, C, H, W, K))
            gw = gwt.permute(0, 3, 4, 1, 2).contiguous()
        return gx, gw


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the compiled path takes these inputs: float32 CPU tensors (other dtypes use the reference)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32


def adaptive_conv_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Compiled float32 CPU adaptive conv (same contract as :func:`kernels.adaptive_conv`); call only when
    :func:`available` and :func:`supports` are True.

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` float32 CPU.
        w: ``(B, H, W, K, K)`` float32 CPU.

    Returns:
        ``(B, C, H, W)`` float32.
    """
    return _AdaptiveConvCPU.apply(x, w)
