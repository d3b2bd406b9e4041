"""fsspec filesystems for local paths and ``s3://`` URIs, with the S3 endpoint taken from the environment.

s3fs (through botocore) already reads credentials from the usual AWS variables; the endpoint of an S3-compatible
server is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) unless ``storage_options`` names one, so the
same URI works against AWS, MinIO or the moto server the tests start on 127.0.0.1.

Throttling (``503 SlowDown``) and dropped connections are retried by botocore's retry handler, configured by
``config_kwargs={"retries": {...}}``. Unless the options or ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` say otherwise,
s3 options get :data:`DEFAULT_S3_RETRIES`. botocore's own default ("legacy", 5 tries) gives up on about one request
in 40,000 when 12% of requests fail (0.12**5; 25 in a million requests), and its backoff is not capped, so it does not
take more tries well. s3fs adds an outer loop of its own (5 tries, for 503 answers whose body says ``SlowDown``, not
the bodiless 503 of a HEAD; not a storage option).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from pipeline.errors import PipelineError, StorageAccessError

__all__ = ["DEFAULT_S3_RETRIES", "filesystem", "resolve_storage_options", "is_remote", "join", "describe_failure",
           "access_errors", "check_writable"]

#: Environment variables holding an S3 endpoint URL, most specific first (botocore's own names).
ENDPOINT_ENV_VARS: tuple[str, ...] = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: botocore's retry settings for s3 when neither the options nor the environment give any: "standard" mode (retries
#: 500/502/503/504, throttling codes such as SlowDown and connection errors; jittered backoff capped at 20 s) with
#: 10 tries in all, so a request is lost only after 10 failures in a row (0.12**10 ~ 6e-10 at 12% failures).
DEFAULT_S3_RETRIES: dict[str, Any] = {"mode": "standard", "total_max_attempts": 10}
#: Environment variables by which botocore takes retry settings; when one is set, the environment decides.
RETRY_ENV_VARS: tuple[str, ...] = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


def is_remote(uri: str) -> bool:
    """True when ``uri`` names an object store (has a ``scheme://`` other than ``file://``)."""
    return "://" in uri and not uri.startswith("file://")


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def resolve_storage_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``uri``: ``storage_options`` plus the S3 endpoint from the environment and, for s3, the
    retry settings :data:`DEFAULT_S3_RETRIES` where neither ``config_kwargs["retries"]`` nor :data:`RETRY_ENV_VARS`
    give any (``retries`` given in the options replace the default whole).

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
        config_kwargs = dict(opts.get("config_kwargs") or {})
        if "retries" in config_kwargs:  # a copy: botocore rewrites the dict it is given
            config_kwargs["retries"] = dict(config_kwargs["retries"] or {})
        elif not any(os.environ.get(v) for v in RETRY_ENV_VARS):
            config_kwargs["retries"] = dict(DEFAULT_S3_RETRIES)
        if config_kwargs:
            opts["config_kwargs"] = config_kwargs
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


#: Error codes and HTTP statuses of an object store's "slow down" answers (S3, MinIO, GCS's S3 API).
THROTTLE_CODES: frozenset[str] = frozenset(
    {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestLimitExceeded",
     "TooManyRequests", "RequestThrottled", "503", "429"})
#: The storage options to add when throttling outlasts the retries (docs/featurize.md, "Throttling and retries").
MORE_RETRIES_HINT: str = '{"config_kwargs": {"retries": {"mode": "adaptive", "total_max_attempts": 20}}}'


def is_throttled(e: BaseException) -> bool:
    """True when ``e`` (or an exception it was raised from) is an object store's throttling answer (503 SlowDown,
    429): botocore's ``ClientError`` carries it in ``response``; s3fs re-raises it as ``OSError(EBUSY)`` from it."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
            if code in THROTTLE_CODES or status in ("503", "429"):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def describe_failure(e: BaseException) -> str:
    """Why a storage call failed and what fixes it, in one line (botocore's errors are told apart by class name, so
    this module does not import botocore)."""
    name = type(e).__name__
    if is_throttled(e):
        return (f"the object store kept answering 'slow down' (503/429) until the retries ran out ({_one_line(e)}); "
                f"retry later, or add more tries and adaptive backoff to --storage-options: {MORE_RETRIES_HINT}")
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
