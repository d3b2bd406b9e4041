"""Checksums on every chunk, and what a damaged chunk becomes: one line naming the array, row and shard.

Stores of format 2 (:data:`pipeline.store.schema.FORMAT_VERSION`) end every array's codec chain with Zarr v3's
``crc32c`` codec (:func:`pipeline.store.foreign.checksummed`, re-exported here): on the inner (one-row) chunks of
the sharded feature arrays, and on the chunks of the small per-row arrays. A flipped bit anywhere in a chunk then
fails its read (zarr raises ``ValueError: Stored and computed checksum do not match``) instead of decoding to wrong
values; blosc has no checksum of its own, and the shard index's crc32c covers only the index. Format-1 stores (no
``crc32c``) read as before, unverified.

This module sits above :mod:`.zarr_store` (it opens stores to verify them); the codec chain lives in the lower
:mod:`.foreign`, so the store's modules import one way only.

``python -m pipeline.store.checksum STORE [--reset]`` reads every complete row and lists the damaged ones; with
``--reset`` their shards are marked pending, so rerunning the featurize command rewrites them.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import CorruptDataError
from pipeline.store.foreign import checksummed, has_checksums

__all__ = ["checksummed", "damage_error", "find_damaged_rows", "has_checksums", "is_damage",
           "main", "verify_store"]

#: Messages of the decode failures a damaged chunk causes (zarr's crc32c check; blosc / zstd on old stores).
_DAMAGE_TEXT: tuple[str, ...] = ("checksum", "decompress", "corrupt", "blosc", "zstd")


def is_damage(e: BaseException) -> bool:
    """True when ``e`` is a chunk that failed to decode (checksum mismatch, or an undecodable compressed stream on
    an unchecksummed store), not a failure to reach the storage."""
    if isinstance(e, CorruptDataError):
        return True
    if isinstance(e, OSError) or not isinstance(e, (ValueError, RuntimeError, TypeError)):
        return False
    text = str(e).lower()
    return any(t in text for t in _DAMAGE_TEXT)


def _shard_key(arr: Any, shard: int) -> str:
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    return f"{arr.path}/{key}"


def damage_error(store: str, arr: Any, row: int, rows_per_shard: int, cause: BaseException) -> CorruptDataError:
    """The one-line error for damaged ``row`` of ``arr``: array, row, shard object and the fix."""
    shard = row // max(1, rows_per_shard)
    return CorruptDataError(
        f"store {store!r}: row {row} of {arr.path!r} is damaged (shard {shard}, object {_shard_key(arr, shard)!r}: "
        f"{' '.join(str(cause).split())[:80]}); run `python -m pipeline.store.checksum {store} --reset` and rerun "
        "the featurize command to rewrite it, or read with on_damaged='skip'"
    )


def find_damaged_rows(arr: Any, rows: Sequence[int]) -> list[int]:
    """The rows of ``rows`` whose chunk of ``arr`` fails to decode (read one row at a time)."""
    bad = []
    for r in rows:
        try:
            arr[int(r)]
        except Exception as e:
            if not is_damage(e):
                raise
            bad.append(int(r))
    return bad


def verify_store(
    uri: str, *, storage_options: dict[str, Any] | None = None, reset: bool = False
) -> dict[str, list[int]]:
    """Read every complete row of every array and return ``{array: damaged rows}`` (empty lists when intact).

    With ``reset``, every shard holding a damaged row gets ``status`` pending (written last, as a job does), so
    rerunning the featurize command rewrites those shards whole.
    """
    from pipeline.store.schema import FeatureStoreSchema, Status
    from pipeline.store.zarr_store import complete_rows, open_store, read_attrs

    group = open_store(uri, mode="r+" if reset else "r", storage_options=storage_options)
    schema = FeatureStoreSchema.from_dict(read_attrs(group))
    done = complete_rows(group)
    out: dict[str, list[int]] = {}
    for name in sorted(group.array_keys()):
        arr = group[name]
        bad: list[int] = []
        for k in sorted({int(r) // schema.rows_per_shard for r in done}):
            start, stop = schema.shard_rows(k)
            try:
                arr[start:stop]
            except Exception as e:
                if not is_damage(e):
                    raise
                bad += find_damaged_rows(arr, range(start, stop)) or list(range(start, stop))
        out[name] = bad
    if reset:
        shards = sorted({r // schema.rows_per_shard for rows in out.values() for r in rows})
        for k in shards:
            start, stop = schema.shard_rows(k)
            group["status"][start:stop] = np.full(stop - start, Status.PENDING, dtype=np.uint8)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.store.checksum STORE [--reset]``: exit 0 when intact, 1 when rows are damaged."""
    from pipeline.cli import json_object, run_job

    parser = argparse.ArgumentParser(description="Verify every chunk of a feature store against its checksum.")
    parser.add_argument("store")
    parser.add_argument("--reset", action="store_true", help="mark shards with damaged rows pending (rerun the job)")
    parser.add_argument("--storage-options", type=json_object, default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        found = verify_store(args.store, storage_options=args.storage_options, reset=args.reset)
        damaged = {k: v for k, v in found.items() if v}
        for name, rows in damaged.items():
            print(f"{args.store}: {name}: {len(rows)} damaged row(s): {rows[:20]}")
        if damaged and args.reset:
            print(f"{args.store}: their shards are pending again; rerun the featurize command to rewrite them")
        if not damaged:
            print(f"{args.store}: every chunk of every complete row is intact")
        return 1 if damaged else 0

    return run_job("checksum", body)


if __name__ == "__main__":
    sys.exit(main())
