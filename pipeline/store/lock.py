"""One driver per store: a lock object beside the store, created exclusively, held for the whole job.

``<output>.lock`` (``out/feats.zarr`` -> ``out/feats.zarr.lock``; beside the store, not in it, so creating the
store's group, which clears its location, cannot remove it) holds ``{"host", "pid", "started", "token"}``:

- **Local paths**: ``open(..., O_CREAT | O_EXCL)``, atomic on one filesystem (NFS v3 and older excepted).
- **s3://**: a conditional put (``If-None-Match: *``, s3fs's ``mode="create"``): the store refuses it when the
  object exists (AWS S3, MinIO, moto). The lock is then read back and its token compared, so a server that ignores
  the condition still refuses the later of two drivers when the earlier one's put has already landed.

A second job on the same output is refused with one line naming the owner and the fix. A lock whose owner ran on
this host and is gone (a killed job) is taken over; one left by a job killed on another host must be deleted by
hand (the message says which object). The owner removes the lock when the job ends, failed or not.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import StoreBusyError
from pipeline.io.storage import access_errors, check_writable, filesystem, is_remote

__all__ = ["LOCK_SUFFIX", "lock_uri", "store_lock"]

#: Appended to the store's URI to name its lock object.
LOCK_SUFFIX: str = ".lock"
#: Locks this process holds: lock URI -> (token, depth); a job that locks again (e.g. a nested call) re-enters.
_HELD: dict[str, tuple[str, int]] = {}


def lock_uri(uri: str) -> str:
    """The lock object of the store at ``uri``."""
    return uri.rstrip("/") + LOCK_SUFFIX


def _create(fs: Any, path: str, data: bytes, remote: bool) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False when it exists."""
    if remote:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _read(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        fs.invalidate_cache(path)
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # a lock being written right now (or torn): owner unknown
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def store_lock(uri: str, storage_options: dict[str, Any] | None = None, *, job: str = "featurize") -> Iterator[None]:
    """Hold the store's lock for the block: no other driver can lock ``uri`` until it ends.

    Raises:
        StoreBusyError: another live job holds the lock (one line: owner, lock object, fix).
        StorageAccessError: the lock object cannot be written or read.
    """
    target = lock_uri(uri)
    if target in _HELD:  # this process holds it already
        token, depth = _HELD[target]
        _HELD[target] = (token, depth + 1)
        try:
            yield
        finally:
            _HELD[target] = (token, _HELD[target][1] - 1)
            if _HELD[target][1] == 0:
                del _HELD[target]
        return
    check_writable(uri, storage_options)  # a missing bucket or a file in the way: the usual one line, nothing made
    host, pid = socket.gethostname(), os.getpid()
    token = uuid.uuid4().hex
    owner = {"host": host, "pid": pid, "job": job, "token": token,
             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with access_errors(f"lock {target!r} of store {uri!r}"):
        fs, path = filesystem(target, storage_options)
        remote = is_remote(target)
        for _ in range(2):  # the second try follows the removal of a stale lock
            if _create(fs, path, json.dumps(owner).encode(), remote):
                held = _read(fs, path)
                if held is not None and held.get("token") == token:
                    break
            held = _read(fs, path) or {}
            if held.get("token") == token:  # our put landed but its answer was lost; the retry saw our own lock
                break
            stale = held.get("host") == host and isinstance(held.get("pid"), int) and not _alive(held["pid"])
            if stale:
                fs.rm_file(path)
                continue
            who = (f"{held.get('job', 'a')} job pid {held.get('pid')} on {held.get('host')} since "
                   f"{held.get('started')}") if held else "another job"
            raise StoreBusyError(
                f"store {uri!r} is being written by {who}; wait for it to finish (then rerun to resume), or if that "
                f"job is gone, delete {target!r} and rerun"
            )
        else:  # pragma: no cover - a stale lock that came back at once: another driver took it
            raise StoreBusyError(f"store {uri!r} is being written by another job; wait for it and rerun")
    _HELD[target] = (token, 1)
    try:
        yield
    finally:
        _HELD.pop(target, None)
        try:
            held = _read(fs, path)
            if held is not None and held.get("token") == token:
                fs.rm_file(path)
        except Exception:  # the job's own outcome matters more; a left lock is taken over on this host
            pass
