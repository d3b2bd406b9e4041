"""The JBU adaptive-conv op: exact torch reference (the oracle), CuPy kernels on CUDA, a compiled float32 CPU path
(built on first use, falls back to the reference), dispatch; see docs/kernels.md.

``out[b,c,y,x] = sum_ij w[b,y,x,i,j] * x[b,c,y+i,x+j]`` with x ``(B,C,H+K-1,W+K-1)`` and w ``(B,H,W,K,K)``.
Importing this package needs no GPU, no compiler and no CuPy.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "adaptive_conv": "dispatch",
    "jbu_fused": "dispatch",
    "adaptive_conv_reference": "reference",
    "jbu_fused_reference": "reference",
    "jbu_weights_reference": "reference",
    "KernelError": "errors",
    "KernelInputError": "errors",
    "KernelBackendError": "errors",
    "backend_for": "dispatch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
