"""What makes a feature store readable by other Zarr v3 clients (xarray, tensorstore, pyarrow), format 2.

- **Checksums**: every array's codec chain ends with ``crc32c`` (:func:`checksummed`; what a failed check
  becomes: :mod:`pipeline.store.checksum`).
- **Named dimensions**: every array has ``dimension_names`` (:data:`DIMENSIONS`), so ``xarray.open_zarr(store)``
  opens the group as one ``Dataset`` (pass ``mask_and_scale=False``: otherwise xarray reads the fill value 0 of the
  feature arrays as missing).
- **Numeric arrays** use Zarr v3 core data types and codecs only (bytes, blosc / zstd, crc32c, sharding_indexed), so
  tensorstore's ``zarr3`` driver reads them bit for bit.
- **bfloat16**: zarr-python 3.1 has no ``bfloat16`` data type, so the values are stored as their raw ``uint16``
  bits and each feature array says so in its own attributes: ``attrs["featup"] == {"dtype": "bfloat16", ...}``
  (view the uint16 values as bfloat16, e.g. ``ml_dtypes.bfloat16``).
- **Row ids, uris and errors**: the ``image_id``/``uri``/``error`` arrays use zarr-python's ``string`` data type,
  which is not a Zarr v3 core type. The same columns are also written, one Parquet file per shard, under
  :data:`ROWS_PATH` (``<store>/rows/parquet/shard-<k>.parquet``; ``rows`` is an empty Zarr group so Zarr clients
  skip it): ``pyarrow.parquet.read_table("<store>/rows/parquet")`` gives ``row, image_id, uri, error`` for every
  written shard. Each file is written before the shard's ``status``, so a complete row is always in it.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.errors import StoreMismatchError

__all__ = ["DIMENSIONS", "ROWS_PATH", "array_kwargs", "check_resumable_format", "checksummed", "has_checksums",
           "read_rows_sidecar", "rows_sidecar_group", "write_rows_sidecar"]

#: ``dimension_names`` of each array. Names shared between arrays have one size across the store (xarray's rule).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "image_id": ("row",),
    "uri": ("row",),
    "error": ("row",),
    "status": ("row",),
    "implicit_error": ("row",),
    "implicit_status": ("row",),
    "orig_size": ("row", "side"),
    "valid_size": ("row", "side"),
    "lowres": ("row", "channel", "lowres_y", "lowres_x"),
    "hires": ("row", "channel", "y", "x"),
    "implicit": ("row", "channel", "implicit_y", "implicit_x"),
    "guidance": ("row", "input_y", "input_x", "rgb"),  # on-read stores, implicit functions: the uint8 input image
    "implicit_params": ("row", "implicit_param"),  # implicit functions: each row's network and basis
}
#: Where the Parquet copy of the string columns lives inside the store (one file per shard).
ROWS_PATH: str = "rows/parquet"
#: Attribute key on each array (the group's is ``pipeline.store.schema.ATTRS_KEY``, the same name).
_ARRAY_ATTRS_KEY = "featup"


def checksummed(compressors: Any) -> list[Any]:
    """``compressors`` (a codec, a list of them or None) with ``crc32c`` appended: the bytes-to-bytes chain of a
    format-2 array (:mod:`pipeline.store.checksum` says what a failed check becomes)."""
    from zarr.codecs import Crc32cCodec

    if compressors is None:
        chain: list[Any] = []
    elif isinstance(compressors, (list, tuple)):
        chain = list(compressors)
    else:
        chain = [compressors]
    if not any(isinstance(c, Crc32cCodec) for c in chain):
        chain.append(Crc32cCodec())
    return chain


def has_checksums(arr: Any) -> bool:
    """True when ``arr``'s chunks (the inner chunks of a sharded array) carry a crc32c."""
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in getattr(arr, "compressors", ()) or ())


def array_kwargs(name: str, kwargs: dict[str, Any], *, feature_dtype: str | None = None) -> dict[str, Any]:
    """``zarr.Group.create_array`` keyword arguments of array ``name`` made format 2: ``crc32c`` after the
    compressors, ``dimension_names``, and for bfloat16 feature arrays a ``featup`` attribute saying so.

    Args:
        name: the array's name in the layout.
        kwargs: shape, chunks, dtype, ... as the layout declares them (not changed).
        feature_dtype: the store's logical features dtype, for feature arrays (``lowres``, ``hires``, ``implicit``).
    """
    out = dict(kwargs)
    if "compressors" in out:  # feature arrays: the store's codec (None for "none")
        out["compressors"] = checksummed(out["compressors"])
    else:  # the small per-row arrays: zarr's default (zstd), then crc32c
        from zarr.codecs import ZstdCodec

        out["compressors"] = checksummed(ZstdCodec(level=0))
    if name in DIMENSIONS:
        out["dimension_names"] = DIMENSIONS[name]
    if feature_dtype == "bfloat16" and name in ("lowres", "hires", "implicit"):
        out["attributes"] = {**out.get("attributes", {}), _ARRAY_ATTRS_KEY: {
            "dtype": "bfloat16", "storage": "raw bits of bfloat16 values in uint16; view them as bfloat16"}}
    return out


def check_resumable_format(uri: str, old: dict[str, Any], version: int) -> None:
    """Refuse, with one line, to resume a store of another format version (reading it still works)."""
    have = old.get("format_version")
    if have != version:
        raise StoreMismatchError(
            f"store {uri!r} is feature store format {have} and this version writes format {version}; finish it "
            f"with the version that started it, or featurize into a new --output (reading it still works)"
        )


def rows_sidecar_group(group: Any) -> None:
    """Create the empty ``rows`` group that holds the Parquet files (so Zarr clients see a group, not stray files)."""
    if "rows" not in group:
        group.create_group("rows", attributes={_ARRAY_ATTRS_KEY: {
            "parquet": ROWS_PATH, "columns": ["row", "image_id", "uri", "error"]}})


def write_rows_sidecar(group: Any, shard: int, start: int, data: dict[str, Any]) -> None:
    """Write shard ``shard``'s ``row, image_id, uri, error`` as ``rows/parquet/shard-<k>.parquet`` (replacing it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    ids = [str(v) for v in np.asarray(data["image_id"]).tolist()]
    table = pa.table({
        "row": pa.array(np.arange(start, start + len(ids), dtype=np.int64)),
        "image_id": pa.array(ids, pa.string()),
        "uri": pa.array([str(v) for v in np.asarray(data["uri"]).tolist()], pa.string()),
        "error": pa.array([str(v) for v in np.asarray(data["error"]).tolist()], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    key = f"{group.path + '/' if group.path else ''}{ROWS_PATH}/shard-{shard:06d}.parquet"
    sync(group.store.set(key, default_buffer_prototype().buffer.from_bytes(buf.getvalue())))


def read_rows_sidecar(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The Parquet copy of the string columns as one ``pyarrow.Table`` sorted by ``row`` (what a foreign reader gets
    with ``pyarrow.parquet.read_table``)."""
    import pyarrow.parquet as pq

    from pipeline.io.storage import filesystem

    fs, path = filesystem(uri, storage_options)
    table = pq.read_table(f"{path.rstrip('/')}/{ROWS_PATH}", filesystem=fs)
    return table.sort_by("row")
