"""CuPy backend: the CUDA sources in this package compiled by NVRTC (through ``cupy.RawModule``) and launched on
torch's current stream. Imported lazily by ``kernels.dispatch`` for CUDA tensors only.

Memory stays torch's: outputs are allocated with ``torch.empty`` (so ``torch.cuda.max_memory_allocated`` sees
them) and the kernels receive the tensors' device pointers directly. That is the same zero-copy exchange DLPack
gives, without creating CuPy arrays: CuPy has no bfloat16 dtype, and no DLPack stream hand-shake is needed when
the producer and the kernel share torch's current stream. Integer arguments are ``np.int32``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._sources import CUDA_TYPES, KERNELS, MAX_K, kernel_expression, launch_geometry, load_source, name_expressions
from .errors import KernelInputError
from .reference import keys_channel_last

import cupy  # noqa: E402  (this module is only imported when CuPy is wanted)

COMPILE_OPTIONS = ("-std=c++17",)


class _StreamProtocol:
    """Minimal CUDA-stream-protocol object around a raw ``cudaStream_t`` (works whatever torch version)."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._ptr)


def _cupy_stream(device: torch.device):
    """CuPy view of torch's current stream on ``device`` (``Stream.from_external`` in CuPy >= 14)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream_cls = cupy.cuda.Stream
    if hasattr(stream_cls, "from_external"):
        return stream_cls.from_external(_StreamProtocol(ptr))
    return cupy.cuda.ExternalStream(ptr, device.index)  # CuPy < 14


@functools.lru_cache(maxsize=None)
def _module(source: str) -> "cupy.RawModule":
    return cupy.RawModule(
        code=load_source(source), options=COMPILE_OPTIONS, name_expressions=name_expressions(source)
    )


@functools.lru_cache(maxsize=None)
def _kernel(source: str, name: str, dtype: torch.dtype, K: int):
    ctype = CUDA_TYPES[str(dtype).removeprefix("torch.")]
    return _module(source).get_function(kernel_expression(name, ctype, K))


def _launch(source: str, name: str, dtype: torch.dtype, dims: dict[str, int], args: tuple, device) -> None:
    try:
        grid, block, shared_mem, _ = launch_geometry(name, **dims)
    except ValueError as e:
        raise KernelInputError(f"CuPy kernels: {e}") from None
    with cupy.cuda.Device(device.index):
        kern = _kernel(source, name, dtype, dims["K"])
        with _cupy_stream(device):  # the launch goes to CuPy's current stream = torch's current stream
            kern(grid, block, args, shared_mem=shared_mem)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _dims(*values: int) -> tuple[np.int32, ...]:
    for v in values:
        if v >= 2**31:
            raise KernelInputError(f"CuPy kernels: a dimension of {v} does not fit int32")
    return tuple(np.int32(v) for v in values)


def _forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    B, C = x.shape[:2]
    _, H, W, K, _ = w.shape
    out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _launch("adaptive_conv.cu", "adaptive_conv_forward", x.dtype, dict(B=B, C=C, H=H, W=W, K=K),
            (_ptr(x), _ptr(w), _ptr(out), *_dims(B, C, H, W, K)), x.device)
    return out


def _grad_input(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    B, C, H, W = g.shape
    K = w.shape[-1]
    gx = torch.empty(B, C, H + K - 1, W + K - 1, dtype=g.dtype, device=g.device)
    if gx.numel() == 0:
        return gx
    _launch("adaptive_conv.cu", "adaptive_conv_grad_input", g.dtype, dict(B=B, C=C, H=H, W=W, K=K),
            (_ptr(g), _ptr(w), _ptr(gx), *_dims(B, C, H, W, K)), g.device)
    return gx


def _grad_filter(g: torch.Tensor, x: torch.Tensor, K: int) -> torch.Tensor:
    B, C, H, W = g.shape
    gw = torch.empty(B, H, W, K, K, dtype=g.dtype, device=g.device)
    if gw.numel() == 0:
        return gw
    _launch("adaptive_conv.cu", "adaptive_conv_grad_filter", g.dtype, dict(B=B, C=C, H=H, W=W, K=K),
            (_ptr(g), _ptr(x), _ptr(gw), *_dims(B, C, H, W, K)), g.device)
    return gw


def _check_cuda(x: torch.Tensor, K: int) -> None:
    if not x.is_cuda:
        raise KernelInputError(f"CuPy kernels need CUDA tensors, got {x.device}")
    if K > MAX_K:
        raise KernelInputError(f"CuPy kernels support K <= {MAX_K}, got K={K}; use FEATUP_KERNELS_BACKEND=torch")
    if str(x.dtype).removeprefix("torch.") not in CUDA_TYPES:
        raise KernelInputError(f"CuPy kernels support {sorted(CUDA_TYPES)}, got {x.dtype}")


class _AdaptiveConvCuPy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xc = x.contiguous()
        wc = w.to(x.dtype).contiguous()
        ctx.save_for_backward(xc, wc)
        ctx.w_dtype = w.dtype
        return _forward(xc, wc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        xc, wc = ctx.saved_tensors
        g = grad_out.to(xc.dtype).contiguous()
        gx = _grad_input(g, wc) if ctx.needs_input_grad[0] else None
        gw = _grad_filter(g, xc, wc.shape[-1]).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def adaptive_conv_cupy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """CuPy adaptive conv (see :func:`kernels.adaptive_conv`); x, w on one CUDA device, float32/float16/bfloat16.

    Args:
        x: ``(B, C, H+K-1, W+K-1)``.
        w: ``(B, H, W, K, K)``, cast to x's dtype (its gradient is returned in w's own dtype).

    Returns:
        ``(B, C, H, W)`` in x's dtype, accumulated in float32.
    """
    _check_cuda(x, w.shape[-1])
    return _AdaptiveConvCuPy.apply(x, w)


def jbu_fused_cupy(
    x: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor,
    spatial: torch.Tensor,
    *,
    vectorized: bool | None = None,
    channels_per_block: int | None = None,
) -> torch.Tensor:
    """Fused JBU forward on CUDA (no autograd; see :func:`kernels.jbu_fused`).

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` float32/float16/bfloat16.
        keys: ``(B, D, H+K-1, W+K-1)``, cast to x's dtype.
        temperature: 0-d tensor (read on the device as float32; no host sync).
        spatial: ``(K, K)`` (read as float32).
        vectorized: ``jbu_fused_forward_vec`` (wide loads, two pixels per thread; keys copied channel-last) or
            ``jbu_fused_forward`` (one pixel per thread, scalar loads). Default: vectorised for float16/bfloat16,
            scalar for float32 (whose results stay those of the original kernel). Both give the same sums in the
            same order.
        channels_per_block: channels per z step (each step recomputes its pixels' weights); default
            ``_sources.FUSED_CHANNELS_PER_BLOCK``. For tuning (the benchmark sweeps it).

    Returns:
        ``(B, C, H, W)`` in x's dtype.
    """
    K = spatial.shape[-1]
    _check_cuda(x, K)
    B, C, Hp, Wp = x.shape
    D = keys.shape[1]
    H, W = Hp - K + 1, Wp - K + 1
    if vectorized is None:
        vectorized = x.dtype != torch.float32
    xc = x.contiguous()
    tc = temperature.detach().to(device=x.device, dtype=torch.float32).reshape(1).contiguous()
    sc = spatial.detach().to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    dims = dict(B=B, C=C, H=H, W=W, K=K, channels_per_block=channels_per_block)
    if vectorized:
        name = "jbu_fused_forward_vec"
        kc = keys_channel_last(keys, x.dtype)  # (B, Hp, Wp, D rounded up to whole 16-byte chunks)
        D = kc.shape[-1]
    else:
        name = "jbu_fused_forward"
        kc = keys.to(x.dtype).contiguous()
    cpb = launch_geometry(name, **dims)[3]
    _launch("jbu_fused.cu", name, x.dtype, dims,
            (_ptr(xc), _ptr(kc), _ptr(tc), _ptr(sc), _ptr(out), *_dims(B, C, D, H, W, K, cpb)), x.device)
    return out


def compile_all() -> None:
    """Compile every kernel instantiation now (on the current CUDA device), e.g. to time compilation apart."""
    for source in KERNELS:
        for expr in name_expressions(source):
            _module(source).get_function(expr)
