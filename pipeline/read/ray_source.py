"""Any feature store (materialized or on-read) as a ``ray.data.Dataset``, for Ray Train jobs that stream from it.

``read_feature_store(uri)`` is ``ray.data.read_datasource(FeatureStoreDatasource(uri))``: ONE read task per store
shard that has complete rows (the store's unit of work; a task reads its shard with one selection per run of rows),
complete rows only (``status == 1``; failed and pending rows never appear), one output row per image with columns

- ``features``: ``(C', H', W') float32`` (channel selection / crop / on-read size applied, as
  :class:`pipeline.read.dataset.FeatureDataset` yields them; on-read stores produce ``hires`` in the read task, on
  its CPU),
- ``row`` (int64, the manifest row), ``image_id`` (str),
- ``label`` when a :class:`pipeline.evaluate.labels.LabelSource` is given (aligned as the dataset aligns it).

``iter_torch_batches`` converts numeric columns only: ``ds.select_columns(["features", "row"])`` (or ``"label"``)
before feeding a Ray Train loop, or pass a ``collate_fn``.

Ray's own ``read_zarr`` reads Zarr v2 only; this reads the project's Zarr v3 stores through the same reader as the
torch dataset, so values are identical to it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.read.dataset import Channels, Crop, FeatureDataset

__all__ = ["FeatureStoreDatasource", "read_feature_store"]


class FeatureStoreDatasource(Datasource):
    """A Ray Data datasource over the complete rows of one feature store's array.

    Args:
        store: local path or ``s3://`` URI.
        array: ``"hires"`` (stored, or produced on read), ``"lowres"`` or ``"implicit"``.
        channels, crop, labels, storage_options, rows, size: as :class:`pipeline.read.dataset.FeatureDataset`.

    Raises:
        pipeline.errors.StoreError / ConfigError: as :class:`FeatureDataset` (on the driver, before any task).
    """

    def __init__(
        self,
        store: str,
        array: str = "hires",
        *,
        channels: Channels = None,
        crop: Crop | None = None,
        labels: Any = None,
        storage_options: dict[str, Any] | None = None,
        rows: Any = None,
        size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.dataset = FeatureDataset(
            store, array, channels=channels, crop=crop, labels=labels, storage_options=storage_options, rows=rows,
            size=size,
        )

    def get_name(self) -> str:
        return "FeatureStore"

    def _shards(self) -> list[np.ndarray]:
        """Dataset indices grouped by store shard (shards without complete rows are left out)."""
        rows = self.dataset.rows
        if len(rows) == 0:
            return []
        shard = rows // self.dataset.rows_per_shard
        return np.split(np.arange(len(rows)), np.flatnonzero(np.diff(shard)) + 1)

    def _row_bytes(self) -> int:
        c, h, w = self.dataset.item_shape
        return c * h * w * 4 + 64

    def estimate_inmemory_data_size(self) -> int | None:
        return len(self.dataset) * self._row_bytes()

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        """One :class:`ReadTask` per store shard with complete rows (``parallelism`` is not used: the shard is the
        unit, so a task never reads part of a shard object and no two tasks read the same one)."""
        tasks = []
        for idx in self._shards():
            meta = BlockMetadata(
                num_rows=len(idx), size_bytes=len(idx) * self._row_bytes(), input_files=None, exec_stats=None
            )
            tasks.append(ReadTask(_reader(self.dataset, idx), meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _reader(dataset: FeatureDataset, idx: np.ndarray):
    def read() -> Iterable[Block]:
        items = dataset.__getitems__(idx.tolist())
        batch: dict[str, Any] = {
            "features": np.stack([it["features"].cpu().numpy() for it in items]).astype(np.float32, copy=False),
            "row": np.asarray([it["row"] for it in items], dtype=np.int64),
            "image_id": np.asarray([it["image_id"] for it in items], dtype=object),
        }
        if "label" in items[0]:
            batch["label"] = np.stack([it["label"].numpy() for it in items])
        yield BlockAccessor.batch_to_block(batch)

    return read


def read_feature_store(
    store: str,
    array: str = "hires",
    *,
    channels: Channels = None,
    crop: Crop | None = None,
    labels: Any = None,
    storage_options: dict[str, Any] | None = None,
    rows: Any = None,
    size: int | tuple[int, int] | None = None,
    ray_remote_args: dict[str, Any] | None = None,
) -> Any:
    """A feature store's complete rows as a ``ray.data.Dataset`` (one read task per shard).

    Args:
        store, array, channels, crop, labels, storage_options, rows, size: see :class:`FeatureStoreDatasource`.
        ray_remote_args: resources of the read tasks (e.g. ``{"num_cpus": 0.5}``).

    Returns:
        A ``ray.data.Dataset`` with columns ``features`` ``(C', H', W') float32``, ``row`` int64, ``image_id`` str
        (and ``label``).
    """
    import ray

    source = FeatureStoreDatasource(
        store, array, channels=channels, crop=crop, labels=labels, storage_options=storage_options, rows=rows,
        size=size,
    )
    return ray.data.read_datasource(source, ray_remote_args=ray_remote_args or {})
