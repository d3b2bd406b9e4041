"""The featurize plan's compact (``--hires on-read``) pieces: what a featurizer actor emits for an on-read store, and
the checks the driver runs before such a job.

An on-read unit carries ``lowres`` (backbone features, PCA applied, store dtype) and ``guidance`` (the decoded,
resized ``uint8`` image the backbone saw) instead of ``hires``; the same :class:`pipeline.store.sink.ZarrFeatureDatasink`
writes it. The reader reproduces ``hires`` as the materialized mode computes it: ``upsampler(lowres, image, size)``,
with PCA ``upsampler(lowres + P m, image, size) - P m`` (:mod:`pipeline.read.on_read`), exact because the upsampler
is channel-agnostic (per-pixel weights that do not depend on the features, so it commutes with the linear part of the
projection); other upsamplers with PCA are refused (:func:`check_on_read`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.store.schema import to_store_dtype

__all__ = ["check_on_read", "compact_output", "featurize_lowres"]


def check_on_read(upsampler: Any, pca: int | None) -> None:
    """Refuse on-read settings whose ``hires`` could not be reproduced from the stored ``lowres``.

    Raises:
        ConfigError: ``--pca`` with an upsampler that mixes channels (not ``channel_agnostic``).
    """
    if pca is not None and not getattr(upsampler, "channel_agnostic", False):
        raise ConfigError(
            f"--hires on-read with --pca needs a channel-agnostic upsampler, and {type(upsampler).__name__} mixes "
            "channels (the stored k PCA channels cannot reproduce it); drop --pca or use --hires materialized"
        )


def featurize_lowres(
    pixels: np.ndarray, backbone: Any, *, batch_size: int, pca: Any = None, out_dtype: str = "float32",
    prepare: Any = None,
) -> Any:
    """Backbone (+ the upsampler's low-res preprocessing ``prepare``, + PCA) only: ``(B, H, W, 3) uint8`` ->
    ``(B, C, h, w)`` tensor of ``out_dtype`` on the CPU.

    The same operations as :func:`pipeline.featurize.stages.featurize_pixels`' low-res output.
    """
    import torch

    from featup_ops.pca import apply_pca
    from pipeline.io.decode import normalize

    if len(pixels) == 0:
        raise ValueError("featurize_lowres: no images given (pixels has 0 rows)")
    device = next(iter(backbone.parameters())).device
    dtype = getattr(torch, out_dtype)
    out = None
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = normalize(pixels[start : start + batch_size], backbone.mean, backbone.std).to(device)
            low = backbone(x)
            if prepare is not None:
                low = prepare(low)
            if pca is not None:
                low = apply_pca(low, pca)
            low = low.to(dtype)
            if out is None:
                out = torch.empty((len(pixels), *low.shape[1:]), dtype=dtype)
            out[start : start + len(low)].copy_(low)
    return out


def compact_output(featurizer: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An on-read featurizer's output for a batch of decoded units (see :class:`pipeline.featurize.stages.Featurizer`).

    Returns:
        ``shard``, ``n``, ``orig_size``, ``valid_size``, ``meta`` passed through; ``lowres (U, S, C, h, w)`` in the
        store dtype (bfloat16 as uint16 bits; failed rows zero); ``guidance (U, S, H, W, 3) uint8`` (the decoded
        pixels; failed rows zero); ``status (U, S) uint8``.
    """
    import torch

    from featup_ops.guidance import split_upsampler
    from pipeline.featurize.stages import unit_output  # stages imports this module lazily: no cycle

    spec = featurizer.spec
    ok = np.asarray(batch["ok"], dtype=bool)
    units, s = ok.shape
    pixels = np.asarray(batch["pixels"])
    flat = pixels.reshape(units * s, *pixels.shape[2:])
    good = np.flatnonzero(ok.reshape(-1))
    c = featurizer.pca.k if featurizer.pca is not None else featurizer.backbone.dim
    stride = featurizer.backbone.stride
    dt = getattr(torch, spec.dtype)
    low_t = torch.zeros((units * s, c, pixels.shape[2] // stride, pixels.shape[3] // stride), dtype=dt)
    if good.size:
        low = featurize_lowres(
            flat[good], featurizer.backbone, batch_size=spec.batch_size, pca=featurizer.pca, out_dtype=spec.dtype,
            prepare=split_upsampler(featurizer.upsampler)[0],
        )
        low_t.index_copy_(0, torch.from_numpy(good), low)
    guidance = np.where(ok.reshape(-1)[:, None, None, None], flat, 0).astype(np.uint8, copy=False)
    lowres = to_store_dtype(low_t, spec.dtype)
    out = unit_output(batch, ok, lowres=lowres, guidance=guidance)
    if getattr(featurizer, "keep", False):  # an implicit stage follows: it needs the pixels too
        out["pixels"], out["ok"] = batch["pixels"], batch["ok"]
    return out
