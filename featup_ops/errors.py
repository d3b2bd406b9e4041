"""The one home of ``featup_ops``' exceptions.

Every class subclasses :class:`FeatupError` (catch everything from this package with one ``except``) *and* the
builtin it refines, so callers that already catch ``ValueError`` or ``FileNotFoundError`` keep working. Messages are
one line naming the offending thing and the fix.
"""
from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "FeatupError",
    "InputSizeError",
    "UnknownBackboneError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
]


class FeatupError(Exception):
    """Base class of every error raised by ``featup_ops``."""


class UnknownBackboneError(FeatupError, ValueError):
    """A backbone name that is neither a preset nor a timm model whose dense features can be taken."""


class WeightsNotFoundError(FeatupError, FileNotFoundError):
    """Backbone weights that cannot be had here (missing file, not in the HF cache while offline, package absent)."""


class WeightsMismatchError(FeatupError, ValueError):
    """A weights file whose tensors do not fit the backbone (missing/unexpected keys, shape mismatches)."""


class CheckpointError(FeatupError, ValueError):
    """An upsampler checkpoint that is corrupted, of an unknown kind, or does not fit the upsampler it describes."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An upsampler checkpoint directory (or one of its two files) that does not exist."""


class InputSizeError(FeatupError, ValueError):
    """An input whose shape a backbone or upsampler cannot take (e.g. H, W not multiples of the stride)."""


class ConfigError(FeatupError, ValueError):
    """A configuration value out of its valid range."""
