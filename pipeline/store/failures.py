"""A failed write into the store ends the job with one line: the store, the reason, the fix.

Ray Data reports a write task's failure as a ``RayTaskError`` holding the worker's traceback (and logs it, and the
executor's own stack, as ERROR records: hundreds of lines). :func:`write_errors` wraps the plan's execution on the
driver: it keeps those records off the console while the plan runs, finds the storage failure (disk full, file size
limit, read-only or not-a-folder path, permission, S3 refusing or unreachable) at the root of what Ray raises, and
raises it as one :class:`pipeline.errors.StorageAccessError` line. The store stays resumable: a shard's ``status``
is written last, so the shard being written when it failed is pending and the same command rewrites it whole.
Failures that are not about storage propagate unchanged.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import PipelineError, StorageAccessError
from pipeline.io.storage import describe_failure, is_storage_failure

__all__ = ["root_failure", "write_errors", "write_failure_message"]

#: The fix for an OSError's errno, where there is a specific one.
_FIXES: dict[int, str] = {
    errno.ENOSPC: "free space on that device (or choose another --output)",
    errno.EDQUOT: "raise the disk quota or free space (or choose another --output)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or choose another --output",
    errno.EROFS: "the filesystem is read-only; remount it writable or choose another --output",
    errno.EACCES: "give the job write permission there or choose another --output",
    errno.EPERM: "give the job write permission there or choose another --output",
    errno.ENOTDIR: "a file stands where the store needs a folder; remove it (or choose another --output)",
    errno.EISDIR: "a folder stands where the store writes an object; remove it (or choose another --output)",
    errno.EIO: "check the device (I/O error)",
}
#: Loggers whose handlers Ray Data's error reports pass through.
_LOGGERS: tuple[str, ...] = ("ray.data", "ray", "")


def root_failure(e: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (``RayTaskError.cause``, ``__cause__``): what actually failed."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        if type(e).__name__.startswith(("RayTaskError", "UserCodeException")) and e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    return e


def write_failure_message(uri: str, e: BaseException) -> str:
    """One line: the store, why writing failed, the fix, and that the same command resumes."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:  # Ray re-raises with its text as filename
        where = e.filename if isinstance(e.filename, str) and e.filename.startswith(("/", "s3://")) else None
        reason = e.strerror + (f" at {where}" if where and "\n" not in where else "")
        reason += f"; {_FIXES.get(e.errno, 'check the storage')}"
    else:
        reason = describe_failure(e).split("Failed to apply UDF")[0].rstrip(" (")
    return (f"store {uri!r}: writing failed: {reason}; the store is resumable: rerun the same command "
            "(written shards are kept)")


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ray"):
            return True
        return record.levelno < logging.ERROR and "failed" not in str(record.msg)


@contextmanager
def write_errors(uri: str) -> Iterator[None]:
    """Run a plan that writes into the store at ``uri``; a storage failure under it becomes one
    :class:`StorageAccessError` line (see the module docstring)."""
    drop = _DropErrors()
    handlers = {h for name in _LOGGERS for h in logging.getLogger(name).handlers}
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    except Exception as e:
        cause = root_failure(e)
        if isinstance(cause, PipelineError):
            raise cause from None
        if is_storage_failure(cause):
            raise StorageAccessError(write_failure_message(uri, cause)) from None
        raise
    finally:
        for h in handlers:
            h.removeFilter(drop)
