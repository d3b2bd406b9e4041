"""A torch ``Dataset`` over the complete rows of a feature store, for downstream training and probes.

``FeatureDataset(store, "hires")[i]`` is the ``i``-th complete row (status 1; failed and pending rows are skipped):
``{"features": (C, H, W) float32, "row": int, "image_id": str}`` plus ``"label"`` when a
:class:`pipeline.evaluate.labels.LabelSource` is given (``(Hl, Wl)`` int64 classes, 255 = ignore, or float32 depth),
aligned with the image the featurize job saw.

Fork and pickle safety (``docs/design.md``, "Readers"): the constructor reads the store's
metadata and drops its handle; every process (each DataLoader worker, a Ray task) opens its own handle lazily on
first read, keyed by process id, and the handle is never pickled. fsspec/s3fs async filesystems are not fork-safe,
so no open handle ever crosses a fork.

Fast reads: zarr reads one inner chunk (one row) per sample; :meth:`FeatureDataset.__getitems__` (which a
``DataLoader`` with a batch sampler calls with the whole batch) reads each run of consecutive rows with ONE
selection, so zarr fetches and decodes the chunks of a shard concurrently;
:class:`pipeline.read.sampler.ShardBatchSampler` builds batches of consecutive rows inside one shard (shuffled
between and within shards per epoch) so every batch is such a run, and
:func:`pipeline.read.collate.collate_features` hands the batch's one features tensor on without a copy
(:meth:`FeatureDataset.loader` wires both in). What a store offers a reader (complete image ids, a summary) is
:mod:`pipeline.read.store_info`.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from zarr.core.buffer.cpu import NDBuffer

from pipeline.errors import ConfigError, StoreError
from pipeline.read.collate import collate_features, new_batch
from pipeline.read.sampler import ShardBatchSampler
from pipeline.store.schema import Status, pair

__all__ = [
    "FeatureDataset",
    "StoreGeometry",
    "Crop",
    "Channels",
]

Crop = tuple[int, int, int, int]
"""``(top, left, height, width)`` in the pixel grid of the array being read."""

Channels = int | slice | tuple[int, int] | None
"""Channel selection: None = all, ``k`` = the first k (e.g. leading PCA components), ``(start, stop)`` or a slice."""

FEATURE_ARRAYS = ("lowres", "hires", "implicit")
"""Row-aligned feature arrays a dataset can read."""

@dataclass(frozen=True)
class StoreGeometry:
    """What the featurize job did to each image, from the store's attributes: input ``(H, W)`` and resize policy."""

    input_size: tuple[int, int]
    policy: str

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreGeometry:
        size = _first(attrs, "input_size")
        policy = _first(attrs, "resize_policy", "policy", "resize")
        if size is None or policy is None:
            raise StoreError(
                "store attributes lack input_size or resize policy; it was not written by pipeline.featurize"
            )
        return cls(pair(size, "input_size"), str(policy))


def _first(attrs: dict[str, Any], *names: str) -> Any:
    for n in names:
        if attrs.get(n) is not None:
            return attrs[n]
    return None


def _channel_slice(channels: Channels, total: int) -> slice:
    if channels is None:
        return slice(0, total)
    if isinstance(channels, slice):
        start, stop, step = channels.indices(total)
        if step != 1:
            raise ConfigError("channels must be a contiguous range (slice step 1)")
        return slice(start, stop)
    if isinstance(channels, (int, np.integer)):
        if not 0 < int(channels) <= total:
            raise ConfigError(f"channels={channels} out of range; the store has {total} channels")
        return slice(0, int(channels))
    start, stop = channels
    if not 0 <= start < stop <= total:
        raise ConfigError(f"channels={channels} out of range; the store has {total} channels")
    return slice(int(start), int(stop))


class FeatureDataset(Dataset):
    """Complete rows of a feature store as a torch ``Dataset``.

    Args:
        store: store URI, a local path or ``s3://bucket/key.zarr``.
        array: "hires", "lowres" or "implicit" (implicit rows count only where ``implicit_status`` is 1).
        channels: channel selection (see :data:`Channels`).
        crop: ``(top, left, height, width)`` window of the array's pixel grid; labels are cropped to the same
            window of the image (scaled when the array's size differs from the input size by an integer factor).
        labels: a :class:`pipeline.evaluate.labels.LabelSource` joined by image id; items then carry ``"label"``.
        storage_options: fsspec options for ``s3://`` stores (endpoint from ``AWS_ENDPOINT_URL`` otherwise).
        rows: restrict to these manifest rows (e.g. a train/val split); rows that are not complete are dropped.
        on_damaged: what a row whose chunk fails its checksum does (format-2 stores checksum every chunk):
            ``"stop"`` raises :class:`pipeline.errors.CorruptDataError`, one line naming the row, shard and fix;
            ``"skip"`` leaves it out of the batch read by :meth:`__getitems__` (the DataLoader path) with a
            warning and counts it in :attr:`damaged_rows` (a single :meth:`__getitem__` still raises).
        device: where items' features live. For ``"hires"`` of an on-read (compact) store, also where the stored
            upsampler runs; for ``"implicit"`` of a store keeping implicit functions, where the networks are
            rendered (``"cuda"``: batched on the GPU of the consuming process; use ``num_workers=0``).
        size: ``(Ho, Wo)`` (or one side) of ``"hires"`` of an on-read store, or of ``"implicit"`` of a store
            keeping implicit functions (``--implicit-store function|both``); None = the store's size.

    Items: ``{"features": (C', H', W') float32, "row": int, "image_id": str[, "label": (Hl, Wl)]}``, the same from a
    materialized and an on-read store made with the same settings (within the store dtype's rounding).
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
        rows: Sequence[int] | np.ndarray | None = None,
        on_damaged: str = "stop",
        device: str = "cpu",
        size: int | tuple[int, int] | None = None,
    ) -> None:
        from pipeline.store import complete_rows, open_store, read_attrs

        if on_damaged not in ("stop", "skip"):
            raise ConfigError(f"on_damaged={on_damaged!r}; choose 'stop' or 'skip'")
        self.on_damaged = on_damaged
        #: Rows left out because their chunk failed its checksum (``on_damaged="skip"``), in this process.
        self.damaged_rows: set[int] = set()
        if array not in FEATURE_ARRAYS:
            raise ConfigError(f"unknown feature array {array!r}; choose one of {', '.join(FEATURE_ARRAYS)}")
        self.store = str(store)
        self.array = array
        self.storage_options = dict(storage_options) if storage_options else None
        self.labels = labels
        group = open_store(self.store, mode="r", storage_options=self.storage_options)
        self.attrs: dict[str, Any] = dict(read_attrs(group))
        self.device = str(device)
        # issue 14 hook: "hires" of an on-read store is produced from lowres + guidance (pipeline/read/on_read.py)
        from pipeline.read.on_read import open_on_read

        self._on_read = open_on_read(self, group, array, size)
        if self._on_read is None and array not in group:
            raise StoreError(f"store {self.store} has no {array!r} array; featurize with the option that writes it")
        arr = group["lowres" if self._on_read is not None else array]
        self.array_shape: tuple[int, ...] = tuple(int(s) for s in arr.shape)
        if self._on_read is not None:  # produced on read: its own shape
            self.array_shape = tuple(int(s) for s in self._on_read.array_shape)
        self._bfloat16 = self.attrs.get("dtype") == "bfloat16"
        self.rows_per_shard = int(self.attrs.get("rows_per_shard") or (arr.shards or arr.chunks)[0])
        done = np.asarray(complete_rows(group), dtype=np.int64)
        if array == "implicit":
            ok = np.asarray(group["implicit_status"][:]) == Status.COMPLETE
            done = done[ok[done]]
        if rows is not None:
            wanted = np.asarray(rows, dtype=np.int64)
            outside = wanted[(wanted < 0) | (wanted >= self.array_shape[0])]
            if outside.size:
                raise ConfigError(
                    f"rows {outside[:5].tolist()} are outside the store's {self.array_shape[0]} rows (0.."
                    f"{self.array_shape[0] - 1}); pass manifest row numbers of this store"
                )
            done = np.intersect1d(done, wanted)
        self.rows: np.ndarray = np.sort(done)
        self._image_ids = _strings(group["image_id"][:])
        self._uris = _strings(group["uri"][:]) if "uri" in group else None
        self._orig_size = np.asarray(group["orig_size"][:]) if "orig_size" in group else None
        self.geometry = StoreGeometry.from_attrs(self.attrs) if labels is not None else _maybe_geometry(self.attrs)
        del group, arr  # no handle survives construction: workers open their own
        _, c, h, w = self.array_shape
        self._ch = _channel_slice(channels, c)
        if crop is None:
            self._ys, self._xs = slice(0, h), slice(0, w)
        else:
            if len(crop) != 4:
                raise ConfigError(f"crop={crop} must be (top, left, height, width) in the {array} array's pixels")
            top, left, ch_, cw = (int(v) for v in crop)
            if top < 0 or left < 0 or ch_ <= 0 or cw <= 0 or top + ch_ > h or left + cw > w:
                raise ConfigError(f"crop={crop} does not fit the {array} array's {h}x{w} grid")
            self._ys, self._xs = slice(top, top + ch_), slice(left, left + cw)
        self._label_window = self._label_crop() if labels is not None else None
        self._pid: int | None = None
        self._arr: Any = None
        self._staging = threading.local()

    # ----------------------------------------------------------------------------------------- handles, pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arr"], state["_pid"] = None, None
        state.pop("_compact", None), state.pop("_compact_pid", None)  # on-read array handles (pipeline/read/on_read.py)
        del state["_staging"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._staging = threading.local()

    def _array(self) -> Any:
        """This process's handle on the feature array (opened on first use, reopened after a fork)."""
        pid = os.getpid()
        if self._arr is None or self._pid != pid:
            from pipeline.store import open_store

            self._arr = open_store(self.store, mode="r", storage_options=self.storage_options)[self.array]
            self._pid = pid
        return self._arr

    # ---------------------------------------------------------------------------------------------- indexing
    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_channels(self) -> int:
        return self._ch.stop - self._ch.start

    @property
    def num_classes(self) -> int | None:
        return getattr(self.labels, "num_classes", None)

    def image_id(self, i: int) -> str:
        return str(self._image_ids[self.rows[i]])

    def index_of_row(self, row: int) -> int:
        """Dataset index of manifest row ``row``; raises ``KeyError`` when the row is not complete."""
        j = int(np.searchsorted(self.rows, row))
        if j >= len(self.rows) or int(self.rows[j]) != row:
            raise KeyError(f"row {row} of {self.store} is not a complete row of {self.array!r}")
        return j

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} complete rows")
        row = int(self.rows[i])
        # torch's vectorised half -> float is several times faster than numpy's astype(float32); copy=True so a
        # float32 store never hands out a view of the staging buffer
        block, bad = self._read_checked(row, row + 1)
        if bad:
            raise self._damage(row, bad[row])
        feats = self._as_tensor(block[0]).to(self.device, torch.float32, copy=True)
        return self._item(row, feats)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Read a batch: each run of consecutive manifest rows is ONE zarr selection (whole chunks/shards).

        The float32 features of the batch are written into ONE ``(B, C, H, W)`` tensor (in shared memory inside a
        DataLoader worker, as ``default_collate`` would allocate it) and the items hold its rows as views, so
        :func:`collate_features` can hand the batch on without the copy ``torch.stack`` makes.
        """
        idx = [int(i) + len(self) if int(i) < 0 else int(i) for i in indices]
        for i in idx:
            if not 0 <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} complete rows")
        rows = self.rows[idx]
        order = np.argsort(rows, kind="stable")
        shape = (len(idx), *self.item_shape)
        if self.device != "cpu" and torch.utils.data.get_worker_info() is not None:
            raise ConfigError(
                f"device={self.device!r} puts (and, for on-read stores, produces) features in the consuming process; "
                "use num_workers=0, or device='cpu' with DataLoader workers"
            )
        batch = new_batch(shape) if self.device == "cpu" else torch.empty(shape, device=self.device)
        items: list[dict[str, Any] | None] = [None] * len(idx)
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and rows[order[stop]] == rows[order[stop - 1]] + 1:
                stop += 1
            r0, r1 = int(rows[order[start]]), int(rows[order[stop - 1]])
            block, bad = self._read_checked(r0, r1 + 1)
            for k in range(start, stop):
                pos = int(order[k])
                if int(rows[pos]) in bad:
                    continue
                feats = batch[pos]
                feats.copy_(self._as_tensor(block[int(rows[pos]) - r0]))
                items[pos] = self._item(int(rows[pos]), feats)
            start = stop
        if any(it is None for it in items):
            return [it for it in items if it is not None]
        return items  # type: ignore[return-value]

    def loader(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader with the fast path wired in: :class:`ShardBatchSampler` batches (one zarr read per batch)
        and :func:`collate_features` (no stacking copy). ``kwargs`` go to ``DataLoader`` (``pin_memory``,
        ``persistent_workers``, ``multiprocessing_context``, ...)."""
        sampler = ShardBatchSampler(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return torch.utils.data.DataLoader(
            self, batch_sampler=sampler, collate_fn=collate_features, num_workers=num_workers, **kwargs
        )

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one item's features (channel selection and crop applied)."""
        return (self.num_channels, self._ys.stop - self._ys.start, self._xs.stop - self._xs.start)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (channel slice and crop applied) as a view of this thread's staging buffer.

        zarr decodes straight into a reused, already-paged-in buffer (``out=``) instead of allocating a fresh one
        per read; the caller copies out (the float32 conversion does). Valid until this thread's next read.
        """
        if self._on_read is not None:  # (n, C', H', W') float32 tensor on the device, computed from compact arrays
            return self._on_read.read(self, start, stop)
        arr = self._array()
        n = stop - start
        shape = (n, self.num_channels, self._ys.stop - self._ys.start, self._xs.stop - self._xs.start)
        stage = getattr(self._staging, "buf", None)
        if stage is None or stage.shape[0] < n or stage.shape[1:] != shape[1:] or stage.dtype != arr.dtype:
            stage = np.empty((max(n, 1), *shape[1:]), dtype=arr.dtype)
            self._staging.buf = stage
        view = stage[:n]
        arr.get_basic_selection(
            (slice(start, stop), self._ch, self._ys, self._xs), out=NDBuffer.from_numpy_array(view)
        )
        return view

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, BaseException]]:
        """:meth:`_read`, and the rows whose chunk is damaged (``{row: error}``; their values are not valid).

        With ``on_damaged="stop"`` the first damaged row raises instead; with ``"skip"`` each one is warned about
        and counted in :attr:`damaged_rows`."""
        from pipeline.store.checksum import is_damage

        try:
            return self._read(start, stop), {}
        except Exception as e:
            if not is_damage(e):
                raise
        bad: dict[int, BaseException] = {}
        view: Any = None
        for r in range(start, stop):  # find the damaged rows: one chunk at a time
            try:
                one = self._read(r, r + 1)[0]
                one = one.clone() if isinstance(one, torch.Tensor) else one.copy()
            except Exception as e:
                if not is_damage(e):
                    raise
                if self.on_damaged == "stop":
                    raise self._damage(r, e) from None
                bad[r] = e
                continue
            if view is None:
                view = (
                    one.new_empty((stop - start, *one.shape))
                    if isinstance(one, torch.Tensor)
                    else np.empty((stop - start, *one.shape), dtype=one.dtype)
                )
            view[r - start] = one
        for r, e in bad.items():
            if r not in self.damaged_rows:
                self.damaged_rows.add(r)
                warnings.warn(f"FeatureDataset: skipped {len(self.damaged_rows)} damaged row(s) so far; "
                              f"{self._damage(r, e)}", RuntimeWarning, stacklevel=3)
        if view is None:  # every row damaged: placeholder values, never handed out
            view = (
                torch.zeros((stop - start, *self.item_shape), device=self.device)
                if self._on_read is not None
                else np.zeros((stop - start, *self.item_shape), dtype=self._array().dtype)
            )
        return view, bad

    def _damage(self, row: int, cause: BaseException) -> Exception:
        from pipeline.store.checksum import damage_error

        arr = self._array() if self._on_read is None else None
        if arr is None:  # on-read: the damaged chunk is in one of the arrays it is computed from
            from pipeline.store import open_store

            arr = open_store(self.store, mode="r", storage_options=self.storage_options)[self._on_read.damage_array]
        return damage_error(self.store, arr, row, self.rows_per_shard, cause)

    def _as_tensor(self, block: np.ndarray) -> torch.Tensor:
        """Stored values as a tensor (bfloat16 bits reinterpreted), sharing memory with ``block``."""
        if isinstance(block, torch.Tensor):  # produced on read (already float32)
            return block
        t = torch.from_numpy(np.ascontiguousarray(block))
        return t.view(torch.bfloat16) if self._bfloat16 else t

    def _item(self, row: int, feats: torch.Tensor) -> dict[str, Any]:
        item: dict[str, Any] = {"features": feats, "row": row, "image_id": str(self._image_ids[row])}
        if self.labels is not None:
            item["label"] = self._label(row)
        return item

    # ------------------------------------------------------------------------------------------------ labels
    def _label_crop(self) -> tuple[slice, slice]:
        (ih, iw), (_, _, ah, aw) = self.geometry.input_size, self.array_shape
        if (self._ys.start, self._xs.start, self._ys.stop, self._xs.stop) == (0, 0, ah, aw):
            return slice(0, ih), slice(0, iw)
        if ih % ah or iw % aw:
            raise ConfigError(
                f"crop on a {ah}x{aw} {self.array} array cannot be mapped onto the {ih}x{iw} labels "
                "(sizes are not integer multiples); crop the high-res array instead"
            )
        fy, fx = ih // ah, iw // aw
        return (slice(self._ys.start * fy, self._ys.stop * fy), slice(self._xs.start * fx, self._xs.stop * fx))

    def _label(self, row: int) -> torch.Tensor:
        g = self.geometry
        orig = tuple(int(v) for v in self._orig_size[row]) if self._orig_size is not None else None
        uri = str(self._uris[row]) if self._uris is not None else None
        lab = self.labels.aligned(
            str(self._image_ids[row]), size=g.input_size, policy=g.policy, orig_size=orig, uri=uri
        )
        ys, xs = self._label_window
        return torch.from_numpy(np.ascontiguousarray(lab[ys, xs]))

    # ---------------------------------------------------------------------------------------------- pictures
    def source_pixels(self, row: int) -> np.ndarray | None:
        """The row's source image decoded as the featurize job did: ``(H, W, 3) uint8``, or None when the source
        cannot be read any more (moved or deleted)."""
        from pipeline.io.decode import decode_image
        from pipeline.io.sources import read_bytes

        geom = self.geometry or _maybe_geometry(self.attrs)
        if self._uris is None or geom is None:
            return None
        try:
            data = read_bytes(str(self._uris[row]), self.storage_options)
        except (OSError, ValueError):
            return None
        return np.asarray(decode_image(data, size=geom.input_size, policy=geom.policy).pixels)


def _strings(values: Any) -> list[str]:
    """A zarr string column (numpy StringDType) as a plain list of str (cheap to pickle to workers)."""
    return [str(v) for v in np.asarray(values).tolist()]


def _maybe_geometry(attrs: dict[str, Any]) -> StoreGeometry | None:
    try:
        return StoreGeometry.from_attrs(attrs)
    except StoreError:
        return None


if __name__ == "__main__":  # python -m pipeline.read.dataset STORE: print what the store holds and what a reader gets
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipeline.read.dataset STORE_URI")
    from pipeline.read.store_info import describe

    print(describe(sys.argv[1]))
