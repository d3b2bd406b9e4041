"""The Ray Data stages of the featurize plan. Each batch row is one work unit = one store shard.

- :func:`decode_units` (a task function): reads and decodes a unit's images; bad images become failed rows.
- :class:`Featurizer` (a callable class, one per actor): backbone -> low-res features -> upsampler -> high-res
  features, optional PCA, cast to the store dtype.

Unit rows flow through as dicts of numpy arrays. Every per-row array of a unit is padded to ``rows_per_shard`` rows
so all units have one fixed shape (the last shard's unused rows are zeros and are never written); ``n`` says how many
rows are real. Strings travel as one JSON column (``meta``) to keep them out of Arrow tensor columns.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.featurize.progress import count_forward_rows, report_rows
from pipeline.io.decode import MAX_PIXELS, read_and_decode
from pipeline.store.schema import Status, to_store_dtype

__all__ = [
    "DecodeSpec", "ModelSpec", "decode_units", "Featurizer", "featurize_pixels", "build_models", "build_upsampler",
]


@dataclass(frozen=True)
class DecodeSpec:
    """How the decode stage turns bytes into pixels (see :func:`pipeline.io.decode.decode_image`)."""

    input_size: tuple[int, int]
    policy: str
    min_side: int
    rows_per_shard: int
    max_pixels: int = MAX_PIXELS
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """What a :class:`Featurizer` builds in its actor: names and paths, never model objects.

    Attributes:
        backbone: backbone name for ``featup_ops.load_backbone``.
        weights: its ``weights`` argument.
        upsampler: an upsampler spec for ``featup_ops.load_upsampler`` (``uplift:dinov2-s14``, a checkpoint path,
            ``bilinear``...), or None for the backbone's default (``featup_ops.default_upsampler_for``).
        output_size: ``(H, W)`` of the high-res features.
        dtype: store dtype name (``float16``, ``bfloat16``, ``float32``).
        batch_size: images per forward pass.
        pca: a :class:`featup_ops.pca.PCABasis` ``to_dict()`` or None.
        storage_options: fsspec options for weights / checkpoint URIs.
        torch_threads: intra-op threads of the actor's torch (None: :func:`default_torch_threads`).
        hires_mode: ``materialized`` or ``on-read`` (no upsampling in the actor; see
            :func:`pipeline.featurize.compact.compact_output`).
        upsampler_data: the publisher's weight file's bytes, read once on the driver (a published
            ``KIND:VARIANT`` upsampler): the actors build from them, so no actor or node downloads anything.
    """

    backbone: str
    weights: str | None
    upsampler: str | None
    output_size: tuple[int, int]
    dtype: str
    batch_size: int
    pca: dict[str, Any] | None = None
    storage_options: dict[str, Any] | None = None
    torch_threads: int | None = None
    hires_mode: str = "materialized"
    upsampler_data: bytes | None = None


def decode_units(batch: dict[str, np.ndarray], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Decode stage: work units in, pixels out (one output row per input row).

    Args:
        batch: ``shard (U,) int64``, ``start (U,) int64``, ``meta (U,) str`` (JSON with ``image_id`` and ``uri``
            lists of the unit's rows).
        spec: the :class:`DecodeSpec`.

    Returns:
        ``shard``, ``n`` ``(U,) int64``; ``pixels (U, S, H, W, 3) uint8``; ``ok (U, S) bool``; ``orig_size``,
        ``valid_size`` ``(U, S, 2) int32``; ``meta`` JSON with ``image_id``, ``uri``, ``error`` lists.
    """
    s = spec.rows_per_shard
    h, w = spec.input_size
    units = len(batch["shard"])
    pixels = np.zeros((units, s, h, w, 3), dtype=np.uint8)
    ok = np.zeros((units, s), dtype=bool)
    orig = np.zeros((units, s, 2), dtype=np.int32)
    valid = np.zeros((units, s, 2), dtype=np.int32)
    n_out = np.zeros(units, dtype=np.int64)
    metas = []
    for u in range(units):
        meta = json.loads(str(batch["meta"][u]))
        uris = meta["uri"]
        n_out[u] = len(uris)
        errors = [""] * len(uris)
        decoded = read_and_decode(
            uris, spec.storage_options, size=(h, w), policy=spec.policy, min_side=spec.min_side,
            max_pixels=spec.max_pixels,
        )
        for i, d, reason in decoded:
            if d is None:
                errors[i] = reason
                continue
            pixels[u, i] = d.pixels
            orig[u, i] = d.orig_size
            valid[u, i] = d.valid_size
            ok[u, i] = True
        metas.append(json.dumps({**meta, "error": errors}))
    return {
        "shard": np.asarray(batch["shard"], dtype=np.int64),
        "n": n_out,
        "pixels": pixels,
        "ok": ok,
        "orig_size": orig,
        "valid_size": valid,
        "meta": np.asarray(metas, dtype=object),
    }


def featurize_pixels(
    pixels: np.ndarray,
    backbone: Any,
    upsampler: Any,
    *,
    output_size: tuple[int, int],
    batch_size: int,
    pca: Any = None,
    out_dtype: str = "float32",
) -> tuple[Any, Any]:
    """The model part of the pipeline, shared by the actors, the benchmark's bare loop and the tests.

    Args:
        pixels: ``(B, H, W, 3) uint8`` decoded images.
        backbone: a ``featup_ops`` backbone.
        upsampler: a ``featup_ops`` upsampler (``up(feats, image, output_size)``).
        output_size: ``(H_out, W_out)``.
        batch_size: images per forward pass.
        pca: a :class:`featup_ops.pca.PCABasis` applied to both outputs, or None.
        out_dtype: dtype of the returned tensors (``float32``, ``float16``, ``bfloat16``). The cast happens on the
            model's device, before the copy to the host: a GPU actor writing float16 moves half the bytes.

    Returns:
        ``(lowres (B, C, h, w), hires (B, C, H_out, W_out))`` tensors of ``out_dtype`` on the CPU (C = k with PCA).
    """
    import torch

    from pipeline.io.decode import normalize
    from featup_ops.pca import apply_pca

    from featup_ops.guidance import guidance_image, split_upsampler

    device = next(iter(backbone.parameters())).device
    dtype = getattr(torch, out_dtype)
    n = len(pixels)
    if n == 0:
        raise ValueError("featurize_pixels: no images given (pixels has 0 rows)")
    prepare, upsample = split_upsampler(upsampler)
    lows = highs = None
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = normalize(pixels[start : start + batch_size], backbone.mean, backbone.std).to(device)
            g = guidance_image(x, backbone.mean, backbone.std)  # ImageNet-normalised, as every upsampler expects
            low = prepare(backbone(x))  # the kind's own low-res preprocessing (FeatUp ChannelNorm, LoftUp): stored
            if pca is not None and getattr(upsampler, "channel_agnostic", False):
                # The upsampler is linear in the features (per-pixel weights from the image only), so
                # P(up(f) - m) = up(P f) - P m, exact even where the weights do not sum to 1 (FeatUp's kernel
                # fix-up): upsample k channels instead of C (C/k less work).
                comps = torch.as_tensor(pca.components, dtype=low.dtype, device=low.device)
                shift = comps @ torch.as_tensor(pca.mean, dtype=low.dtype, device=low.device)
                high = upsample(torch.einsum("kc,bchw->bkhw", comps, low), g, output_size) - shift.view(1, -1, 1, 1)
                low = apply_pca(low, pca)
            else:
                high = upsample(low, g, output_size)
                if pca is not None:
                    low, high = apply_pca(low, pca), apply_pca(high, pca)
            low, high = low.to(dtype), high.to(dtype)
            if highs is None:  # one host buffer per output, each batch copied (from the GPU) straight into it
                lows = torch.empty((n, *low.shape[1:]), dtype=dtype)
                highs = torch.empty((n, *high.shape[1:]), dtype=dtype)
            lows[start : start + len(low)].copy_(low)
            highs[start : start + len(high)].copy_(high)
    return lows, highs


def default_torch_threads() -> int:
    """Torch threads of a CPU featurizer: all cores of the node but one, at least one.

    Ray would give the actor ``OMP_NUM_THREADS`` = its CPU request (1 thread). All cores is not better: the decode
    and write tasks run beside the actor, and an OpenMP thread that loses its core stalls every parallel region
    (measured on the 2-core machine under load: 8 images through efficientnet_lite0 + bilateral at 56 px took
    1.1 s with 1 thread vs 6-12 s with 2). So one core is left to the other stages.
    """
    return max(1, (os.cpu_count() or 2) - 1)


def unit_output(batch: dict[str, np.ndarray], ok: np.ndarray, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """A featurizer's output row of a batch of ``U`` decoded units of ``S`` rows: ``shard``, ``n``, ``orig_size``,
    ``valid_size``, ``meta`` passed through, each array of ``arrays`` (``(U*S, ...)``) as ``(U, S, ...)``, and
    ``status (U, S) uint8`` from ``ok (U, S) bool`` (complete or failed)."""
    units, s = ok.shape
    out: dict[str, np.ndarray] = {k: batch[k] for k in ("shard", "n", "orig_size", "valid_size", "meta")}
    for name, a in arrays.items():
        out[name] = a.reshape(units, s, *a.shape[1:])
    out["status"] = np.where(ok, Status.COMPLETE, Status.FAILED).astype(np.uint8)
    return out


def build_upsampler(spec: ModelSpec, device: str = "cpu") -> Any:
    """The upsampler a spec names (``featup_ops.load_upsampler``, which also sets ``.upsampler_spec`` and
    ``.checkpoint_hash``), or the backbone's default. The one place the upsampler is chosen."""
    import featup_ops

    name = spec.upsampler or featup_ops.default_upsampler_for(spec.backbone)
    # backbone=: a file made for another backbone (channels, patch size) is refused with one line
    upsampler = featup_ops.load_upsampler(name, storage_options=spec.storage_options, backbone=spec.backbone,
                                          data=spec.upsampler_data)
    return upsampler.to(device).eval()


def build_models(spec: ModelSpec, device: str = "cpu") -> tuple[Any, Any]:
    """Load the backbone and upsampler a spec names (the one place models are built from names)."""
    import featup_ops

    backbone = featup_ops.load_backbone(spec.backbone, spec.weights, storage_options=spec.storage_options)
    return backbone.to(device).eval(), build_upsampler(spec, device)


class Featurizer:
    """Featurizer stage (one instance per Ray actor): model loaded once, then units in, features out.

    Args:
        spec: the :class:`ModelSpec`.
        keep: pass ``pixels`` and ``ok`` on (for an implicit stage after this one).
        board: a :class:`pipeline.featurize.progress.ProgressBoard` handle, or None: rows are reported to it as
            the backbone finishes each forward batch (decode failures as each call starts), for progress lines
            that move between shard writes.
    """

    def __init__(self, spec: ModelSpec, keep: bool = False, board: Any = None) -> None:
        import torch

        from featup_ops.pca import PCABasis

        self.spec = spec
        self.keep = keep
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(spec.torch_threads or default_torch_threads())
        self.backbone, self.upsampler = build_models(spec, self.device)
        self.pca = PCABasis.from_dict(spec.pca) if spec.pca else None
        self.board = board
        count_forward_rows(self.backbone, board, "featurize")  # both store modes run every good row through it

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Featurize the good rows of each unit.

        Args:
            batch: rows of :func:`decode_units`' output.

        Returns:
            ``shard``, ``n``, ``orig_size``, ``valid_size``, ``meta`` passed through; ``lowres (U, S, C, h, w)``
            and ``hires (U, S, C, H, W)`` in the store dtype (bfloat16 as uint16 bits; failed rows zero);
            ``status (U, S) uint8`` (``Status.COMPLETE`` or ``Status.FAILED``).
        """
        if self.board is not None:  # rows that failed to decode are done (and failed) at once
            failed = int(np.sum(batch["n"])) - int(np.count_nonzero(batch["ok"]))
            report_rows(self.board, "featurize", failed, failed)
        if self.spec.hires_mode == "on-read":  # compact store (issue 14): lowres + guidance, no upsampling
            from pipeline.featurize.compact import compact_output

            return compact_output(self, batch)
        ok = np.asarray(batch["ok"], dtype=bool)
        units, s = ok.shape
        pixels = np.asarray(batch["pixels"])
        good = np.flatnonzero(ok.reshape(-1))
        if good.size == 0:  # every image of these units failed to decode: all-zero features, all rows failed
            return self._output(batch, ok, None, None)
        low, high = featurize_pixels(
            pixels.reshape(units * s, *pixels.shape[2:])[good],
            self.backbone,
            self.upsampler,
            output_size=self.spec.output_size,
            batch_size=self.spec.batch_size,
            pca=self.pca,
            out_dtype=self.spec.dtype,
        )
        return self._output(batch, ok, low, high)

    def _output(self, batch: dict[str, np.ndarray], ok: np.ndarray, low: Any, high: Any) -> dict[str, np.ndarray]:
        units, s = ok.shape
        good = np.flatnonzero(ok.reshape(-1))
        c = self.pca.k if self.pca is not None else self.backbone.dim
        in_h, in_w = np.asarray(batch["pixels"]).shape[2:4]
        stride = self.backbone.stride
        if good.size == units * s:  # every row featurized: the buffers featurize_pixels filled are the output
            lowres, hires = to_store_dtype(low, self.spec.dtype), to_store_dtype(high, self.spec.dtype)
        else:
            # Allocated by torch, not np.zeros: measured on the development VM, the first write to fresh np.zeros
            # pages ran at ~0.46 GB/s, to a fresh torch buffer at ~3.1 GB/s (38 MB per 224^2 C=384 fp16 image).
            import torch

            dt = getattr(torch, self.spec.dtype)
            lowres_t = torch.zeros((units * s, c, in_h // stride, in_w // stride), dtype=dt)
            hires_t = torch.zeros((units * s, c, *self.spec.output_size), dtype=dt)
            if good.size:
                rows = torch.from_numpy(good)
                lowres_t.index_copy_(0, rows, low)  # already in the store dtype (featurize_pixels' out_dtype)
                hires_t.index_copy_(0, rows, high)
            lowres, hires = to_store_dtype(lowres_t, self.spec.dtype), to_store_dtype(hires_t, self.spec.dtype)
        out = unit_output(batch, ok, lowres=lowres, hires=hires)
        if self.keep:
            out["pixels"], out["ok"] = batch["pixels"], batch["ok"]
        return out
