"""The feature store: a Zarr v3 group, its one layout (:mod:`.schema`), how it is created, opened, written and read
(:mod:`.zarr_store`), the implicit features' part of it (:mod:`.implicit`) and the Ray Data sink that writes work
units into it (:mod:`.sink`, imported on its own: it needs Ray). The names of :mod:`.schema` and :mod:`.zarr_store`
are importable from here, lazily (a worker that needs only the schema does not import Zarr)."""
from __future__ import annotations

from featup_ops._lazy import lazy_exports

_SCHEMA = ("ATTRS_KEY", "CODECS", "DEFAULT_CODEC", "DTYPE_BYTES", "FORMAT_VERSION", "ArraySpec", "FeatureStoreSchema",
           "Status", "pair", "rows_per_shard_for", "to_store_dtype", "to_torch")
_ZARR_STORE = ("check_store", "code_version", "complete_rows", "create_or_open_store", "fingerprint", "open_store",
               "pending_shards", "read_attrs", "status_counts", "store_summary", "write_shard")

__all__ = sorted([*_SCHEMA, *_ZARR_STORE])

__getattr__, __dir__ = lazy_exports(
    __name__, {**{n: "schema" for n in _SCHEMA}, **{n: "zarr_store" for n in _ZARR_STORE}}, globals()
)
