"""fsspec filesystems for local paths and ``s3://`` URIs, with the S3 endpoint taken from the environment.

s3fs (through botocore) already reads credentials from the usual AWS variables; the endpoint of an S3-compatible
server is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) unless ``storage_options`` names one, so the
same URI works against AWS, MinIO or the moto server the tests start on 127.0.0.1.
"""
from __future__ import annotations

import os
from typing import Any

import fsspec

__all__ = ["filesystem", "resolve_storage_options", "is_remote", "join"]

#: Environment variables holding an S3 endpoint URL, most specific first (botocore's own names).
ENDPOINT_ENV_VARS: tuple[str, ...] = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_remote(uri: str) -> bool:
    """True when ``uri`` names an object store (has a ``scheme://`` other than ``file://``)."""
    return "://" in uri and not uri.startswith("file://")


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def resolve_storage_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``uri``: ``storage_options`` plus the S3 endpoint from the environment.

    Args:
        uri: a local path or an fsspec URI (``s3://bucket/key``).
        storage_options: explicit options; they win over the environment.

    Returns:
        A new dict (never the caller's), safe to pass to ``fsspec.filesystem`` or zarr's ``FsspecStore``.
    """
    opts: dict[str, Any] = dict(storage_options or {})
    if _protocol(uri) in ("s3", "s3a"):
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if "endpoint_url" not in client_kwargs and "endpoint_url" not in opts:
            for var in ENDPOINT_ENV_VARS:
                if os.environ.get(var):
                    client_kwargs["endpoint_url"] = os.environ[var]
                    break
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that serves ``uri`` and the path inside it.

    Args:
        uri: a local path, ``file://`` URI or ``s3://bucket/key``.
        storage_options: extra fsspec options (credentials, ``client_kwargs={"endpoint_url": ...}``, ...).

    Returns:
        ``(fs, path)``: ``path`` is what to pass to ``fs`` methods (no scheme for s3, absolute for local).
    """
    protocol = _protocol(uri)
    opts = resolve_storage_options(uri, storage_options)
    fs = fsspec.filesystem(protocol, **opts)
    if protocol == "file":
        path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    else:
        path = fs._strip_protocol(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with ``/`` (object stores) or ``os.path.join`` (local)."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)
