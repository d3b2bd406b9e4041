"""The implicit features' part of a feature store: arrays, recorded settings, pending rows, row writes.

Arrays (row-aligned with the manifest, like every other array):

* ``implicit (N, C, Hi, Wi)``: dtype and codec of ``hires`` (bfloat16 as uint16 bits, like ``hires``); inner chunk
  one row, shard ``rows_per_shard`` rows; projected with the store's PCA basis when it has one.
* ``implicit_error (N,) str``: why a row's fit failed (``""`` otherwise); chunk ``rows_per_shard`` rows.
* ``implicit_status (N,) uint8``: :class:`pipeline.store.schema.Status` per row; written LAST for each unit, so a
  row's implicit features are complete only when ``implicit_status == Status.COMPLETE``.
* ``--implicit-store function`` (or ``both``): ``implicit_params (N, P) float32``, each row's fitted network and
  basis (``featup_ops.implicit_function``; P from the recorded ``ImplicitConfig``, see :func:`function_layout_of`),
  folded onto the store's PCA basis when it has one, plus ``guidance (N, Hin, Win, 3) uint8`` (the colour the
  networks read; an on-read store has it already). Readers render ``implicit`` from them at any size
  (:mod:`pipeline.read.implicit_function`). ``function`` stores no ``implicit`` array; ``both`` stores both.

The settings that change the implicit bytes are recorded in the group attrs under :data:`ATTRS_KEY` (kept apart
from the main ``featup`` attrs, so adding implicit features never changes the main store's fingerprint). Filling a
store whose recorded implicit settings differ is refused with one clear line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.store.foreign import array_kwargs
from pipeline.store.schema import IMPLICIT_STORE_AS, FeatureStoreSchema, Status
from pipeline.store.zarr_store import code_version, complete_rows, read_attrs

if TYPE_CHECKING:  # pragma: no cover
    import zarr

__all__ = [
    "ATTRS_KEY",
    "IMPLICIT",
    "IMPLICIT_ERROR",
    "IMPLICIT_STATUS",
    "IMPLICIT_PARAMS",
    "function_layout_of",
    "implicit_config_of",
    "add_implicit_arrays",
    "check_implicit",
    "implicit_settings",
    "pending_implicit_rows",
    "write_implicit_rows",
]

IMPLICIT, IMPLICIT_ERROR, IMPLICIT_STATUS = "implicit", "implicit_error", "implicit_status"
IMPLICIT_PARAMS, GUIDANCE = "implicit_params", "guidance"
"""Names of the arrays :meth:`pipeline.store.schema.FeatureStoreSchema.implicit_arrays` declares."""
ATTRS_KEY = "featup_implicit"
"""Group attrs key holding the implicit settings (not fingerprinted by the main store)."""
FORMAT_VERSION = 1
"""Version of the implicit arrays' layout; bump when it changes."""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(value), sort_keys=True).encode()).hexdigest()[:16]


def function_layout_of(attrs: dict[str, Any], config: Any) -> Any:
    """The ``featup_ops.implicit_function.FunctionLayout`` of the functions a fit with ``config`` stores on a store
    with main attributes ``attrs``: k = ``min(proj_dim, backbone channels)`` coefficients of the store's channels
    (the PCA basis folded in when the store has one)."""
    from featup_ops.implicit_function import function_layout

    backbone_channels = len(attrs["pca"]["mean"]) if attrs.get("pca") else int(attrs["channels"])
    return function_layout(config, min(int(config.proj_dim), backbone_channels), int(attrs["channels"]))


def implicit_config_of(recorded: dict[str, Any]) -> Any:
    """The ``featup_ops.ImplicitConfig`` recorded in a store's :data:`ATTRS_KEY` attributes."""
    from featup_ops.config import ImplicitConfig

    return ImplicitConfig.from_dict(recorded["config"])


def implicit_settings(
    attrs: dict[str, Any], *, preset: str, config: Any, output_size: tuple[int, int] | None, seed: int,
    store_as: str = "array",
) -> dict[str, Any]:
    """The implicit settings to record on this store for a fit (JSON-able).

    Args:
        preset: the preset's name (``"custom"`` for an explicit config).
        config: the ``featup_ops.ImplicitConfig`` fitted with.
        output_size: ``(Hi, Wi)``; None = the store's hires output size.
        seed: the fitting seed.
        store_as: ``"array"``, ``"function"`` or ``"both"`` (:data:`pipeline.store.schema.IMPLICIT_STORE_AS`);
            recorded (with ``function_size``, ``function_k``) only when not ``"array"``, so array stores keep
            the fingerprint they had before functions existed.

    ``fingerprint`` hashes everything that changes the bytes of ``implicit`` (or of ``implicit_params``): the fit
    config, output size, seed, backbone and weights, input size and resize policy, channels, PCA basis, dtype and
    what is stored.
    """
    out = output_size or tuple(int(s) for s in attrs["output_size"])
    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "config": _jsonable(config),
        "output_size": [int(out[0]), int(out[1])],
        "seed": int(seed),
        "backbone": attrs["backbone"],
        "weights_hash": attrs["weights_hash"],
        "input_size": _jsonable(attrs["input_size"]),
        "resize_policy": attrs["resize_policy"],
        "channels": int(attrs["channels"]),
        "pca_hash": None if attrs.get("pca") is None else _hash(attrs["pca"]),
        "dtype": attrs["dtype"],
    }
    if store_as not in IMPLICIT_STORE_AS:
        raise ConfigError(f"--implicit-store {store_as!r} is not one of {', '.join(IMPLICIT_STORE_AS)}")
    if store_as != "array":
        layout = function_layout_of(attrs, config)
        settings.update(store_as=store_as, function_size=layout.size, function_k=layout.k)
    settings["fingerprint"] = _hash(settings)
    settings["code_version"] = code_version()
    settings["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return settings


_UNFINGERPRINTED = ("fingerprint", "code_version", "created")


def check_implicit(
    attrs: dict[str, Any],
    recorded: dict[str, Any] | None,
    *,
    preset: str,
    config: Any,
    output_size: tuple[int, int] | None,
    seed: int,
    store_as: str = "array",
) -> dict[str, Any]:
    """The settings a fit would record on a store with main attributes ``attrs``, refused with one line when the
    store already records others (``recorded``: its :data:`ATTRS_KEY` attributes, or None). Changes nothing.

    Raises:
        StoreMismatchError: the store already holds implicit features made with other settings.
    """
    settings = implicit_settings(attrs, preset=preset, config=config, output_size=output_size, seed=seed,
                                 store_as=store_as)
    if recorded is not None and recorded.get("fingerprint") != settings["fingerprint"]:
        diff = [
            f"{k}: {json.dumps(recorded.get(k))[:40]} -> {json.dumps(settings.get(k))[:40]}"
            for k in sorted(set(settings) | set(recorded))  # a key only one side has differs too (store_as)
            if k not in _UNFINGERPRINTED and recorded.get(k) != settings.get(k)
        ]
        raise StoreMismatchError(
            f"store already holds implicit features made with other settings ({'; '.join(diff[:3])}); rerun "
            f"with the recorded settings (store attrs {ATTRS_KEY!r}) or write to a fresh store"
        )
    return settings


def add_implicit_arrays(
    group: "zarr.Group", *, preset: str, config: Any, output_size: tuple[int, int] | None, seed: int,
    store_as: str = "array",
) -> dict[str, Any]:
    """Add ``implicit``, ``implicit_error`` and ``implicit_status`` to a store (idempotent) and record the settings.

    The arrays are :meth:`pipeline.store.schema.FeatureStoreSchema.implicit_arrays`; arrays that exist with the
    right shape are kept (resume), and the settings are written to attrs after the arrays exist. Called by the
    sink's ``on_write_start`` (driver), before any writer starts.

    Args:
        group: the store, opened writable (``pipeline.store.open_store(uri, mode="r+")``).
        preset / config / output_size / seed / store_as: what the fit is and keeps (see :func:`implicit_settings`).

    Returns:
        The recorded settings (see :func:`implicit_settings`).

    Raises:
        StoreMismatchError: the store already holds implicit features made with other settings.
    """
    attrs = read_attrs(group)
    recorded = group.attrs.get(ATTRS_KEY)
    settings = check_implicit(attrs, recorded, preset=preset, config=config, output_size=output_size, seed=seed,
                              store_as=store_as)
    schema = FeatureStoreSchema.from_dict(attrs)
    have = set(group.array_keys())
    specs = schema.implicit_arrays(settings["output_size"], store_as=store_as,
                                   function_size=settings.get("function_size"), input_size=attrs["input_size"])
    for name, spec in specs.items():  # implicit_status last
        if name in have:
            if tuple(group[name].shape) != spec.shape:
                raise StoreMismatchError(
                    f"store array {name!r} has shape {tuple(group[name].shape)}, expected {spec.shape}; "
                    "write the implicit features to a fresh store"
                )
            continue
        group.create_array(name, **array_kwargs(name, spec.create_kwargs(), feature_dtype=schema.dtype))
    if recorded is None:
        group.attrs[ATTRS_KEY] = settings
        return settings
    return dict(recorded)


def pending_implicit_rows(
    group: "zarr.Group",
    rows: Sequence[int] | None = None,
    limit: int | None = None,
    *,
    require_complete: bool = True,
) -> np.ndarray:
    """Rows that still need implicit features, in row order.

    Args:
        group: the store.
        rows: restrict to these row indices (out-of-range indices raise); None = all rows.
        limit: keep only the first ``limit`` pending rows.
        require_complete: only rows whose main ``status`` is complete (the second pass); False = every row
            (the featurize job, which decodes its rows itself).

    Returns:
        ``(n,) int64`` row indices whose ``implicit_status`` is pending.
    """
    n = int(group["status"].shape[0])
    done = np.asarray(group[IMPLICIT_STATUS][:]) != Status.PENDING if IMPLICIT_STATUS in group else np.zeros(n, bool)
    mask = ~done
    if require_complete:
        mask &= np.isin(np.arange(n), complete_rows(group))
    if rows is not None:
        sel = np.unique(np.asarray(list(rows), dtype=np.int64))
        bad = sel[(sel < 0) | (sel >= n)]
        if bad.size:
            raise ConfigError(f"--rows {bad.tolist()[:5]} out of range: the store has rows 0..{n - 1}")
        keep = np.zeros(n, dtype=bool)
        keep[sel] = True
        mask &= keep
    out = np.flatnonzero(mask).astype(np.int64)
    if limit is not None:
        out = out[: max(int(limit), 0)]
    return out


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of sorted ``rows`` as ``(start_row, stop_row, offset of start_row in rows)``."""
    runs = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        runs.append((int(rows[i]), int(rows[j]) + 1, i))
        i = j + 1
    return runs


def write_implicit_rows(
    group: "zarr.Group",
    rows: np.ndarray,
    feats: np.ndarray | None,
    status: np.ndarray,
    errors: Sequence[str],
    *,
    params: np.ndarray | None = None,
    guidance: np.ndarray | None = None,
) -> None:
    """Write one unit's implicit rows: features (and/or functions) of complete rows, then reasons, then
    ``implicit_status`` last.

    Each contiguous run of rows is one region write; a run that does not cover its whole shard is a
    read-modify-write of that shard object (atomic on local disk and S3), safe because a unit is the shard's only
    writer.

    Args:
        group: the store (writable) holding the implicit arrays.
        rows: ``(n,) int64`` sorted row indices, all in one shard.
        feats: ``(n, C, Hi, Wi)`` in the store's storage dtype (rows whose status is not complete are not
            written), or None when no row is complete.
        status: ``(n,) uint8`` COMPLETE or FAILED per row.
        errors: ``n`` reasons (``""`` for complete rows).
        params: ``(n, P) float32`` the rows' functions (``implicit_params``), or None.
        guidance: ``(n, Hin, Win, 3) uint8`` the rows' images (``guidance``), or None (not stored, or an on-read
            store whose main arrays hold it).
    """
    rows = np.asarray(rows, dtype=np.int64)
    status = np.asarray(status, dtype=np.uint8)
    ok = np.flatnonzero(status == Status.COMPLETE)
    for name, values in ((IMPLICIT, feats), (IMPLICIT_PARAMS, params), (GUIDANCE, guidance)):
        if values is None or not ok.size:
            continue
        arr = group[name]
        for start, stop, off in _runs(rows[ok]):
            arr[start:stop] = values[ok[off : off + stop - start]]
    errs = np.asarray([str(e) for e in errors], dtype=str)
    for start, stop, off in _runs(rows):
        group[IMPLICIT_ERROR][start:stop] = errs[off : off + stop - start]
    for start, stop, off in _runs(rows):
        group[IMPLICIT_STATUS][start:stop] = status[off : off + stop - start]
