"""What a store offers a reader: the complete rows' image ids (for joining stores on the same images) and a summary
of the store with each feature array's complete rows and item shape (``python -m pipeline.read.dataset STORE``)."""
from __future__ import annotations

from typing import Any

from pipeline.read.dataset import FEATURE_ARRAYS, FeatureDataset

__all__ = ["complete_image_ids", "describe"]


def complete_image_ids(
    store: str, array: str = "hires", *, storage_options: dict[str, Any] | None = None
) -> dict[str, int]:
    """``{image_id: row}`` of the complete rows of ``array`` in a store (for joining stores on the same images)."""
    ds = FeatureDataset(store, array, storage_options=storage_options)
    return {ds.image_id(i): int(r) for i, r in enumerate(ds.rows)}


def describe(store: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """:func:`pipeline.store.store_summary` plus what a reader gets: complete rows and item shape per array."""
    from pipeline.store import open_store, store_summary

    lines = [store_summary(store, storage_options=storage_options)]
    group = open_store(store, storage_options=storage_options)
    from pipeline.read.on_read import is_on_read

    on_read = is_on_read(dict(group.attrs.get("featup", {})))  # hires produced on read (compact store)
    names = [a for a in FEATURE_ARRAYS
             if a in group or (a == "hires" and on_read) or (a == "implicit" and "implicit_params" in group)]
    for name in names:
        ds = FeatureDataset(store, name, storage_options=storage_options)
        c, h, w = ds.item_shape
        lines.append(f"dataset    {name}: {len(ds)} complete rows, items ({c}, {h}, {w}) float32, "
                     f"{ds.rows_per_shard} rows per shard")
    return "\n".join(lines)
