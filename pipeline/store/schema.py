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
``hires``          ``(N, C, H, W)``     1 row / S rows        upsampled features (materialized mode only)
``guidance``       ``(N, Hi, Wi, 3)`` u8  1 row / S rows      on-read mode and implicit functions: the input image
``error``          ``(N,)`` str         S rows                failure reason, ``""`` for good rows
``status``         ``(N,)`` uint8       S rows                :class:`Status` (pending, complete, failed); LAST
``implicit``       ``(N, C, Hi, Wi)``   1 row / S rows        optional per-image implicit features
``implicit_error`` ``(N,)`` str         S rows                optional; why a row's implicit fit failed
``implicit_status`` ``(N,)`` uint8      S rows                optional; :class:`Status` of ``implicit``; its LAST
``implicit_params`` ``(N, P)`` f32      1 row / S rows        optional (``--implicit-store function|both``): each
                                                              row's fitted implicit network + basis, rendered on
                                                              read (with ``guidance``)
=================  ===================  ====================  ======================================================

Every array is declared once, by :meth:`FeatureStoreSchema.arrays` (the main arrays) and
:meth:`FeatureStoreSchema.implicit_arrays` (the optional implicit ones, added by a later pass without changing the
main fingerprint); creating, validating and writing a store all read these declarations.

Rules:

- **hires mode** (``hires_mode``): ``"materialized"`` (default) stores ``hires``; ``"on-read"`` (compact) stores
  ``guidance`` instead, plus the upsampler under the sub-group ``upsampler/`` (its checkpoint files, verified by
  hash on open; :mod:`pipeline.store.compact`), and readers compute ``hires`` from ``lowres`` + ``guidance``
  (:mod:`pipeline.read.on_read`). ``hires_mode`` and ``input_size`` enter the attributes only for on-read stores,
  so every materialized store keeps its fingerprint.

- **Shard size**: ``S = clamp(floor(TARGET_SHARD_BYTES / bytes of one hires row), 1, MAX_ROWS_PER_SHARD)``; the
  same S for every row-aligned array, so shard ``k`` of every array covers rows ``[k*S, (k+1)*S)``.
- **One writer per shard**: the pipeline's unit of work is one shard; :func:`write_shard` writes the unit's whole
  region of every array (deleting any old shard object first, so a torn shard from a crash is replaced, never
  merged), then ``status`` last. A row is complete only when ``status == Status.COMPLETE``.
- **Features dtype**: float16 / float32 are stored as such; bfloat16 is stored as its raw ``uint16`` bits (Zarr has
  no bfloat16) with ``attrs["featup"]["dtype"] == "bfloat16"`` on the group and on each feature array;
  :func:`to_torch` turns either back into a tensor.
- **Format 2** (:mod:`.checksum`, :mod:`.foreign`): crc32c on every chunk, ``dimension_names`` on every array, and
  the string columns also as Parquet under ``rows/parquet/``; format-1 stores are read, not resumed.
- **Attributes** under the key ``"featup"``: the :class:`FeatureStoreSchema` fields, the job settings (backbone,
  weights hash, upsampler config and checkpoint hash, input size, stride, normalisation, resize policy, PCA basis,
  manifest digest), ``fingerprint`` (hash of schema + settings: a rerun with any other value is refused),
  ``code_version`` and ``created``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, StoreError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTRS_KEY",
    "CODECS",
    "DEFAULT_CODEC",
    "DTYPE_BYTES",
    "FORMAT_VERSION",
    "ArraySpec",
    "FeatureStoreSchema",
    "HIRES_MODES",
    "IMPLICIT_STORE_AS",
    "Status",
    "pair",
    "rows_per_shard_for",
    "to_store_dtype",
    "to_torch",
]

#: Version of the layout described above; bumped on any change a reader must know about. 2: crc32c on every chunk,
#: ``dimension_names``, bfloat16 marked on the arrays, Parquet copy of the string columns (:mod:`.foreign`).
FORMAT_VERSION: int = 2
#: Format versions this code reads (format 1 lacks only what format 2 added; it is read unverified).
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
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
#: bilinear in docs/design.md, vs 1.10x / 1.46x for zarr's default zstd) and reads fast, so it is the default.
def _blosc(cname: str) -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=cname, clevel=5, shuffle="shuffle")


def _zstd() -> Any:
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=0)


CODECS: dict[str, Any] = {
    "blosc-zstd": lambda: _blosc("zstd"),
    "blosc-lz4": lambda: _blosc("lz4"),
    "zstd": _zstd,
    "none": lambda: None,
}
DEFAULT_CODEC: str = "blosc-zstd"
#: How ``hires`` is kept: stored (``materialized``) or produced by the reader from the compact arrays (``on-read``).
HIRES_MODES: tuple[str, ...] = ("materialized", "on-read")
#: What the implicit stage keeps per row: the features (``array``), the fitted network evaluated on read
#: (``function``), or both.
IMPLICIT_STORE_AS: tuple[str, ...] = ("array", "function", "both")


class Status(IntEnum):
    """Row states of ``status`` (and ``implicit_status``): the one spelling of these codes."""

    PENDING = 0
    COMPLETE = 1
    FAILED = 2


def rows_per_shard_for(row_bytes: int, target: int = TARGET_SHARD_BYTES) -> int:
    """Rows per shard for one row of ``row_bytes`` (uncompressed ``hires`` bytes): ``clamp(target // row, 1, 1024)``."""
    return int(min(MAX_ROWS_PER_SHARD, max(1, target // max(1, row_bytes))))


def pair(v: Any, name: str) -> tuple[int, int]:
    """A stored size as ``(a, b)`` positive ints (one int means square); :class:`StoreError` naming ``name`` if not."""
    if isinstance(v, (int, np.integer)):
        v = (v, v)
    try:
        a, b = (int(x) for x in v)
    except Exception:
        raise StoreError(f"store field {name} must be a pair of ints, got {v!r}") from None
    if a < 1 or b < 1:
        raise StoreError(f"store field {name} must be positive, got {v!r}")
    return a, b


@dataclass(frozen=True)
class ArraySpec:
    """One array of the layout: what ``zarr.Group.create_array`` gets.

    Attributes:
        shape: the whole array's shape (rows first).
        chunks: inner chunk shape (one row for feature arrays).
        shards: shard shape (S rows) or None for unsharded arrays (one chunk = S rows).
        dtype: numpy dtype name, or ``str`` for strings.
        fill_value: value of unwritten cells.
        codec: key of :data:`CODECS` (feature arrays) or None (zarr's default).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: Any
    fill_value: Any
    shards: tuple[int, ...] | None = None
    codec: str | None = None

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` for this array."""
        out: dict[str, Any] = {"shape": self.shape, "chunks": self.chunks, "dtype": self.dtype,
                               "fill_value": self.fill_value}
        if self.shards is not None:
            out["shards"] = self.shards
        if self.codec is not None:
            out["compressors"] = CODECS[self.codec]()
        return out


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
        hires_mode: one of :data:`HIRES_MODES`; ``"on-read"`` stores ``guidance`` instead of ``hires``.
        input_size: ``(Hin, Win)`` of the backbone input (the ``guidance`` image); required for on-read stores.
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
    # --- compact store mode (issue 14): on-read stores keep ``guidance`` (uint8 input image) instead of ``hires``
    hires_mode: str = "materialized"
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown feature dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.n_rows < 1 or self.channels < 1 or self.rows_per_shard < 1:
            raise StoreError(f"n_rows, channels and rows_per_shard must be >= 1 (got {self})")
        object.__setattr__(self, "lowres_size", pair(self.lowres_size, "lowres_size"))
        object.__setattr__(self, "output_size", pair(self.output_size, "output_size"))
        if self.implicit_size is not None:
            object.__setattr__(self, "implicit_size", pair(self.implicit_size, "implicit_size"))
        if self.hires_mode not in HIRES_MODES:
            raise ConfigError(f"unknown hires mode {self.hires_mode!r}; choose one of {', '.join(HIRES_MODES)}")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", pair(self.input_size, "input_size"))
        elif self.on_read:
            raise StoreError("an on-read store needs input_size (the guidance image size)")

    @property
    def on_read(self) -> bool:
        """True for a compact store (``hires`` produced on read)."""
        return self.hires_mode == "on-read"

    @property
    def guidance_row_bytes(self) -> int:
        """Uncompressed bytes of one row of ``guidance`` (0 for a materialized store)."""
        return 0 if not self.on_read else 3 * self.input_size[0] * self.input_size[1]

    def materialized(self) -> "FeatureStoreSchema":
        """The materialized schema with the same settings (what ``jobs/materialize.py`` writes); ``rows_per_shard``
        re-derived from the ``hires`` row size."""
        probe = replace(self, hires_mode="materialized", input_size=None, rows_per_shard=1)
        return replace(probe, rows_per_shard=rows_per_shard_for(probe.hires_row_bytes))

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
        """Uncompressed bytes of one row of all feature arrays (``lowres + hires [+ implicit]``; on-read:
        ``lowres + guidance [+ implicit]``)."""
        h, w = self.lowres_size
        n = self.channels * h * w * DTYPE_BYTES[self.dtype]
        n += self.guidance_row_bytes if self.on_read else self.hires_row_bytes
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
        out = {"lowres": (self.channels, *self.lowres_size)}
        if not self.on_read:
            out["hires"] = (self.channels, *self.output_size)
        if self.implicit_size is not None:
            out["implicit"] = (self.channels, *self.implicit_size)
        return out

    def _feature(self, row_shape: tuple[int, ...]) -> ArraySpec:
        rows = min(self.n_rows, self.rows_per_shard)
        return ArraySpec(
            shape=(self.n_rows, *row_shape), chunks=(1, *row_shape), shards=(rows, *row_shape),
            dtype=self.storage_dtype, fill_value=0, codec=self.codec,
        )

    def _per_row(self, dtype: Any, fill_value: Any, *row_shape: int) -> ArraySpec:
        rows = min(self.n_rows, self.rows_per_shard)
        return ArraySpec(shape=(self.n_rows, *row_shape), chunks=(rows, *row_shape), dtype=dtype,
                         fill_value=fill_value)

    def arrays(self) -> dict[str, ArraySpec]:
        """Every array of the main layout, by name, in creation order (``status`` last)."""
        out = {name: self._per_row(str, "") for name in ("image_id", "uri", "error")}
        out.update({name: self._per_row("int32", 0, 2) for name in ("orig_size", "valid_size")})
        out.update({name: self._feature(shape) for name, shape in self.feature_arrays().items()})
        if self.on_read:  # compact store: the guidance image
            out["guidance"] = self.guidance_array()
        out["status"] = self._per_row("uint8", int(Status.PENDING))
        return out

    def guidance_array(self, input_size: tuple[int, int] | None = None) -> ArraySpec:
        """``guidance (N, Hin, Win, 3) uint8``: the decoded, resized input image, chunked and sharded like a feature
        array, lossless (the store's codec). Kept by on-read stores (for ``hires``) and by implicit-function stores
        (the colour the implicit networks read); ``input_size`` defaults to the schema's."""
        rows = min(self.n_rows, self.rows_per_shard)
        row = (*pair(input_size or self.input_size, "input_size"), 3)
        return ArraySpec(shape=(self.n_rows, *row), chunks=(1, *row), shards=(rows, *row), dtype="uint8",
                         fill_value=0, codec=self.codec)

    def implicit_arrays(
        self,
        size: tuple[int, int],
        *,
        store_as: str = "array",
        function_size: int | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> dict[str, ArraySpec]:
        """The implicit arrays, in creation order (``implicit_status`` last).

        Args:
            size: ``(Hi, Wi)`` of the ``implicit`` features (stored, or the functions' default render size).
            store_as: one of :data:`IMPLICIT_STORE_AS`: ``"array"`` = ``implicit`` with the dtype, codec and
                sharding of ``hires``; ``"function"`` = ``implicit_params (N, P) float32`` (each row's fitted
                network and basis, sharded like a feature array, the store's codec) plus :meth:`guidance_array`
                unless the store already has it (on-read); ``"both"`` = all of them.
            function_size: P, floats per row (``featup_ops.implicit_function.function_layout(...).size``); needed
                unless ``store_as == "array"``.
            input_size: ``(Hin, Win)`` of the guidance image (the store's input size).

        Then ``implicit_error`` and ``implicit_status``.
        """
        hi, wi = pair(size, "implicit_size")
        if store_as not in IMPLICIT_STORE_AS:
            raise ConfigError(f"--implicit-store {store_as!r} is not one of {', '.join(IMPLICIT_STORE_AS)}")
        out: dict[str, ArraySpec] = {}
        if store_as in ("array", "both"):
            out["implicit"] = self._feature((self.channels, hi, wi))
        if store_as in ("function", "both"):
            if not function_size or function_size < 1:
                raise StoreError(f"implicit functions need their length per row, got {function_size!r}")
            rows = min(self.n_rows, self.rows_per_shard)
            p = int(function_size)
            out["implicit_params"] = ArraySpec(shape=(self.n_rows, p), chunks=(1, p), shards=(rows, p),
                                               dtype="float32", fill_value=0, codec=self.codec)
            if not self.on_read:  # an on-read store has it already (main arrays)
                out["guidance"] = self.guidance_array(input_size)
        out["implicit_error"] = self._per_row(str, "")
        out["implicit_status"] = self._per_row("uint8", int(Status.PENDING))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lowres_size"] = list(self.lowres_size)
        d["output_size"] = list(self.output_size)
        d["implicit_size"] = None if self.implicit_size is None else list(self.implicit_size)
        if self.on_read:
            d["input_size"] = list(self.input_size)
        else:  # materialized stores keep the attributes (and fingerprint) they had before on-read mode existed
            del d["hires_mode"], d["input_size"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureStoreSchema":
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"feature store format_version {version!r} is not one of {READABLE_VERSIONS}; read it with the "
                "version that wrote it, or featurize the images again into a new --output"
            )
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def to_torch(values: np.ndarray, dtype: str) -> "torch.Tensor":
    """Stored feature values -> a tensor of the logical dtype (``bfloat16`` bits are reinterpreted, not cast)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def to_store_dtype(t: "torch.Tensor", dtype: str) -> np.ndarray:
    """A tensor -> numpy in the store's storage dtype (``bfloat16`` as its raw ``uint16`` bits); inverse of
    :func:`to_torch`."""
    import torch

    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()
