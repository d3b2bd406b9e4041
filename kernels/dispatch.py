"""Device dispatch for the JBU ops.

Backends: ``"cupy"`` (CUDA kernels), ``"cpu"`` (the compiled float32 CPU library, ``kernels/_cpu_compiled.py``),
``"torch"`` (the pure-torch reference, any device and dtype).

Environment switch ``FEATUP_KERNELS_BACKEND``:

- ``auto`` (default): CUDA tensor in float16/bfloat16/float32 with CuPy importable -> ``"cupy"``; float32 CPU tensor
  with the CPU library built (or buildable: a few seconds once, then cached on disk) -> ``"cpu"``; else ``"torch"``.
- ``torch``: always the pure-torch reference.
- ``cupy`` / ``cpu``: always that backend; inputs it cannot take, or a missing CuPy / compiler, raise
  :class:`~kernels.errors.KernelBackendError`.

``FEATUP_KERNELS_COMPILE=0`` disables building the CPU library (``auto`` then picks ``"torch"`` on CPU).
Importing this module needs no GPU, compiler or CuPy; CuPy is imported on the first CUDA call only.
"""
from __future__ import annotations

import functools
import os

import torch

from .errors import KernelBackendError
from .reference import (
    adaptive_conv_reference,
    check_adaptive_conv_inputs,
    check_jbu_inputs,
    jbu_fused_reference,
    jbu_weights_reference,
)

ENV_BACKEND = "FEATUP_KERNELS_BACKEND"
_BACKENDS = ("auto", "torch", "cupy", "cpu")
#: dtypes the CUDA sources are instantiated for (float64 CUDA tensors take the torch path).
CUPY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """True when ``import cupy`` works (cached; the import happens on first call, never at module import)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _requested_backend() -> str:
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise KernelBackendError(f"{ENV_BACKEND}={value!r} is not one of {', '.join(_BACKENDS)}; unset it or pick one")
    return value


def backend_for(x: torch.Tensor) -> str:
    """Name of the backend that ``adaptive_conv``/``jbu_fused`` use for a tensor like ``x``.

    Returns:
        ``"cupy"``, ``"cpu"`` or ``"torch"``. On a float32 CPU tensor in ``auto`` mode the first call may build the
        CPU library (seconds, once per machine).

    Raises:
        KernelBackendError: ``FEATUP_KERNELS_BACKEND=cupy`` (or ``cpu``) but x does not suit that backend, or CuPy
            (the compiler) is missing; or the variable holds an unknown value.
    """
    requested = _requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "cpu":
        from . import _cpu_compiled

        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise KernelBackendError(f"{ENV_BACKEND}=cpu takes float32 CPU tensors, got {x.dtype} on {x.device}")
        if not _cpu_compiled.available():
            raise KernelBackendError(
                f"{ENV_BACKEND}=cpu but the CPU library is unavailable ({_cpu_compiled.unavailable_reason()})"
            )
        return "cpu"
    usable = x.is_cuda and x.dtype in CUPY_DTYPES
    if requested == "cupy":
        if not x.is_cuda:
            raise KernelBackendError(f"{ENV_BACKEND}=cupy needs CUDA tensors, got one on {x.device}; unset it for CPU")
        if x.dtype not in CUPY_DTYPES:
            raise KernelBackendError(f"{ENV_BACKEND}=cupy supports float32/float16/bfloat16, got {x.dtype}")
        if not cupy_available():
            raise KernelBackendError(f"{ENV_BACKEND}=cupy but CuPy does not import; pip install cupy-cuda13x")
        return "cupy"
    if usable and cupy_available():
        return "cupy"
    if x.device.type == "cpu" and x.dtype == torch.float32:
        from . import _cpu_compiled

        if _cpu_compiled.available():
            return "cpu"
    return "torch"


def adaptive_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel adaptive convolution shared by all channels (the JBU weighted sum), differentiable in x and w.

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` features padded by ``r = (K-1)/2``.
        w: ``(B, H, W, K, K)`` per-pixel taps, K odd (3..15 on CUDA).

    Returns:
        ``(B, C, H, W)`` in x's dtype, ``out[b,c,y,x] = sum_ij w[b,y,x,i,j] * x[b,c,y+i,x+j]``; on CUDA (CuPy) w is
        cast to x's dtype and every sum accumulates in float32.

    Raises:
        KernelInputError: shapes that do not fit the contract.
        KernelBackendError: see :func:`backend_for`.
    """
    check_adaptive_conv_inputs(x, w)
    backend = backend_for(x)
    if backend == "cupy":
        from ._cupy import adaptive_conv_cupy

        return adaptive_conv_cupy(x, w)
    if backend == "cpu":
        from ._cpu_compiled import adaptive_conv_cpu

        return adaptive_conv_cpu(x, w.to(x.dtype))
    return adaptive_conv_reference(x, w)


def jbu_fused(
    x: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | float, spatial: torch.Tensor
) -> torch.Tensor:
    """JBU weighted sum with the range kernel computed from the keys, without storing the weights when it can.

    Weights: ``softmax_ij(temperature * <keys[:, y+r, x+r], keys[:, y+i, x+j]>) * spatial[i, j]``, renormalised over
    the taps (sum clamped >= 1e-7); see :func:`kernels.jbu_weights_reference`.

    - CUDA/CuPy, no gradient needed: one fused kernel computes the weights per pixel (in shared memory) and the
      weighted sum; the ``(B, H, W, K, K)`` weights never reach global memory.
    - CUDA/CuPy with gradients: weights by ``jbu_weights_reference`` (torch autograd), sum by the CuPy
      ``adaptive_conv`` (its backward kernels), i.e. the backward recomputes nothing but stores the weights.
    - CPU / torch: :func:`kernels.jbu_fused_reference` (row-blocked weights under ``no_grad``), with the sum done by
      the compiled CPU library where :func:`backend_for` picks it.

    Args:
        x: ``(B, C, H+K-1, W+K-1)`` features padded by r.
        keys: ``(B, D, H+K-1, W+K-1)`` keys padded by r.
        temperature: 0-d tensor (or float) multiplying the logits.
        spatial: ``(K, K)`` non-negative spatial kernel.

    Returns:
        ``(B, C, H, W)`` in x's dtype.
    """
    K, temperature = check_jbu_inputs(x, keys, temperature, spatial)
    backend = backend_for(x)
    if backend == "cpu":
        return jbu_fused_reference(x, keys, temperature, spatial, conv=adaptive_conv)
    if backend != "cupy":
        return jbu_fused_reference(x, keys, temperature, spatial)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, keys, temperature, spatial))
    if needs_grad:
        from ._cupy import adaptive_conv_cupy

        return adaptive_conv_cupy(x, jbu_weights_reference(keys, temperature, spatial))
    from ._cupy import jbu_fused_cupy

    return jbu_fused_cupy(x, keys, temperature, spatial)
