"""``ZarrFeatureDatasink``: the Ray Data sink that writes featurized work units into a feature store.

Each input row is one whole shard (see :mod:`pipeline.featurize.stages`), so every shard has exactly one writer, whatever way
Ray groups rows into blocks and write tasks. The store's arrays are created on the driver before the plan runs
(:func:`pipeline.store.zarr_store.create_or_open_store`); ``on_write_start`` only checks that the store is there.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data._internal.execution.interfaces import TaskContext

from pipeline.store.schema import Status
from pipeline.store.zarr_store import open_store, write_shard

__all__ = ["ZarrFeatureDatasink", "CRASH_ENV"]

#: Test-only: when this variable is set (to a shard index) in the driver's environment when the sink is built, the
#: write of that shard stores its features but raises before its ``status``, as a crash mid-shard would.
CRASH_ENV: str = "FEATUP_TEST_CRASH_AT_SHARD"

_GROUPS: dict[str, Any] = {}


class ZarrFeatureDatasink(Datasink[dict[str, Any]]):
    """Write work units (one shard each) into an existing feature store.

    Args:
        uri: the store's local path or ``s3://`` URI.
        storage_options: fsspec options for object stores.
    """

    def __init__(self, uri: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        crash = os.environ.get(CRASH_ENV)
        self._crash_at = int(crash) if crash else None
        self.result: dict[str, Any] = {}

    def _group(self) -> Any:
        key = json.dumps([self.uri, self.storage_options], sort_keys=True, default=str)
        if key not in _GROUPS:  # once per worker process
            _GROUPS[key] = open_store(self.uri, mode="r+", storage_options=self.storage_options)
        return _GROUPS[key]

    def on_write_start(self, schema: Any = None) -> None:
        open_store(self.uri, storage_options=self.storage_options)  # fail on the driver if the store is missing

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, Any]:
        group = self._group()
        out: dict[str, Any] = {"units": 0, "complete": 0, "failed": 0, "bytes": 0, "done": []}
        for block in blocks:
            for unit in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                n = int(unit["n"])
                meta = json.loads(str(unit["meta"]))
                data = {
                    "image_id": np.asarray(meta["image_id"], dtype=str),
                    "uri": np.asarray(meta["uri"], dtype=str),
                    "error": np.asarray(meta["error"], dtype=str),
                    "orig_size": np.asarray(unit["orig_size"])[:n],
                    "valid_size": np.asarray(unit["valid_size"])[:n],
                    "lowres": np.asarray(unit["lowres"])[:n],
                    "status": np.asarray(unit["status"])[:n],
                }
                for name in ("hires", "guidance"):  # materialized units carry hires, on-read (compact) guidance
                    if name in unit:
                        data[name] = np.asarray(unit[name])[:n]
                shard = int(unit["shard"])
                if shard == self._crash_at:
                    write_shard(group, shard, {**data, "status": np.zeros(n, dtype=np.uint8)})
                    raise RuntimeError(f"{CRASH_ENV}: simulated crash while writing shard {shard}")
                out["bytes"] += write_shard(group, shard, data)
                out["units"] += 1
                out["complete"] += int((data["status"] == Status.COMPLETE).sum())
                out["failed"] += int((data["status"] == Status.FAILED).sum())
                out["done"].append((time.time(), n))  # (wall time the unit was complete, its rows)
        return out

    def on_write_complete(self, write_result: Any) -> None:
        total: dict[str, Any] = {"units": 0, "complete": 0, "failed": 0, "bytes": 0}
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

    def get_name(self) -> str:
        return "ZarrFeature"
