"""fsspec filesystems for local paths and ``s3://`` URIs, with the S3 endpoint taken from the environment.

s3fs (through botocore) already reads credentials from the usual AWS variables; the endpoint of an S3-compatible
server is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) unless ``storage_options`` names one, so the
same URI works against AWS, MinIO or the moto server the tests start on 127.0.0.1.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from pipeline.errors import PipelineError, StorageAccessError

__all__ = ["filesystem", "resolve_storage_options", "is_remote", "join", "describe_failure", "access_errors",
           "check_writable"]

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


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    return " ".join(str(e).split())[:limit]


def is_storage_failure(e: BaseException) -> bool:
    """True for the errors of reaching a path or object store (OSError, botocore's), not of its contents."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


def describe_failure(e: BaseException) -> str:
    """Why a storage call failed and what fixes it, in one line (botocore's errors are told apart by class name, so
    this module does not import botocore)."""
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or pass them in --storage-options")
    if name in ("EndpointConnectionError", "ConnectTimeoutError") or isinstance(e, ConnectionError):
        return f"cannot reach the storage endpoint ({_one_line(e)}); check AWS_ENDPOINT_URL and the network"
    if isinstance(e, PermissionError):
        return f"access denied ({_one_line(e)}); check the credentials' (or the folder's) permissions"
    if isinstance(e, FileNotFoundError):
        return f"not found ({_one_line(e)}); check the bucket and path"
    return f"{name}: {_one_line(e)}"


@contextmanager
def access_errors(label: str) -> Iterator[None]:
    """Re-raise a failure to reach storage inside the block as one :class:`StorageAccessError` line
    ``"<label>: <reason and fix>"``; the pipeline's own errors (some are OSErrors too) and all others pass
    unchanged."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:
        if is_storage_failure(e):
            raise StorageAccessError(f"{label}: {describe_failure(e)}") from e
        raise


def check_writable(uri: str, storage_options: dict[str, Any] | None = None, *, what: str = "--output") -> None:
    """Fail early, before any work, when ``uri`` can surely not be written.

    Object stores: the bucket must exist and answer with these credentials. Local paths: the nearest existing folder
    on the way must be a writable folder. (Permission to write into a bucket shows only on the first write.)

    Raises:
        StorageAccessError: one line naming ``what``, ``uri``, the reason and the fix.
    """
    with access_errors(f"{what} {uri!r}"):
        fs, path = filesystem(uri, storage_options)
        if is_remote(uri):
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise StorageAccessError(
                    f"{what} {uri!r}: bucket {bucket!r} does not exist; create it or choose another {what}"
                ) from None
            return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageAccessError(f"{what} {uri!r}: {existing!r} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageAccessError(f"{what} {uri!r}: folder {existing!r} is not writable; choose another {what}")
