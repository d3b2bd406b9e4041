"""``hires`` of an on-read (compact) store, produced where it is consumed.

An on-read store keeps ``lowres`` (store dtype), ``guidance`` (``uint8`` input image) and its upsampler
(:mod:`pipeline.store.compact`). :func:`hires_from_compact` runs the materialized mode's computation on them::

    hires = cast_to_store_dtype( upsample( lowres + s, imagenet(normalize(guidance)), size ) - s ) -> float32

with ``s = P m`` for a store with a PCA basis (components P, mean m; 0 without PCA), so values equal a materialized
store made with the same settings within the store dtype's rounding: the materialized mode computes
``up(P f) - P m``, exact for any upsampler linear in the features, also one whose weights do not sum to 1 (a JBU with
FeatUp's kernel fix-up), and ``lowres + s = P f`` up to the rounding of ``lowres``, which the upsamplers' per-pixel
(nearly convex) combinations do not amplify.

:class:`OnReadHires` is the reader's handle: it loads (and so verifies) the stored upsampler when it is built,
never pickles it, and reloads it lazily in each process (DataLoader workers, Ray tasks).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.store.schema import FeatureStoreSchema, pair

__all__ = ["OnReadHires", "hires_from_compact", "is_on_read", "pca_shift", "store_normalization"]


def pca_shift(attrs: dict[str, Any]) -> "np.ndarray | None":
    """``(k,) float32`` ``P m`` of a store's PCA basis (``attrs["pca"]``), computed in float32 as the featurize
    stage does; None for a store without PCA."""
    if not attrs.get("pca"):
        return None
    import torch

    from featup_ops.pca import PCABasis

    basis = PCABasis.from_dict(attrs["pca"])
    comps = torch.as_tensor(basis.components, dtype=torch.float32)
    return (comps @ torch.as_tensor(basis.mean, dtype=torch.float32)).numpy()


def store_normalization(attrs: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the backbone's input normalisation a store records (``attrs["normalization"]``): what a
    reader applies to the stored ``guidance`` image before an upsampler or implicit network sees it."""
    norm = attrs.get("normalization") or {}
    return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])


def is_on_read(attrs: dict[str, Any]) -> bool:
    """True when a store's attributes describe an on-read (compact) store."""
    return attrs.get("hires_mode") == "on-read"


def hires_from_compact(
    lowres: "np.ndarray | Any",
    guidance: "np.ndarray | Any",
    upsampler: Any,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    dtype: str,
    size: tuple[int, int],
    device: str = "cpu",
    batch_size: int = 64,
    pca_shift: "np.ndarray | None" = None,
) -> Any:
    """Upsample stored rows on ``device``.

    Args:
        lowres: ``(B, C, h, w)`` stored low-res features in the storage dtype (``bfloat16`` as ``uint16`` bits), a
            numpy array or tensor.
        guidance: ``(B, H, W, 3) uint8`` stored guidance images.
        upsampler: the store's upsampler (``up(feats, image, size)``), on ``device``; kinds that normalise the
            low-res features themselves get them as stored (already normalised) through ``upsample_prepared``.
        mean, std: the backbone's normalisation (the store's ``normalization`` attribute).
        dtype: the store dtype (``float16``, ``bfloat16``, ``float32``): the result is rounded to it, as stored.
        size: ``(Ho, Wo)`` of the output.
        device: torch device to compute on (``"cuda"``: batched on the GPU of the calling process).
        batch_size: rows per upsampler call.
        pca_shift: ``(C,) float32`` ``P m`` of the store's PCA basis (:func:`pca_shift`); None without PCA.

    Returns:
        ``(B, C, Ho, Wo) float32`` tensor on ``device``.
    """
    import torch

    from featup_ops.guidance import guidance_image, split_upsampler
    from pipeline.store.schema import to_torch

    upsample = split_upsampler(upsampler)[1]  # stored lowres are already prepared (FeatUp ChannelNorm, LoftUp)
    low = lowres if isinstance(lowres, torch.Tensor) else to_torch(np.asarray(lowres), dtype)
    img = guidance if isinstance(guidance, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(guidance))
    n = int(low.shape[0])
    out = torch.empty((n, int(low.shape[1]), *size), dtype=torch.float32, device=device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    store_dt = getattr(torch, dtype)
    shift = None if pca_shift is None else torch.as_tensor(pca_shift, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    with torch.inference_mode():
        for a in range(0, n, batch_size):
            f = low[a : a + batch_size].to(device, non_blocking=True).to(torch.float32)
            # the same operations as pipeline.io.decode.normalize, on the device
            x = img[a : a + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
            x = guidance_image(x.div_(255.0).sub_(m).div_(s), mean, std)  # as featurize_pixels: ImageNet
            high = upsample(f, x, size) if shift is None else upsample(f + shift, x, size) - shift
            out[a : a + len(f)] = high.to(store_dt).to(torch.float32)
    return out


class OnReadHires:
    """Produces ``hires`` rows of one on-read store (the upsampler loaded once per process).

    Args:
        store: the store's path or URI.
        attrs: its ``featup`` attributes.
        storage_options: fsspec options.
        device: where the upsampler runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        size: ``(Ho, Wo)`` of the produced ``hires``; None = the store's output size.
        batch_size: rows per upsampler call.

    Raises:
        pipeline.errors.StoreError: the stored upsampler is missing, corrupt or not the store's (one line).
    """

    def __init__(
        self,
        store: str,
        attrs: dict[str, Any],
        *,
        storage_options: dict[str, Any] | None = None,
        device: str = "cpu",
        size: int | tuple[int, int] | None = None,
        batch_size: int = 64,
    ) -> None:
        from pipeline.store.compact import load_store_upsampler

        self.store, self.attrs, self.storage_options = store, dict(attrs), storage_options
        self.schema = FeatureStoreSchema.from_dict(self.attrs)
        self.device = str(device)
        self.size = self.schema.output_size if size is None else pair(size, "size")
        lh, lw = self.schema.lowres_size
        if self.size[0] < lh or self.size[1] < lw:
            raise ConfigError(f"size={self.size} is smaller than the store's {lh}x{lw} low-res grid; upsamplers only enlarge")
        self.mean, self.std = store_normalization(self.attrs)
        self.batch_size = int(batch_size)
        self.pca_shift = pca_shift(self.attrs)
        up = load_store_upsampler(store, self.attrs, storage_options=storage_options, device="cpu")  # verifies now
        self.channel_agnostic = bool(getattr(up, "channel_agnostic", False))
        self._up: Any = up
        self._up_device = "cpu"
        self._pid: int | None = os.getpid()

    #: FeatureDataset names this array when a chunk fails its checksum.
    damage_array = "lowres"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_up"], state["_pid"], state["_up_device"] = None, None, "cpu"
        return state

    @property
    def array_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, Ho, Wo)`` of the ``hires`` this produces."""
        return (self.schema.n_rows, self.schema.channels, *self.size)

    def read(self, dataset: Any, start: int, stop: int) -> Any:
        """Rows ``[start, stop)`` for a dataset: :func:`read_on_read`."""
        return read_on_read(dataset, start, stop)

    def upsampler(self) -> Any:
        """This process's upsampler on :attr:`device` (loaded from the store on first use after a fork/unpickle)."""
        pid = os.getpid()
        if self._up is None or self._pid != pid:
            from pipeline.store.compact import load_store_upsampler

            self._up = load_store_upsampler(self.store, self.attrs, storage_options=self.storage_options)
            self._up_device, self._pid = "cpu", pid
        if self._up_device != self.device:
            self._up = self._up.to(self.device)
            self._up_device = self.device
        return self._up

    def __call__(self, lowres: np.ndarray, guidance: np.ndarray) -> Any:
        """``(B, C, h, w)`` stored lowres + ``(B, H, W, 3) uint8`` guidance -> ``(B, C, Ho, Wo) float32`` on device."""
        return hires_from_compact(
            lowres, guidance, self.upsampler(), mean=self.mean, std=self.std, dtype=self.schema.dtype,
            size=self.size, device=self.device, batch_size=self.batch_size, pca_shift=self.pca_shift,
        )


# ------------------------------------------------------------------------------------ FeatureDataset hooks


def open_on_read(dataset: Any, group: Any, array: str, size: int | tuple[int, int] | None) -> Any:
    """For :class:`pipeline.read.dataset.FeatureDataset`: what produces its rows on read, or None when they are read
    as stored (``size`` is then refused: a stored array has one size). An :class:`OnReadHires` for ``"hires"`` of an
    on-read store; a :class:`pipeline.read.implicit_function.OnReadImplicit` for ``"implicit"`` of a store that
    keeps implicit functions. Either has ``array_shape``, ``read(dataset, start, stop)`` (a float32 tensor on the
    device), ``channel_agnostic`` and ``damage_array``."""
    if array == "hires" and is_on_read(dataset.attrs):
        return OnReadHires(
            dataset.store, dataset.attrs, storage_options=dataset.storage_options, device=dataset.device, size=size
        )
    if array == "implicit":
        from pipeline.read.implicit_function import open_implicit_function

        return open_implicit_function(dataset, group, size)
    if size is not None:
        raise ConfigError(
            f"size={size} needs hires of an on-read store (featurize with --hires on-read); the stored {array!r} "
            "array has one size"
        )
    return None


def read_on_read(dataset: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of an on-read store's ``hires`` for a dataset (its channel selection and crop
    applied): ``(n, C', H', W') float32`` tensor on the dataset's device."""
    on: OnReadHires = dataset._on_read
    pid = os.getpid()
    if getattr(dataset, "_compact_pid", None) != pid:
        from pipeline.store import open_store

        g = open_store(dataset.store, mode="r", storage_options=dataset.storage_options)
        dataset._compact = (g["lowres"], g["guidance"])
        dataset._compact_pid = pid
    low_arr, guid_arr = dataset._compact
    ch = dataset._ch if on.channel_agnostic else slice(None)  # agnostic: upsample only the channels asked for
    low = np.asarray(low_arr[start:stop, ch])
    hires = on(low, np.asarray(guid_arr[start:stop]))
    if not on.channel_agnostic:
        hires = hires[:, dataset._ch]
    return hires[:, :, dataset._ys, dataset._xs]
