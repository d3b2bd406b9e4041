"""Exact pure-torch JBU adaptive conv: the CPU path and the oracle for every other implementation.

``out[b,c,y,x] = sum_ij w[b,y,x,i,j] * x[b,c,y+i,x+j]``

Memory-light by construction: the sum runs tap by tap over shifted *views* of ``x`` (no ``unfold``, which would
copy ``x`` K*K times: ~3.8 GB at C=384, 224^2, K=7, fp32), and over blocks of channels so that the running sum of
one block stays in the CPU's L2 cache. Backward is written out explicitly per tap (``torch.autograd.Function``)
instead of letting autograd differentiate 49 slicing ops, which would allocate a full-size zero tensor per tap:

- grad_x[b,c,y+i,x+j] += gO[b,c,y,x] * w[b,y,x,i,j]   (shifted in-place accumulation per tap)
- grad_w[b,y,x,i,j]    = sum_c gO[b,c,y,x] * x[b,c,y+i,x+j]   (per-tap product reduced over a channel block)

Half-precision inputs (float16/bfloat16) are computed in float32 and cast back, like the CUDA kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .errors import KernelInputError

#: Bytes of one channel block's running sum. Measured at C=384, 224^2 on this 2-core machine: blocks of 1.6-13 MB
#: run within 10% of each other when the machine is idle (the block stays in L2/L3 while 49 taps stream over it;
#: one whole-tensor pass per tap is ~25% slower). Under CPU oversubscription every op pays a thread-pool barrier,
#: so fewer, larger blocks win: 8 MiB is the largest size that kept the idle-machine speed.
BLOCK_BYTES = 8 * 1024 * 1024

#: Lower clamp of the tap-weight sum before renormalising (FeatUp's value).
RENORM_EPS = 1e-7

#: Bytes of the (B, rows, W, K*K) weights held at once by the row-blocked inference path of ``jbu_fused_reference``.
FUSED_ROW_BLOCK_BYTES = 64 * 1024 * 1024

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def check_adaptive_conv_inputs(x: torch.Tensor, w: torch.Tensor) -> int:
    """Validate ``adaptive_conv`` inputs; returns K.

    Raises:
        KernelInputError: wrong rank, non-square or even taps, spatial sizes that disagree, batch/device mismatch.
    """
    if x.dim() != 4:
        raise KernelInputError(f"adaptive_conv: x must be (B, C, H+K-1, W+K-1), got shape {tuple(x.shape)}")
    if w.dim() != 5:
        raise KernelInputError(f"adaptive_conv: w must be (B, H, W, K, K), got shape {tuple(w.shape)}")
    B, H, W, K, K2 = w.shape
    if K != K2 or K % 2 == 0:
        raise KernelInputError(f"adaptive_conv: taps must be square with odd K, got w taps {K}x{K2}")
    if x.shape[0] != B or x.shape[2] != H + K - 1 or x.shape[3] != W + K - 1:
        raise KernelInputError(
            f"adaptive_conv: x {tuple(x.shape)} does not match w {tuple(w.shape)}; "
            f"expected x = (B={B}, C, {H + K - 1}, {W + K - 1}) (pad x by (K-1)/2 first)"
        )
    if x.device != w.device:
        raise KernelInputError(f"adaptive_conv: x is on {x.device} but w on {w.device}; move both to one device")
    if not (x.is_floating_point() and w.is_floating_point()):
        raise KernelInputError(f"adaptive_conv: x and w must be floating point, got {x.dtype} and {w.dtype}")
    return K


def _channel_block(t: torch.Tensor) -> int:
    """Channels per block for a (B, C, H, W) tensor: L2-sized blocks on CPU, all channels on other devices."""
    B, C, H, W = t.shape[0], t.shape[1], t.shape[-2], t.shape[-1]
    if t.device.type != "cpu":  # a GPU has no per-core cache to keep the sum in; fewer, larger launches win
        return max(1, C)
    return max(1, min(C, BLOCK_BYTES // max(1, B * H * W * t.element_size())))


def _taps_first(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, K, K) -> contiguous (B, K, K, H, W): each tap's (B, H, W) map becomes one contiguous plane."""
    return w.to(dtype).permute(0, 3, 4, 1, 2).contiguous()


def _forward(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    B, C = x.shape[:2]
    K, H, W = wt.shape[1], wt.shape[3], wt.shape[4]
    out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    cb = _channel_block(out)
    for c0 in range(0, C, cb):
        o = out[:, c0 : c0 + cb]
        xb = x[:, c0 : c0 + cb]
        torch.mul(xb[:, :, 0:H, 0:W], wt[:, 0, 0].unsqueeze(1), out=o)
        for t in range(1, K * K):
            i, j = divmod(t, K)
            o.addcmul_(xb[:, :, i : i + H, j : j + W], wt[:, i, j].unsqueeze(1))
    return out


def _grad_x(g: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    B, C, H, W = g.shape
    K = wt.shape[1]
    gx = torch.zeros(B, C, H + K - 1, W + K - 1, dtype=g.dtype, device=g.device)
    cb = _channel_block(g)
    for c0 in range(0, C, cb):
        gxb = gx[:, c0 : c0 + cb]
        gb = g[:, c0 : c0 + cb]
        for i in range(K):
            for j in range(K):
                gxb[:, :, i : i + H, j : j + W].addcmul_(gb, wt[:, i, j].unsqueeze(1))
    return gx


def _grad_w(g: torch.Tensor, x: torch.Tensor, K: int) -> torch.Tensor:
    B, C, H, W = g.shape
    gwt = torch.zeros(B, K, K, H, W, dtype=g.dtype, device=g.device)
    cb = _channel_block(g)
    # Preallocated scratch: a fresh multi-MB temporary per tap costs a page-faulting mmap/munmap each time.
    prod = torch.empty(B, cb, H, W, dtype=g.dtype, device=g.device)
    tmp = torch.empty(B, H, W, dtype=g.dtype, device=g.device)
    for c0 in range(0, C, cb):
        gb = g[:, c0 : c0 + cb]
        xb = x[:, c0 : c0 + cb]
        pb = prod[:, : gb.shape[1]]
        for i in range(K):
            for j in range(K):
                torch.mul(gb, xb[:, :, i : i + H, j : j + W], out=pb)
                torch.sum(pb, dim=1, out=tmp)
                gwt[:, i, j] += tmp
    return gwt.permute(0, 3, 4, 1, 2).contiguous()


class _AdaptiveConvReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = _compute_dtype(x.dtype)
        xc = x.to(dtype).contiguous()
        wt = _taps_first(w, dtype)
        ctx.save_for_backward(xc, wt)
        ctx.dtypes = (x.dtype, w.dtype)
        return _forward(xc, wt).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        xc, wt = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g = grad_out.to(xc.dtype).contiguous()
        gx = _grad_x(g, wt).to(x_dtype) if ctx.needs_input_grad[0] else None
        gw = _grad_w(g, xc, wt.shape[1]).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def adaptive_conv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel adaptive convolution shared by all channels (pure torch, any device, differentiable in x and w).

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` features, already padded by ``r = (K-1)/2``; float16/bfloat16/float32/float64.
        w: ``(B, H, W, K, K)`` per-pixel taps (K odd), same device; cast to x's compute dtype.

    Returns:
        ``(B, C, H, W)`` in x's dtype: ``out[b,c,y,x] = sum_ij w[b,y,x,i,j] * x[b,c,y+i,x+j]``.
        float16/bfloat16 inputs are accumulated in float32.

    Raises:
        KernelInputError: shapes that do not fit the contract.
    """
    check_adaptive_conv_inputs(x, w)
    return _AdaptiveConvReference.apply(x, w)


def check_jbu_inputs(
    x: torch.Tensor | None, keys: torch.Tensor, temperature: torch.Tensor | float, spatial: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Validate ``jbu_fused`` inputs; returns ``(K, temperature as a 0-d tensor on keys' device)``.

    Raises:
        KernelInputError: wrong ranks, spatial kernel not (K, K) with odd K, sizes that disagree.
    """
    if spatial.dim() != 2 or spatial.shape[0] != spatial.shape[1] or spatial.shape[0] % 2 == 0:
        raise KernelInputError(f"jbu: spatial must be (K, K) with odd K, got shape {tuple(spatial.shape)}")
    K = spatial.shape[0]
    if keys.dim() != 4 or keys.shape[2] < K or keys.shape[3] < K:
        raise KernelInputError(
            f"jbu: keys must be (B, D, H+{K - 1}, W+{K - 1}) (padded by {(K - 1) // 2}), got {tuple(keys.shape)}"
        )
    if x is not None:
        if x.dim() != 4 or x.shape[0] != keys.shape[0] or x.shape[2:] != keys.shape[2:]:
            raise KernelInputError(
                f"jbu: x {tuple(x.shape)} and keys {tuple(keys.shape)} must share batch and padded size"
            )
        if x.device != keys.device:
            raise KernelInputError(f"jbu: x is on {x.device} but keys on {keys.device}; move both to one device")
    if not torch.is_tensor(temperature):
        temperature = torch.tensor(float(temperature), device=keys.device)
    if temperature.numel() != 1:
        raise KernelInputError(f"jbu: temperature must be a scalar (0-d tensor), got shape {tuple(temperature.shape)}")
    return K, temperature.reshape(()).to(keys.device)


def jbu_weights_reference(
    keys: torch.Tensor, temperature: torch.Tensor | float, spatial: torch.Tensor
) -> torch.Tensor:
    """The JBU layer's per-pixel taps, explicit (differentiable in keys, temperature and spatial).

    ``w[b,y,x,i,j] = s[i,j] * softmax_ij(t * <k[:, y+r, x+r], k[:, y+i, x+j]>) / max(sum_ij(...), 1e-7)``.
    The logits are built tap by tap from shifted views (no unfold copy of the keys).

    Args:
        keys: ``(B, D, H+K-1, W+K-1)`` range-projection keys, padded by ``r = (K-1)/2``.
        temperature: scalar (0-d tensor or float) multiplying the logits.
        spatial: ``(K, K)`` non-negative spatial kernel.

    Returns:
        ``(B, H, W, K, K)`` weights in float32 (float64 if keys are float64).
    """
    K, temperature = check_jbu_inputs(None, keys, temperature, spatial)
    dtype = _compute_dtype(keys.dtype)
    k = keys.to(dtype)
    B, D, Hp, Wp = k.shape
    H, W, r = Hp - K + 1, Wp - K + 1, (K - 1) // 2
    center = k[:, :, r : r + H, r : r + W]
    logits = torch.stack(
        [(center * k[:, :, i : i + H, j : j + W]).sum(1) for i in range(K) for j in range(K)], dim=1
    )
    p = torch.softmax(logits * temperature.to(dtype), dim=1)
    ws = p * spatial.to(device=k.device, dtype=dtype).reshape(1, K * K, 1, 1)
    wn = ws / ws.sum(1, keepdim=True).clamp_min(RENORM_EPS)
    return wn.permute(0, 2, 3, 1).reshape(B, H, W, K, K)


def jbu_fused_reference(
    x: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor | float,
    spatial: torch.Tensor,
    *,
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """JBU weighted sum with the weights computed from the keys (pure torch).

    With gradients it is ``adaptive_conv_reference(x, jbu_weights_reference(keys, temperature, spatial))``. Without
    gradients (inference) it runs in blocks of output rows so that at most ``FUSED_ROW_BLOCK_BYTES`` of weights exist
    at once instead of the whole ``(B, H, W, K, K)`` tensor.

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` features padded by r.
        keys: ``(B, D, H+K-1, W+K-1)`` keys padded by r.
        temperature: scalar multiplying the logits.
        spatial: ``(K, K)`` non-negative spatial kernel.
        conv: the adaptive-conv implementation for the weighted sum (default :func:`adaptive_conv_reference`).

    Returns:
        ``(B, C, H, W)`` in x's dtype.
    """
    conv = conv or adaptive_conv_reference
    K, temperature = check_jbu_inputs(x, keys, temperature, spatial)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, keys, temperature, spatial) if torch.is_tensor(t)
    )
    B, _, Hp, Wp = x.shape
    H, W = Hp - K + 1, Wp - K + 1
    row_bytes = B * W * K * K * 4
    rows = max(1, FUSED_ROW_BLOCK_BYTES // row_bytes)
    if needs_grad or rows >= H:
        return conv(x, jbu_weights_reference(keys, temperature, spatial))
    out = torch.empty(B, x.shape[1], H, W, dtype=x.dtype, device=x.device)
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        wb = jbu_weights_reference(keys[:, :, y0 : y1 + K - 1], temperature, spatial)
        out[:, :, y0:y1] = conv(x[:, :, y0 : y1 + K - 1], wb)
    return out


def keys_channel_last(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keys as the vectorised fused CUDA kernel (``jbu_fused_forward_vec``) reads them.

    Args:
        keys: ``(B, D, Hp, Wp)``.
        dtype: the kernel's element type (x's dtype).

    Returns:
        A fresh contiguous ``(B, Hp, Wp, Dv)`` tensor in ``dtype``, ``Dv`` = D rounded up to a multiple of
        ``16 // itemsize`` (8 for float16/bfloat16, 4 for float32) with the extra channels zero, so every pixel's key
        is whole 16-byte chunks. About ``Dv/D`` times the keys' size (13 MiB at 448^2, D=32, float16).
    """
    B, D, Hp, Wp = keys.shape
    per_chunk = 16 // torch.empty((), dtype=dtype).element_size()
    Dv = -(-D // per_chunk) * per_chunk
    out = torch.empty(B, Hp, Wp, Dv, dtype=dtype, device=keys.device)
    if Dv > D:
        out[..., D:].zero_()
    out[..., :D].copy_(keys.permute(0, 2, 3, 1))
    return out
