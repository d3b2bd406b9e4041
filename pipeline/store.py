"""The feature store: a Zarr v3 group, one per job output. This is the one module that knows its layout.

Layout (N = manifest rows, S = rows per shard, C channels, (h, w) low-res grid, (H, W) output size):

=================  ===================  ====================  ======================================================
array              shape                chunk / shard         meaning
=================  ===================  ====================  ======================================================
``image_id``       ``(N,)`` str         S rows                manifest image id
``uri``            ``(N,)`` str         S rows                where the row's image came from
``orig_size``      ``(N, 2)`` int32     S rows                ``(h, w)`` of the image after EXIF rotation
``valid_size``     ``(N, 2)`` int32     S rows                ``(h, w)`` of the image inside the input (``pad``)
``lowres``         ``(N, C, h, w)``     1 row / S rows        backbone features
``hires``          ``(N, C, H, W)``     1 row / S rows        upsampled features
``implicit``       ``(N, C, Hi, Wi)``   1 row / S rows        optional per-image implicit features
``implicit_status`` ``(N,)`` uint8      S rows                optional; 1 where ``implicit`` is written
``error``          ``(N,)`` str         S rows                failure reason, ``""`` for good rows
``status``         ``(N,)`` uint8       S rows                0 pending, 1 complete, 2 failed; written LAST
=================  ===================  ====================  ======================================================

Rules:

- **Shard size**: ``S = clamp(floor(TARGET_SHARD_BYTES / bytes of one hires row), 1, MAX_ROWS_PER_SHARD)``; the
  same S for every row-aligned array, so shard ``k`` of every array covers rows ``[k*S, (k+1)*S)``.
- **One writer per shard**: the pipeline's unit of work is one shard; :func:`write_shard` writes the unit's whole
  region of every array (deleting any old shard object first, so a torn shard from a crash is replaced, never
  merged), then ``status`` last. A row is complete only when ``status == 1``.
- **Features dtype**: float16 / float32 are stored as such; bfloat16 is stored as its raw ``uint16`` bits (Zarr has
  no bfloat16) with ``attrs["featup"]["dtype"] == "bfloat16"``; :func:`to_torch` turns either back into a tensor.
- **Attributes** under the key ``"featup"``: the :class:`FeatureStoreSchema` fields, the job settings (backbone,
  weights hash, upsampler config and checkpoint hash, input size, stride, normalisation, resize policy, PCA basis,
  manifest digest), ``fingerprint`` (hash of schema + settings: a rerun with any other value is refused),
  ``code_version`` and ``created``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from pipeline.storage import access_errors, filesystem, is_remote, resolve_storage_options

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTRS_KEY",
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "FeatureStoreSchema",
    "Status",
    "complete_rows",
    "create_or_open_store",
    "open_store",
    "pending_shards",
    "read_attrs",
    "rows_per_shard_for",
    "store_summary",
    "to_torch",
    "write_shard",
]

#: Version of the layout described above; bumped on any change a reader must know about.
FORMAT_VERSION: int = 1
#: Group attribute key holding everything this module writes.
ATTRS_KEY: str = "featup"
#: Target uncompressed bytes of one shard of ``hires``: large enough that object stores see few, big objects
#: (S3 request costs and latency), small enough that one work unit (a whole shard) fits comfortably in a Ray
#: block (Ray's default target is 128 MiB) and in a worker's memory.
TARGET_SHARD_BYTES: int = 64 * 2**20
#: Upper bound on rows per shard, so tiny feature maps (PCA to a few channels) still give many work units.
MAX_ROWS_PER_SHARD: int = 1024
#: Feature dtypes offered, with their bytes per element.
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}

#: Compressor choices by name. Measured on EfficientNet-Lite0 features upsampled to 112^2, fp16, one chunk per
#: image (docs/featurize.md): Blosc zstd + byte shuffle compresses best (1.44x bilateral-upsampled here, 2.09x
#: bilinear in DESIGN.md, vs 1.10x / 1.46x for zarr's default zstd) and reads fast, so it is the default.
CODECS: dict[str, Any] = {
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": lambda: ZstdCodec(level=0),
    "none": lambda: None,
}
DEFAULT_CODEC: str = "blosc-zstd"


class Status:
    """Values of the ``status`` array."""

    PENDING = 0
    COMPLETE = 1
    FAILED = 2


def rows_per_shard_for(row_bytes: int, target: int = TARGET_SHARD_BYTES) -> int:
    """Rows per shard for one row of ``row_bytes`` (uncompressed ``hires`` bytes): ``clamp(target // row, 1, 1024)``."""
    return int(min(MAX_ROWS_PER_SHARD, max(1, target // max(1, row_bytes))))


def _pair(v: Any, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in v)
    except Exception:
        raise StoreError(f"schema field {name} must be a pair of ints, got {v!r}") from None
    if a < 1 or b < 1:
        raise StoreError(f"schema field {name} must be positive, got {v!r}")
    return a, b


@dataclass(frozen=True)
class FeatureStoreSchema:
    """Shapes, dtype and codec of a feature store; written to and validated from the group attributes.

    Attributes:
        n_rows: N, the manifest length.
        channels: C, channels stored (the backbone dim, or k after PCA).
        lowres_size: ``(h, w)`` of the backbone grid.
        output_size: ``(H, W)`` of ``hires``.
        dtype: ``float16``, ``bfloat16`` or ``float32``.
        rows_per_shard: S (see :func:`rows_per_shard_for`).
        codec: key of :data:`CODECS`.
        implicit_size: ``(Hi, Wi)`` when the store has an ``implicit`` array, else None.
        format_version: :data:`FORMAT_VERSION`.
    """

    n_rows: int
    channels: int
    lowres_size: tuple[int, int]
    output_size: tuple[int, int]
    dtype: str = "float16"
    rows_per_shard: int = 1
    codec: str = DEFAULT_CODEC
    implicit_size: tuple[int, int] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown feature dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.n_rows < 1 or self.channels < 1 or self.rows_per_shard < 1:
            raise StoreError(f"n_rows, channels and rows_per_shard must be >= 1 (got {self})")
        object.__setattr__(self, "lowres_size", _pair(self.lowres_size, "lowres_size"))
        object.__setattr__(self, "output_size", _pair(self.output_size, "output_size"))
        if self.implicit_size is not None:
            object.__setattr__(self, "implicit_size", _pair(self.implicit_size, "implicit_size"))

    @property
    def storage_dtype(self) -> str:
        """The numpy dtype Zarr stores (bfloat16 as raw uint16 bits)."""
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    @property
    def hires_row_bytes(self) -> int:
        """Uncompressed bytes of one row of ``hires``."""
        return self.channels * self.output_size[0] * self.output_size[1] * DTYPE_BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row of all feature arrays (``lowres + hires [+ implicit]``)."""
        h, w = self.lowres_size
        n = self.hires_row_bytes + self.channels * h * w * DTYPE_BYTES[self.dtype]
        if self.implicit_size is not None:
            n += self.channels * self.implicit_size[0] * self.implicit_size[1] * DTYPE_BYTES[self.dtype]
        return n

    @property
    def num_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """``[start, stop)`` rows of shard ``shard``."""
        start = shard * self.rows_per_shard
        return start, min(self.n_rows, start + self.rows_per_shard)

    def feature_arrays(self) -> dict[str, tuple[int, int, int]]:
        """Name -> per-row shape ``(C, h, w)`` of each feature array."""
        out = {"lowres": (self.channels, *self.lowres_size), "hires": (self.channels, *self.output_size)}
        if self.implicit_size is not None:
            out["implicit"] = (self.channels, *self.implicit_size)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lowres_size"] = list(self.lowres_size)
        d["output_size"] = list(self.output_size)
        d["implicit_size"] = None if self.implicit_size is None else list(self.implicit_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureStoreSchema":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"feature store format_version {version!r} is not {FORMAT_VERSION}; rewrite the store")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------------- opening


def _zarr_store(uri: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    if is_remote(uri):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            uri, storage_options=resolve_storage_options(uri, storage_options), read_only=read_only
        )
    return zarr.storage.LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri, read_only=read_only)


def open_store(
    uri: str, *, mode: Literal["r", "r+"] = "r", storage_options: dict[str, Any] | None = None
) -> zarr.Group:
    """Open an existing feature store.

    Args:
        uri: local path or ``s3://`` URI of the store.
        mode: ``"r"`` (read only) or ``"r+"`` (write into existing arrays).
        storage_options: fsspec options for object stores.

    Raises:
        StoreError: there is no feature store at ``uri``.
    """
    with access_errors(f"store {uri!r}"):
        try:
            group = zarr.open_group(_zarr_store(uri, storage_options, read_only=(mode == "r")), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no feature store at {uri!r}; run the featurize job first") from e
    if ATTRS_KEY not in group.attrs:
        raise StoreError(f"{uri!r} is a Zarr group but not a feature store (no {ATTRS_KEY!r} attributes)")
    return group


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    """The store's ``featup`` attributes (schema, settings, fingerprint, code version, creation time)."""
    try:
        return dict(group.attrs[ATTRS_KEY])
    except KeyError:
        raise StoreError(f"Zarr group {group.store_path} is not a feature store (no {ATTRS_KEY!r} attributes)") from None


def fingerprint(schema: FeatureStoreSchema, settings: dict[str, Any]) -> str:
    """Hash of everything that changes the stored bytes; a rerun must match it to write into the store."""
    blob = json.dumps({"schema": schema.to_dict(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def code_version() -> str:
    """``featup-pipeline <version>`` plus the git commit when the code runs from a checkout."""
    try:
        from importlib.metadata import version

        v = version("featup-pipeline")
    except Exception:
        v = "unknown"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except Exception:
        rev = ""
    return f"featup-pipeline {v}" + (f" ({rev})" if rev else "")


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            sa, sb = json.dumps(a, default=str), json.dumps(b, default=str)
            out.append(f"{prefix}{k}: {sa[:40]} -> {sb[:40]}")
    return out


def _ensure_arrays(group: zarr.Group, schema: FeatureStoreSchema) -> None:
    """Create every array of the layout that ``group`` lacks (all of them for a new store)."""
    have = set(group.array_keys())
    n, s = schema.n_rows, schema.rows_per_shard
    rows = min(n, s)
    compressor = CODECS[schema.codec]()
    for name in ("image_id", "uri", "error"):
        if name not in have:
            group.create_array(name, shape=(n,), chunks=(rows,), dtype=str, fill_value="")
    for name in ("orig_size", "valid_size"):
        if name not in have:
            group.create_array(name, shape=(n, 2), chunks=(rows, 2), dtype="int32", fill_value=0)
    for name, row_shape in schema.feature_arrays().items():
        if name not in have:
            group.create_array(
                name,
                shape=(n, *row_shape),
                chunks=(1, *row_shape),
                shards=(rows, *row_shape),
                dtype=schema.storage_dtype,
                fill_value=0,
                compressors=compressor,
            )
    extra = ["implicit_status"] if schema.implicit_size is not None else []
    for name in [*extra, "status"]:
        if name not in have:
            group.create_array(name, shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)


def _holds_files(uri: str, storage_options: dict[str, Any] | None) -> bool:
    """True when ``uri`` is a file, or a folder / prefix with anything in it (creating a store there would wipe it:
    zarr's ``mode="w"`` clears the location first)."""
    with access_errors(f"store {uri!r}"):
        fs, path = filesystem(uri, storage_options)
        fs.invalidate_cache(path)
        try:
            return bool(fs.ls(path, detail=False))
        except FileNotFoundError:
            return False


def create_or_open_store(
    uri: str,
    schema: FeatureStoreSchema,
    settings: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    extra_attrs: Callable[[], dict[str, Any]] | None = None,
) -> tuple[zarr.Group, bool]:
    """Create the store's arrays and attributes, or reopen a store written with the same settings (resume).

    Args:
        uri: local path or ``s3://`` URI.
        schema: shapes, dtype, codec.
        settings: JSON-able job settings that change the bytes (backbone, weights hash, upsampler, ...).
        storage_options: fsspec options for object stores.
        extra_attrs: called only when the store is created; its attributes are stored but not fingerprinted
            (e.g. the fitted PCA basis: derived from the settings, reused as stored on resume).

    Returns:
        ``(group, resumed)``; ``resumed`` is True when the store already existed with the same fingerprint.

    Raises:
        StoreMismatchError: a store exists at ``uri`` with another fingerprint (the message names what differs).
        StoreError: something other than a feature store exists at ``uri`` (files are never overwritten).
        StorageAccessError: ``uri`` cannot be reached or written.
    """
    fp = fingerprint(schema, settings)
    store = _zarr_store(uri, storage_options, read_only=False)
    with access_errors(f"store {uri!r}"):
        try:
            existing = zarr.open_group(store, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            existing = None
    if existing is None and _holds_files(uri, storage_options):
        raise StoreError(
            f"{uri!r} already holds files that are not a feature store; choose a new or empty --output "
            "(nothing there was changed)"
        )
    if existing is not None:
        if ATTRS_KEY not in existing.attrs:
            if any(True for _ in existing.keys()):
                raise StoreError(f"{uri!r} holds a Zarr group that is not a feature store; choose another --output")
        else:
            old = read_attrs(existing)
            if old.get("fingerprint") != fp:
                new = {**schema.to_dict(), **settings}
                was = {k: v for k, v in old.items() if k in new}
                what = "; ".join(_diff(was, new)[:4]) or "fingerprint differs"
                raise StoreMismatchError(
                    f"store {uri!r} was written with other settings ({what}); rerun with the same settings to "
                    f"resume, or choose a new --output"
                )
            _ensure_arrays(existing, schema)
            return existing, True
    attrs = {
        **schema.to_dict(),
        **settings,
        **(extra_attrs() if extra_attrs is not None else {}),
        "fingerprint": fp,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Attributes first, then arrays: a run killed in between leaves a store whose missing arrays a rerun creates.
    with access_errors(f"store {uri!r}"):
        group = zarr.open_group(store, mode="w", attributes={ATTRS_KEY: json.loads(json.dumps(attrs, default=str))})
        _ensure_arrays(group, schema)
    return group, False


# --------------------------------------------------------------------------------------------------- writing


def _delete_shard_objects(arr: zarr.Array, index: tuple[int, ...]) -> None:
    from zarr.core.sync import sync

    key = arr.metadata.encode_chunk_key(index)
    sync((arr.store_path / key).delete())


def write_shard(group: zarr.Group, shard: int, data: dict[str, np.ndarray]) -> int:
    """Write one work unit: shard ``shard``'s rows of every array, ``status`` last.

    Args:
        group: the store, opened ``"r+"``.
        shard: shard index k (rows ``[k*S, min(N, (k+1)*S))``).
        data: array name -> values for exactly those rows: ``image_id``, ``uri``, ``error`` ``(n,) str``,
            ``orig_size``, ``valid_size`` ``(n, 2) int32``, ``lowres``/``hires`` (and ``implicit``) ``(n, C, ., .)``
            in the store dtype (bfloat16 as uint16 bits; failed rows zero), ``status`` ``(n,) uint8``.

    Returns:
        Uncompressed bytes written.
    """
    schema = FeatureStoreSchema.from_dict(read_attrs(group))
    start, stop = schema.shard_rows(shard)
    n = stop - start
    written = 0
    names = [k for k in data if k != "status"]
    for name in names:
        value = np.asarray(data[name])
        if value.shape[0] != n:
            raise StoreError(f"shard {shard}: {name} has {value.shape[0]} rows, the shard has {n}")
        arr = group[name]
        if name in schema.feature_arrays():
            _delete_shard_objects(arr, (shard,) + (0,) * (arr.ndim - 1))
        arr[start:stop] = value
        written += value.nbytes
    status = np.asarray(data["status"], dtype=np.uint8)
    if status.shape != (n,):
        raise StoreError(f"shard {shard}: status has shape {status.shape}, expected ({n},)")
    group["status"][start:stop] = status
    return written + status.nbytes


# --------------------------------------------------------------------------------------------------- reading


def _status(group: zarr.Group) -> np.ndarray:
    arr = group["status"]
    try:
        return np.asarray(arr[:])
    except Exception:  # a torn status chunk (crash mid-write): read chunk by chunk, torn ones count as pending
        out = np.zeros(arr.shape, dtype=np.uint8)
        step = arr.chunks[0]
        for start in range(0, arr.shape[0], step):
            try:
                out[start : start + step] = arr[start : start + step]
            except Exception:
                pass
        return out


def complete_rows(group: zarr.Group) -> np.ndarray:
    """Indices (int64) of rows whose ``status`` is complete (1), ascending."""
    return np.flatnonzero(_status(group) == Status.COMPLETE).astype(np.int64)


def pending_shards(group: zarr.Group) -> list[int]:
    """Shards with at least one pending row (status 0): the work a (re)run still has to do."""
    schema = FeatureStoreSchema.from_dict(read_attrs(group))
    status = _status(group)
    return [k for k in range(schema.num_shards) if (status[slice(*schema.shard_rows(k))] == Status.PENDING).any()]


def status_counts(group: zarr.Group) -> dict[str, int]:
    """``{"complete": ., "failed": ., "pending": .}`` row counts."""
    status = _status(group)
    return {
        "complete": int((status == Status.COMPLETE).sum()),
        "failed": int((status == Status.FAILED).sum()),
        "pending": int((status == Status.PENDING).sum()),
    }


def to_torch(values: np.ndarray, dtype: str) -> "torch.Tensor":
    """Stored feature values -> a tensor of the logical dtype (``bfloat16`` bits are reinterpreted, not cast)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def store_summary(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A few human-readable lines: what the store holds, row counts, size on disk and compression ratio."""
    group = open_store(uri, storage_options=storage_options)
    a = read_attrs(group)
    schema = FeatureStoreSchema.from_dict(a)
    counts = status_counts(group)
    try:
        fs, path = filesystem(uri, storage_options)
        on_disk = int(fs.du(path))
    except Exception:
        on_disk = 0
    raw = schema.row_bytes * counts["complete"]
    ratio = f", {raw / on_disk:.2f}x compression" if on_disk and raw else ""
    pca = a.get("pca")
    up = a.get("upsampler") or {}
    lines = [
        f"store      {uri}",
        f"features   {a.get('backbone')} -> {up.get('kind', '?')} upsampler; lowres {schema.channels}x"
        f"{schema.lowres_size[0]}x{schema.lowres_size[1]}, hires {schema.channels}x{schema.output_size[0]}x"
        f"{schema.output_size[1]} {schema.dtype}" + (f" (PCA to {pca['k']} channels)" if pca else ""),
        f"rows       {schema.n_rows}: {counts['complete']} complete, {counts['failed']} failed, "
        f"{counts['pending']} pending",
        f"storage    {_fmt_bytes(on_disk)} on disk{ratio}; codec {schema.codec}, {schema.rows_per_shard} rows per shard",
    ]
    if counts["failed"]:
        err = np.asarray(group["error"][:])
        status = _status(group)
        bad = np.flatnonzero(status == Status.FAILED)[:3]
        ids = np.asarray(group["image_id"][:])
        lines += [f"failed     row {i} ({ids[i]}): {err[i]}" for i in bad]
    return "\n".join(lines)
