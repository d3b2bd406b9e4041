"""The feature store: a Zarr v3 group, its one layout (:mod:`.schema`), how it is created, opened, written and read
(:mod:`.zarr_store`), the implicit features' part of it (:mod:`.implicit`) and the Ray Data sink that writes work
units into it (:mod:`.sink`, imported on its own: it needs Ray)."""
from __future__ import annotations

from pipeline.store.schema import (
    ATTRS_KEY,
    CODECS,
    DEFAULT_CODEC,
    DTYPE_BYTES,
    FORMAT_VERSION,
    FeatureStoreSchema,
    Status,
    rows_per_shard_for,
    to_store_dtype,
    to_torch,
)
from pipeline.store.zarr_store import (
    code_version,
    complete_rows,
    create_or_open_store,
    fingerprint,
    open_store,
    pending_shards,
    read_attrs,
    status_counts,
    store_summary,
    write_shard,
)

__all__ = [
    "ATTRS_KEY",
    "CODECS",
    "DEFAULT_CODEC",
    "DTYPE_BYTES",
    "FORMAT_VERSION",
    "FeatureStoreSchema",
    "Status",
    "code_version",
    "complete_rows",
    "create_or_open_store",
    "fingerprint",
    "open_store",
    "pending_shards",
    "read_attrs",
    "rows_per_shard_for",
    "status_counts",
    "store_summary",
    "to_store_dtype",
    "to_torch",
    "write_shard",
]
