"""Opening, creating, writing and reading a feature store (a Zarr v3 group); the layout is :mod:`pipeline.store.schema`.

- :func:`create_or_open_store`: create the arrays and attributes, or reopen a store written with the same settings
  (resume; other settings are refused with one line naming what differs).
- :func:`write_shard`: one work unit's whole shard of every array, ``status`` last.
- :func:`complete_rows`, :func:`pending_shards`, :func:`status_counts`, :func:`store_summary`: reading back.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from pipeline.errors import StoreError, StoreMismatchError
from pipeline.fmt import fmt_bytes
from pipeline.io.storage import access_errors, filesystem, is_remote, resolve_storage_options
from pipeline.store.foreign import array_kwargs, check_resumable_format, rows_sidecar_group, write_rows_sidecar
from pipeline.store.schema import ATTRS_KEY, FeatureStoreSchema, Status

__all__ = [
    "check_store",
    "code_version",
    "complete_rows",
    "create_or_open_store",
    "fingerprint",
    "open_store",
    "pending_shards",
    "read_attrs",
    "status_counts",
    "store_summary",
    "write_shard",
]


# --------------------------------------------------------------------------------------------------- opening


def _zarr_store(uri: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    if is_remote(uri):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            uri, storage_options=resolve_storage_options(uri, storage_options), read_only=read_only
        )
    return zarr.storage.LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri, read_only=read_only)


def open_store(
    uri: str, *, mode: Literal["r", "r+"] = "r", storage_options: dict[str, Any] | None = None
) -> zarr.Group:
    """Open an existing feature store.

    Args:
        uri: local path or ``s3://`` URI of the store.
        mode: ``"r"`` (read only) or ``"r+"`` (write into existing arrays).
        storage_options: fsspec options for object stores.

    Raises:
        StoreError: there is no feature store at ``uri``.
    """
    with access_errors(f"store {uri!r}"):
        try:
            group = zarr.open_group(_zarr_store(uri, storage_options, read_only=(mode == "r")), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no feature store at {uri!r}; run the featurize job first") from e
    if ATTRS_KEY not in group.attrs:
        raise StoreError(f"{uri!r} is a Zarr group but not a feature store (no {ATTRS_KEY!r} attributes)")
    return group


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    """The store's ``featup`` attributes (schema, settings, fingerprint, code version, creation time)."""
    try:
        return dict(group.attrs[ATTRS_KEY])
    except KeyError:
        raise StoreError(f"Zarr group {group.store_path} is not a feature store (no {ATTRS_KEY!r} attributes)") from None


def fingerprint(schema: FeatureStoreSchema, settings: dict[str, Any]) -> str:
    """Hash of everything that changes the stored bytes; a rerun must match it to write into the store."""
    blob = json.dumps({"schema": schema.to_dict(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def code_version() -> str:
    """``featup-pipeline <version>`` plus the git commit when the code runs from a checkout."""
    try:
        from importlib.metadata import version

        v = version("featup-pipeline")
    except Exception:
        v = "unknown"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except Exception:
        rev = ""
    return f"featup-pipeline {v}" + (f" ({rev})" if rev else "")


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            sa, sb = json.dumps(a, default=str), json.dumps(b, default=str)
            out.append(f"{prefix}{k}: {sa[:40]} -> {sb[:40]}")
    return out


def _ensure_arrays(group: zarr.Group, schema: FeatureStoreSchema) -> None:
    """Create every array of the layout that ``group`` lacks (all of them for a new store), ``status`` last."""
    have = set(group.array_keys())
    for name, spec in schema.arrays().items():
        if name not in have:
            group.create_array(name, **array_kwargs(name, spec.create_kwargs(), feature_dtype=schema.dtype))
    if schema.format_version >= 2:
        rows_sidecar_group(group)


def _holds_files(uri: str, storage_options: dict[str, Any] | None) -> bool:
    """True when ``uri`` is a file, or a folder / prefix with anything in it (creating a store there would wipe it:
    zarr's ``mode="w"`` clears the location first)."""
    with access_errors(f"store {uri!r}"):
        fs, path = filesystem(uri, storage_options)
        fs.invalidate_cache(path)
        try:
            return bool(fs.ls(path, detail=False))
        except FileNotFoundError:
            return False


def _existing_store(
    uri: str, store: Any, schema: FeatureStoreSchema, settings: dict[str, Any], storage_options: dict[str, Any] | None
) -> zarr.Group | None:
    """The feature store at ``uri`` when it was written with these settings; None when nothing (or an empty group)
    is there. Anything else is refused with one line (files are never overwritten)."""
    with access_errors(f"store {uri!r}"):
        try:
            group = zarr.open_group(store, mode="r+" if not store.read_only else "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        if group is None:
            if _holds_files(uri, storage_options):
                raise StoreError(
                    f"{uri!r} already holds files that are not a feature store; choose a new or empty --output "
                    "(nothing there was changed)"
                )
            return None
    if ATTRS_KEY not in group.attrs:
        if any(True for _ in group.keys()):
            raise StoreError(f"{uri!r} holds a Zarr group that is not a feature store; choose another --output")
        return None
    old = read_attrs(group)
    check_resumable_format(uri, old, schema.format_version)
    if old.get("fingerprint") != fingerprint(schema, settings):
        new = {"hires_mode": schema.hires_mode, **schema.to_dict(), **settings}
        was = {"hires_mode": old.get("hires_mode", "materialized"), **{k: v for k, v in old.items() if k in new}}
        what = "; ".join(_diff(was, new)[:4]) or "fingerprint differs"
        raise StoreMismatchError(
            f"store {uri!r} was written with other settings ({what}); rerun with the same settings to "
            f"resume, or choose a new --output"
        )
    return group


def check_store(
    uri: str, schema: FeatureStoreSchema, settings: dict[str, Any], *, storage_options: dict[str, Any] | None = None
) -> zarr.Group | None:
    """Validate ``uri`` before a job starts, changing nothing: the existing store (opened read-only) when it was
    written with these settings, None when there is none yet.

    Raises:
        StoreMismatchError / StoreError / StorageAccessError: as :func:`create_or_open_store` would.
    """
    return _existing_store(
        uri, _zarr_store(uri, storage_options, read_only=True), schema, settings, storage_options
    )


def create_or_open_store(
    uri: str,
    schema: FeatureStoreSchema,
    settings: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    extra_attrs: Callable[[], dict[str, Any]] | None = None,
) -> tuple[zarr.Group, bool]:
    """Create the store's arrays and attributes, or reopen a store written with the same settings (resume).

    Args:
        uri: local path or ``s3://`` URI.
        schema: shapes, dtype, codec.
        settings: JSON-able job settings that change the bytes (backbone, weights hash, upsampler, ...).
        storage_options: fsspec options for object stores.
        extra_attrs: called only when the store is created; its attributes are stored but not fingerprinted
            (e.g. the fitted PCA basis: derived from the settings, reused as stored on resume).

    Returns:
        ``(group, resumed)``; ``resumed`` is True when the store already existed with the same fingerprint.

    Raises:
        StoreMismatchError: a store exists at ``uri`` with another fingerprint (the message names what differs).
        StoreError: something other than a feature store exists at ``uri`` (files are never overwritten).
        StorageAccessError: ``uri`` cannot be reached or written.
    """
    fp = fingerprint(schema, settings)
    store = _zarr_store(uri, storage_options, read_only=False)
    existing = _existing_store(uri, store, schema, settings, storage_options)
    if existing is not None:
        _ensure_arrays(existing, schema)
        return existing, True
    attrs = {
        **schema.to_dict(),
        **settings,
        **(extra_attrs() if extra_attrs is not None else {}),
        "fingerprint": fp,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Attributes first, then arrays: a run killed in between leaves a store whose missing arrays a rerun creates.
    with access_errors(f"store {uri!r}"):
        group = zarr.open_group(store, mode="w", attributes={ATTRS_KEY: json.loads(json.dumps(attrs, default=str))})
        _ensure_arrays(group, schema)
    return group, False


# --------------------------------------------------------------------------------------------------- writing


async def _put_rows(arr: zarr.Array, start: int, stop: int, value: np.ndarray, whole_shard: int | None) -> None:
    """Write rows ``[start, stop)`` of ``arr``; with ``whole_shard``, first delete that shard's object so a torn
    earlier write is never merged into the new one (the rewrite is byte-identical to a clean run)."""
    if whole_shard is not None:
        key = arr.metadata.encode_chunk_key((whole_shard,) + (0,) * (arr.ndim - 1))
        await (arr.store_path / key).delete()
    await arr.async_array.setitem(slice(start, stop), value)


def write_shard(group: zarr.Group, shard: int, data: dict[str, np.ndarray]) -> int:
    """Write one work unit: shard ``shard``'s rows of every array, ``status`` last.

    The arrays other than ``status`` are written concurrently (one round of zarr's event loop, so a unit costs
    about one object write's latency, not one per array; on ``s3://`` the PUTs overlap); ``status`` is written
    only after all of them (and the Parquet copy of the row ids) have landed.

    Args:
        group: the store, opened ``"r+"``.
        shard: shard index k (rows ``[k*S, min(N, (k+1)*S))``).
        data: array name -> values for exactly those rows: ``image_id``, ``uri``, ``error`` ``(n,) str``,
            ``orig_size``, ``valid_size`` ``(n, 2) int32``, ``lowres``/``hires`` (and ``implicit``) ``(n, C, ., .)``
            (on-read stores: ``guidance`` ``(n, Hin, Win, 3) uint8`` instead of ``hires``) in the store dtype
            (bfloat16 as uint16 bits; failed rows zero), ``status`` ``(n,) uint8``.

    Returns:
        Uncompressed bytes written.

    Raises:
        StoreError: a value has the wrong number of rows (checked before anything is written).
    """
    import asyncio

    from zarr.core.sync import sync

    schema = FeatureStoreSchema.from_dict(read_attrs(group))
    start, stop = schema.shard_rows(shard)
    n = stop - start
    values = {name: np.asarray(v) for name, v in data.items()}
    for name, value in values.items():
        if value.shape[:1] != (n,):
            raise StoreError(f"shard {shard}: {name} has {value.shape[0] if value.ndim else 0} rows, the shard has {n}")
    status = values.pop("status").astype(np.uint8, copy=False)
    if status.shape != (n,):
        raise StoreError(f"shard {shard}: status has shape {status.shape}, expected ({n},)")
    listed = dict(group.arrays())  # one listing, metadata read concurrently
    arrays = {name: listed[name] if name in listed else group[name] for name in [*values, "status"]}
    row_chunked = set(schema.feature_arrays()) | {"guidance"}  # sharded by row: the unit owns the whole shard

    async def put_all() -> None:
        await asyncio.gather(*(
            _put_rows(arrays[name], start, stop, value, shard if name in row_chunked else None)
            for name, value in values.items()
        ))

    sync(put_all())
    if schema.format_version >= 2 and {"image_id", "uri", "error"} <= set(values):
        write_rows_sidecar(group, shard, start, values)  # before status: a complete row is always in the Parquet copy
    arrays["status"][start:stop] = status
    return sum(v.nbytes for v in values.values()) + status.nbytes


# --------------------------------------------------------------------------------------------------- reading


def _status(group: zarr.Group) -> np.ndarray:
    arr = group["status"]
    try:
        return np.asarray(arr[:])
    except Exception:  # a torn status chunk (crash mid-write): read chunk by chunk, torn ones count as pending
        out = np.zeros(arr.shape, dtype=np.uint8)
        step = arr.chunks[0]
        for start in range(0, arr.shape[0], step):
            try:
                out[start : start + step] = arr[start : start + step]
            except Exception:
                pass
        return out


def complete_rows(group: zarr.Group) -> np.ndarray:
    """Indices (int64) of rows whose ``status`` is complete (1), ascending."""
    return np.flatnonzero(_status(group) == Status.COMPLETE).astype(np.int64)


def pending_shards(group: zarr.Group) -> list[int]:
    """Shards with at least one pending row (status 0): the work a (re)run still has to do."""
    schema = FeatureStoreSchema.from_dict(read_attrs(group))
    status = _status(group)
    return [k for k in range(schema.num_shards) if (status[slice(*schema.shard_rows(k))] == Status.PENDING).any()]


def status_counts(group: zarr.Group) -> dict[str, int]:
    """``{"complete": ., "failed": ., "pending": .}`` row counts."""
    status = _status(group)
    return {
        "complete": int((status == Status.COMPLETE).sum()),
        "failed": int((status == Status.FAILED).sum()),
        "pending": int((status == Status.PENDING).sum()),
    }


def store_summary(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A few human-readable lines: what the store holds, row counts, size on disk and compression ratio."""
    group = open_store(uri, storage_options=storage_options)
    a = read_attrs(group)
    schema = FeatureStoreSchema.from_dict(a)
    counts = status_counts(group)
    try:
        fs, path = filesystem(uri, storage_options)
        on_disk = int(fs.du(path))
    except Exception:
        on_disk = 0
    raw = schema.row_bytes * counts["complete"]
    ratio = f", {raw / on_disk:.2f}x compression" if on_disk and raw else ""
    pca = a.get("pca")
    up = a.get("upsampler_spec") or (a.get("upsampler") or {}).get("kind", "?")
    lines = [
        f"store      {uri}",
        f"features   {a.get('backbone')} -> {up} upsampler; lowres {schema.channels}x"
        f"{schema.lowres_size[0]}x{schema.lowres_size[1]}, hires {schema.channels}x{schema.output_size[0]}x"
        f"{schema.output_size[1]} {schema.dtype}" + (f" (PCA to {pca['k']} channels)" if pca else "")
        + (" produced on read from lowres + guidance (compact store)" if schema.on_read else ""),
        f"rows       {schema.n_rows}: {counts['complete']} complete, {counts['failed']} failed, "
        f"{counts['pending']} pending",
        f"storage    {fmt_bytes(on_disk)} on disk{ratio}; codec {schema.codec}, {schema.rows_per_shard} rows per shard",
    ]
    if counts["failed"]:
        err = np.asarray(group["error"][:])
        status = _status(group)
        bad = np.flatnonzero(status == Status.FAILED)[:3]
        ids = np.asarray(group["image_id"][:])
        lines += [f"failed     row {i} ({ids[i]}): {err[i]}" for i in bad]
    return "\n".join(lines)
