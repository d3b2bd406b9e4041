"""``implicit`` of a store that keeps implicit functions (``--implicit-store function|both``), rendered where read.

Such a store keeps, per row, the fitted implicit network and its basis as one float32 vector (``implicit_params``,
layout :func:`featup_ops.implicit_function.function_layout` of the recorded ``ImplicitConfig``; the store's PCA
basis already folded in) and the input image (``guidance``, uint8). :class:`OnReadImplicit` rebuilds a run of rows'
networks and renders them on the reader's device, at the recorded implicit size or any ``size=``::

    implicit = cast_to_store_dtype( render(params, normalize(guidance), size) ) -> float32

which equals what ``--implicit-store array`` stores (the same fit, the same readout
:func:`featup_ops.implicit.render_networks`) within the store dtype's rounding. The recorded config, the layout's
length and the arrays' shapes are checked when the reader is built: a store whose functions do not match its
settings is refused with one line naming them; a damaged chunk fails its crc32c on read (one line naming the row).
Handles are opened lazily per process and never pickled (fork and pickle safe, as ``FeatureDataset``).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StoreError
from pipeline.read.on_read import store_normalization
from pipeline.store.implicit import ATTRS_KEY, GUIDANCE, IMPLICIT_PARAMS, function_layout_of, implicit_config_of
from pipeline.store.schema import FeatureStoreSchema, pair

__all__ = ["OnReadImplicit", "open_implicit_function", "stores_functions"]

#: Rows whose networks are evaluated as one batched op.
RENDER_ROWS = 8


def stores_functions(recorded: dict[str, Any] | None) -> bool:
    """True when a store's implicit settings (its ``featup_implicit`` attributes) say it keeps functions."""
    return bool(recorded) and recorded.get("store_as", "array") in ("function", "both")


class OnReadImplicit:
    """Produces ``implicit`` rows of one store that keeps implicit functions.

    Args:
        store: the store's path or URI.
        attrs: its ``featup`` attributes.
        recorded: its ``featup_implicit`` attributes (the fit's settings).
        group: the store, open for reading (checked here, not kept).
        storage_options: fsspec options.
        device: where the networks run (``"cpu"``, ``"cuda"``, ...).
        size: ``(Ho, Wo)`` rendered; None = the recorded implicit size.
        batch_size: rows rendered as one batched op.

    Raises:
        pipeline.errors.StoreError: the functions are missing, or their length or shape is not what the recorded
            settings describe (one line naming the array and the fix).
    """

    damage_array = IMPLICIT_PARAMS  # FeatureDataset names this array when a chunk fails its checksum
    channel_agnostic = False

    def __init__(
        self,
        store: str,
        attrs: dict[str, Any],
        recorded: dict[str, Any],
        group: Any,
        *,
        storage_options: dict[str, Any] | None = None,
        device: str = "cpu",
        size: int | tuple[int, int] | None = None,
        batch_size: int = RENDER_ROWS,
    ) -> None:
        self.store, self.attrs, self.storage_options = store, dict(attrs), storage_options
        self.device = str(device)
        self.batch_size = max(1, int(batch_size))
        schema = FeatureStoreSchema.from_dict(self.attrs)
        self.dtype = schema.dtype
        try:
            self.layout = function_layout_of(self.attrs, implicit_config_of(recorded))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"store {store!r}: its recorded implicit config cannot be rebuilt ({e}); refit with "
                             "jobs/fit_implicit.py --implicit-store function into a fresh store") from None
        n, p = schema.n_rows, self.layout.size
        for name in (IMPLICIT_PARAMS, GUIDANCE):
            if name not in group:
                raise StoreError(f"store {store!r}: its implicit functions' {name!r} array is missing; refit with "
                                 "jobs/fit_implicit.py --implicit-store function into a fresh store")
        have = tuple(int(s) for s in group[IMPLICIT_PARAMS].shape)
        if recorded.get("function_size") != p or have != (n, p):
            raise StoreError(
                f"store {store!r}: its implicit networks {IMPLICIT_PARAMS!r} {have} (recorded length "
                f"{recorded.get('function_size')}) are not the ones its implicit settings describe ({n}, {p}); "
                "refit with jobs/fit_implicit.py --implicit-store function into a fresh store"
            )
        hin, win = pair(self.attrs["input_size"], "input_size")
        if tuple(int(s) for s in group[GUIDANCE].shape) != (n, hin, win, 3):
            raise StoreError(f"store {store!r}: its {GUIDANCE!r} array {tuple(group[GUIDANCE].shape)} is not the "
                             f"({n}, {hin}, {win}, 3) input image; featurize the images into a fresh store")
        self.size = pair(recorded["output_size"], "implicit output_size") if size is None else pair(size, "size")
        self.array_shape: tuple[int, int, int, int] = (n, self.layout.channels, *self.size)
        self.mean, self.std = store_normalization(self.attrs)
        self._arrays: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = None, None
        return state

    def _handles(self) -> tuple[Any, Any]:
        """This process's ``(implicit_params, guidance)`` handles (opened on first use, reopened after a fork)."""
        pid = os.getpid()
        if self._arrays is None or self._pid != pid:
            from pipeline.store import open_store

            g = open_store(self.store, mode="r", storage_options=self.storage_options)
            self._arrays, self._pid = (g[IMPLICIT_PARAMS], g[GUIDANCE]), pid
        return self._arrays

    def __call__(self, params: np.ndarray, guidance: np.ndarray, rows: np.ndarray | None = None) -> Any:
        """Render stored rows.

        Args:
            params: ``(B, P) float32`` stored functions.
            guidance: ``(B, Hin, Win, 3) uint8`` stored images.
            rows: ``(B,)`` their row numbers (named when a row's function is not finite).

        Returns:
            ``(B, C, Ho, Wo) float32`` tensor on :attr:`device`, rounded to the store dtype as stored features are.

        Raises:
            pipeline.errors.StoreError: a row's stored function holds non-finite values.
        """
        import torch

        from featup_ops.implicit_function import ImplicitFunctions
        from pipeline.io.decode import normalize

        p = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32))
        bad = (~torch.isfinite(p).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            row = int(rows[bad[0]]) if rows is not None else bad[0]
            raise StoreError(f"store {self.store!r}: row {row}'s implicit network ({IMPLICIT_PARAMS!r}) holds "
                             "non-finite values; refit the row (reset its implicit_status, rerun fit_implicit)")
        images = normalize(np.asarray(guidance), self.mean, self.std).to(self.device)  # as the fit's input
        out = ImplicitFunctions(p, self.layout).render(images, self.size, group_size=self.batch_size)
        return out.to(getattr(torch, self.dtype)).to(torch.float32)

    def read(self, dataset: Any, start: int, stop: int) -> Any:
        """Rows ``[start, stop)`` for a ``FeatureDataset`` (its channel selection and crop applied):
        ``(n, C', H', W') float32`` tensor on the device."""
        params, guidance = self._handles()
        out = self(np.asarray(params[start:stop]), np.asarray(guidance[start:stop]), np.arange(start, stop))
        return out[:, dataset._ch, dataset._ys, dataset._xs]


def open_implicit_function(dataset: Any, group: Any, size: int | tuple[int, int] | None) -> OnReadImplicit | None:
    """For ``FeatureDataset(store, "implicit")``: an :class:`OnReadImplicit` when the store keeps functions and
    they are to be read (``function`` stores always; ``both`` when a ``size`` is asked for), else None (the stored
    ``implicit`` array is read; a ``size`` is then refused)."""
    recorded = dict(group.attrs.get(ATTRS_KEY) or {})
    if not stores_functions(recorded):
        if size is not None:
            raise ConfigError(
                f"size={size} needs implicit functions (fit with --implicit-store function or both); the stored "
                "'implicit' array has one size"
            )
        return None
    if recorded.get("store_as") == "both" and size is None:
        return None
    return OnReadImplicit(dataset.store, dataset.attrs, recorded, group, storage_options=dataset.storage_options,
                          device=dataset.device, size=size)
