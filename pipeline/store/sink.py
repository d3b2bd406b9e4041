"""``ZarrFeatureDatasink``: the Ray Data sink through which every write of a plan reaches the feature store.

It follows Ray's sink lifecycle:

- ``on_write_start`` (driver, before the first write task): creates the store from its schema and settings, or
  validates an existing one (same fingerprint, else one line naming what differs) and adds any missing array.
- ``write`` (write tasks): each input row is one work unit = one whole shard (see :mod:`pipeline.featurize.stages`),
  so every shard has exactly one writer whatever way Ray groups rows into blocks and tasks. A unit carrying features
  is written with :func:`pipeline.store.zarr_store.write_shard` (``status`` last); a unit carrying implicit features
  (``implicit`` and/or ``implicit_params`` + ``implicit_guidance``, as ``--implicit-store`` says) with
  :func:`pipeline.store.implicit.write_implicit_rows` (``implicit_status`` last); rows with neither (a fitter's
  heartbeat) are skipped.
- ``on_write_complete`` (driver): totals of the write tasks, kept in :attr:`result`.
- ``on_write_failed`` (driver): keeps the error in :attr:`error`. Nothing needs undoing: a row counts only once its
  status is written, and a rerun rewrites any shard that is not complete, so the store is always resumable.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from pipeline.store.implicit import add_implicit_arrays, write_implicit_rows
from pipeline.store.schema import FeatureStoreSchema, Status
from pipeline.store.zarr_store import create_or_open_store, open_store, write_shard

__all__ = ["ZarrFeatureDatasink"]

#: Per-row arrays a featurized unit carries: materialized units ``hires``, on-read (compact) units ``guidance``.
_MAIN_ARRAYS = ("orig_size", "valid_size", "lowres", "hires", "guidance", "status")


class ZarrFeatureDatasink(Datasink[dict[str, Any]]):
    """Write work units (one shard each) into a feature store, creating or validating it first.

    Args:
        uri: the store's local path or ``s3://`` URI.
        schema: the store's layout; None = the store exists and is only written (the second implicit pass).
        settings: the fingerprinted job settings (see :func:`pipeline.store.zarr_store.create_or_open_store`).
        extra_attrs: attributes stored when the store is created, not fingerprinted (the PCA basis).
        implicit: the implicit fit the units carry (:func:`pipeline.store.implicit.add_implicit_arrays`' keywords),
            or None; its arrays are created or validated at the start.
        storage_options: fsspec options for object stores.
    """

    def __init__(
        self,
        uri: str,
        schema: FeatureStoreSchema | None = None,
        settings: dict[str, Any] | None = None,
        *,
        extra_attrs: dict[str, Any] | None = None,
        implicit: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.uri = uri
        self.schema = schema
        self.settings = settings or {}
        self.extra_attrs = extra_attrs or {}
        self.implicit = implicit
        self.storage_options = storage_options
        self.result: dict[str, Any] = {}
        self.error: Exception | None = None

    def on_write_start(self, schema: Any = None) -> None:
        if self.schema is None:  # the second pass: the store exists
            group = open_store(self.uri, mode="r+", storage_options=self.storage_options)
        else:
            group, _ = create_or_open_store(
                self.uri, self.schema, self.settings, storage_options=self.storage_options,
                extra_attrs=lambda: dict(self.extra_attrs),
            )
        if self.implicit is not None:
            add_implicit_arrays(group, **self.implicit)

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        group = open_store(self.uri, mode="r+", storage_options=self.storage_options)
        out: dict[str, Any] = {"units": 0, "complete": 0, "failed": 0, "fitted": 0, "fit_failed": 0, "bytes": 0,
                               "done": []}
        for block in blocks:
            for unit in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                if "shard" not in unit:
                    continue  # a heartbeat row: no data
                n = int(unit["n"])
                meta = json.loads(str(unit["meta"]))
                shard = int(unit["shard"])
                if "status" in unit:
                    data = {name: np.asarray(unit[name])[:n] for name in _MAIN_ARRAYS if name in unit}
                    data.update({k: np.asarray(meta[k], dtype=str) for k in ("image_id", "uri", "error")})
                    out["bytes"] += write_shard(group, shard, data)
                    out["complete"] += int((data["status"] == Status.COMPLETE).sum())
                    out["failed"] += int((data["status"] == Status.FAILED).sum())
                if "implicit_status" in unit:  # the unit's fitted rows (a subset of its rows, in row order)
                    rows = np.asarray(meta["implicit_rows"], dtype=np.int64)
                    status = np.asarray(unit["implicit_status"])[: len(rows)]
                    if len(rows):
                        part = {k: np.asarray(unit[k])[: len(rows)] if k in unit else None
                                for k in ("implicit", "implicit_params", "implicit_guidance")}
                        write_implicit_rows(group, rows, part["implicit"], status, meta["implicit_error"],
                                            params=part["implicit_params"], guidance=part["implicit_guidance"])
                    out["fitted"] += int((status == Status.COMPLETE).sum())
                    out["fit_failed"] += int((status == Status.FAILED).sum())
                out["units"] += 1
                out["done"].append((time.time(), n))  # (wall time the unit was complete, its rows)
        return out

    def on_write_complete(self, write_result: Any) -> None:
        total: dict[str, Any] = {"units": 0, "complete": 0, "failed": 0, "fitted": 0, "fit_failed": 0, "bytes": 0}
        done: list[tuple[float, int]] = []
        for r in write_result.write_returns:
            for k in total:
                total[k] += int(r.get(k, 0))
            done += [tuple(d) for d in r.get("done", [])]
        done.sort()
        # Steady-state rate: rows finished after the first unit, over the time since the first unit finished
        # (excludes the one-off start: worker processes, imports, model load).
        if len(done) >= 2 and done[-1][0] > done[0][0]:
            total["steady_images_per_s"] = sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])
        self.result = total

    def on_write_failed(self, error: Exception) -> None:
        self.error = error

    def get_name(self) -> str:
        return "ZarrFeature"
