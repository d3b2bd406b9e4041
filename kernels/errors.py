"""Errors raised by ``kernels``: each names the bad input and the fix in one line.

``kernels`` sits below ``featup_ops`` and cannot import its base error, so it has its own small hierarchy; the
classes also subclass the matching builtin (``ValueError``, ``RuntimeError``) so callers can catch either.
"""
from __future__ import annotations


class KernelError(Exception):
    """Base class of every error raised by ``kernels``."""


class KernelInputError(KernelError, ValueError):
    """A tensor given to a kernel has the wrong rank, shape, dtype or device."""


class KernelBackendError(KernelError, RuntimeError):
    """The requested backend cannot run here (e.g. CuPy forced on a CPU tensor, or CuPy missing)."""
