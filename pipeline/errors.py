"""The pipeline's exceptions: one base class, each subclass also the matching builtin.

Every message is one line naming the thing that is wrong and the fix, so a job can print it as-is.
"""
from __future__ import annotations

__all__ = [
    "PipelineError",
    "InputNotFoundError",
    "StoreMismatchError",
    "StoreError",
    "DecodeError",
    "ConfigError",
    "StorageAccessError",
    "CorruptDataError",
    "StoreBusyError",
]


class PipelineError(Exception):
    """Base class of every error raised by ``pipeline``."""


class InputNotFoundError(PipelineError, FileNotFoundError):
    """The input path, bucket or prefix is missing, unreadable or holds no images."""


class StoreMismatchError(PipelineError, ValueError):
    """An existing feature store was written with different settings than this run's."""


class StoreError(PipelineError, ValueError):
    """A feature store is malformed (missing arrays or attributes, unknown format version)."""


class StorageAccessError(PipelineError, OSError):
    """A path or object store cannot be reached or written: no credentials, unreachable endpoint, access denied,
    missing bucket, read-only folder."""


class CorruptDataError(StoreError):
    """A stored chunk failed its checksum (or could not be decoded): the message names the row, shard and fix."""


class StoreBusyError(StoreError):
    """Another job holds the store's lock (two drivers must never write one store at once)."""


class DecodeError(PipelineError, ValueError):
    """One image could not be turned into pixels; ``reason`` says why (becomes the row's ``error``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(PipelineError, ValueError):
    """A job setting is invalid (unknown policy, dtype, size not a multiple of the stride, ...)."""
