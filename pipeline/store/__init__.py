"""The feature store: a Zarr v3 group, its one layout (:mod:`.schema`), how it is created, opened, written and read
(:mod:`.zarr_store`), the implicit features' part of it (:mod:`.implicit`) and the Ray Data sink that writes work
units into it (:mod:`.sink`, imported on its own: it needs Ray). The names of :mod:`.schema` and :mod:`.zarr_store`
are importable from here."""
from __future__ import annotations

from pipeline.store import schema as _schema
from pipeline.store import zarr_store as _zarr_store
from pipeline.store.schema import *  # noqa: F401,F403
from pipeline.store.zarr_store import *  # noqa: F401,F403

__all__ = [*_schema.__all__, *_zarr_store.__all__]
