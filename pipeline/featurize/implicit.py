"""The implicit-fitting stage: per-image implicit upsampler features, a stage of the featurize plan.

FeatUp's implicit variant fits a small network to each image (``featup_ops.fit_implicit``) and can be read out at
any resolution. It costs seconds to minutes per image, so :class:`ImplicitFitter` runs in its own actor pool with its
own resources (``--implicit-gpus``, fractional allowed; CPU actors where no GPU exists). It is one more stage of the
one plan (:func:`pipeline.featurize.plan.run_plan`)::

    decode_units -> [Featurizer] -> ImplicitFitter -> ZarrFeatureDatasink

* In the featurize job (``--implicit``) the units flow through the featurizer and then the fitter; the sink writes
  both parts of each shard.
* As a second pass over an existing store (``jobs/fit_implicit.py``,
  :func:`pipeline.featurize.fit_implicit.run_fit_implicit`) the same plan runs
  without the featurizer over the complete rows still lacking implicit features, re-read from the store's ``uri``
  and decoded with its recorded input size and resize policy.

A fit may take longer than Ray Data's no-progress window (``DataContext.execution_no_progress_timeout_s``, 30 min by
default): while a unit is being fitted the fitter yields an empty heartbeat row every ``heartbeat_s`` seconds (the
sink skips them), so the plan visibly makes progress and the fit is never lost. Each actor reports the step its
fitting group reached to a :class:`pipeline.featurize.progress.ProgressBoard`, which the driver prints.

The arrays, recorded settings and row writes of the implicit features are the store's (:mod:`pipeline.store.implicit`);
rows whose ``implicit_status`` is set are not scheduled again, so a rerun resumes and gives the same bytes as an
uninterrupted run. The stage's settings and flags are :mod:`pipeline.featurize.implicit_config`; this module is what
the actors import (no driver code).
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import StoreMismatchError
from pipeline.featurize.implicit_config import DEFAULT_IMAGES_PER_FIT, ImplicitStageConfig
from pipeline.store.schema import Status, to_store_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FitterSpec",
    "ImplicitFitter",
    "actor_resources",
    "default_implicit_gpus",
    "fit_rows",
    "fitter_spec",
    "heartbeat_seconds",
]

HEARTBEATS_PER_WINDOW = 10
"""Heartbeat rows a fitter yields per Ray Data no-progress window while it fits (one would do; ten leave margin)."""


def fit_rows(
    pixels: np.ndarray,
    backbone: "torch.nn.Module",
    *,
    cfg: Any,
    output_size: tuple[int, int],
    seed: int,
    images_per_fit: int = DEFAULT_IMAGES_PER_FIT,
    pca: dict[str, Any] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    store_as: str = "array",
) -> "tuple[torch.Tensor | None, torch.Tensor | None]":
    """Fit implicit networks to decoded images; what a store keeps of them (the model part of the stage; also used
    by the tests).

    Args:
        pixels: ``(n, H, W, 3) uint8`` decoded images at the store's input size.
        backbone: ``featup_ops`` backbone; fitting runs on its device.
        cfg: ``featup_ops.ImplicitConfig``.
        output_size: ``(Hi, Wi)`` of the features.
        seed: fitting seed.
        images_per_fit: images per fitting call.
        pca: the store's PCA basis (``PCABasis.to_dict()``) or None.
        progress: called with ``(step_done, total_steps, active_images)`` after each fitting step of each
            call (``featup_ops.fit_implicit``'s ``progress``).
        store_as: ``"array"``, ``"function"`` or ``"both"``.

    Returns:
        ``(features, params)``: features ``(n, C, Hi, Wi) float32`` CPU tensor (``featup_ops.fit_implicit``'s
        result, projected with ``pca``; C = k when ``pca`` is given), None when ``store_as == "function"``;
        params ``(n, P) float32`` CPU tensor, each row's network and basis (``featup_ops.implicit_function``,
        ``pca`` folded in), None when ``store_as == "array"``.
    """
    import torch

    from featup_ops.implicit_fit import fit_implicit_functions
    from featup_ops.pca import PCABasis, apply_pca
    from pipeline.io.decode import normalize

    device = next(iter(backbone.parameters())).device
    basis = PCABasis.from_dict(pca) if pca else None
    feats, params = [], []
    for i in range(0, len(pixels), images_per_fit):
        images = normalize(np.asarray(pixels[i : i + images_per_fit]), backbone.mean, backbone.std).to(device)
        fns = fit_implicit_functions(images, backbone, cfg=cfg, seed=seed, progress=progress)
        if store_as != "function":  # exactly what featup_ops.fit_implicit returns
            f = fns.render(images, tuple(output_size))
            feats.append((apply_pca(f, basis) if basis is not None else f).cpu())
        if store_as != "array":
            params.append((fns.project(torch.as_tensor(basis.mean), torch.as_tensor(basis.components))
                           if basis is not None else fns).params)
    return (torch.cat(feats) if feats else None), (torch.cat(params) if params else None)


@dataclass(frozen=True)
class FitterSpec:
    """What an :class:`ImplicitFitter` builds and does in its actor: resolved on the driver, no model objects.

    Attributes:
        backbone / weights: the store's backbone name and weights source.
        weights_hash: the store's recorded weights hash (the actor's backbone must match it).
        fit: the ``featup_ops.ImplicitConfig``.
        seed: fitting seed.
        images_per_fit: images per ``fit_implicit`` call.
        output_size: ``(Hi, Wi)``.
        pca: the store's PCA basis dict or None.
        dtype: store dtype name.
        use_gpu: fit on the actor's GPU (when it has one).
        torch_threads: torch threads of a CPU actor.
        heartbeat_s: seconds between heartbeat rows while fitting.
        storage_options: fsspec options for weights URIs.
        store_as: ``"array"``, ``"function"`` or ``"both"`` (:class:`ImplicitStageConfig`).
        function_size: P, floats per row of ``implicit_params`` (0 for ``"array"``).
        guidance: emit each fitted row's image (``implicit_guidance``) for the store's ``guidance`` array (functions
            in a store that lacks it, i.e. not on-read).
    """

    backbone: str
    weights: str | None
    weights_hash: str
    fit: Any
    seed: int
    images_per_fit: int
    output_size: tuple[int, int]
    pca: dict[str, Any] | None
    dtype: str
    use_gpu: bool | None
    torch_threads: int
    heartbeat_s: float
    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    store_as: str = "array"
    function_size: int = 0
    guidance: bool = False


class ImplicitFitter:
    """Ray Data actor (callable class): fits the implicit features of decoded work units.

    Input rows are units from :func:`pipeline.featurize.stages.decode_units` (through the featurizer, which passes
    ``pixels`` and ``ok`` on): ``meta`` names the unit's ``rows`` (all rows of its shard, or the chosen rows) and
    the ``fit_rows`` among them still lacking implicit features. Each unit comes out as one row with the input's
    columns (less ``pixels`` and ``ok``) plus ``implicit (S, C, Hi, Wi)`` (``store_as`` array or both),
    ``implicit_params (S, P) float32`` (function or both), ``implicit_guidance (S, H, W, 3) uint8`` (functions in
    a store without ``guidance``) and ``implicit_status (S,)`` for the fitted rows in order (``meta["implicit_rows"]``, reasons in ``meta["implicit_error"]``); rows that failed to decode or
    to fit are failed rows with their reason. While a unit is fitted, an empty heartbeat row (no ``shard``) is
    yielded every ``heartbeat_s`` seconds.

    Args:
        spec: the :class:`FitterSpec`.
        board: a :class:`pipeline.featurize.progress.ProgressBoard` actor handle, or None.
    """

    def __init__(self, spec: FitterSpec, board: Any = None) -> None:
        import os

        import torch

        import featup_ops

        self.spec = spec
        self.board = board
        self.key = f"{os.getpid()}"
        use_gpu = bool(spec.use_gpu) and torch.cuda.is_available()
        if not use_gpu:
            # Ray sets OMP_NUM_THREADS to the (rounded) CPU request; make the fit use what the actor reserved.
            torch.set_num_threads(spec.torch_threads)
        backbone = featup_ops.load_backbone(spec.backbone, spec.weights, storage_options=spec.storage_options)
        if spec.weights_hash and backbone.weights_hash != spec.weights_hash:
            raise StoreMismatchError(
                f"backbone {spec.backbone} weights {backbone.weights_hash} differ from the store's "
                f"{spec.weights_hash}; pass the weights the store was made with (--weights)"
            )
        self.backbone = backbone.to("cuda" if use_gpu else "cpu").eval()

    def _report(self, **state: Any) -> None:
        if self.board is not None:
            self.board.report.remote(self.key, state)

    def _fit(self, pixels: np.ndarray, n_rows: int) -> Any:
        def progress(step: int, total: int, active: int) -> None:
            self._report(step=int(step), total=int(total), active=int(active), images=n_rows)

        return fit_rows(
            pixels, self.backbone, cfg=self.spec.fit, output_size=self.spec.output_size, seed=self.spec.seed,
            images_per_fit=self.spec.images_per_fit, pca=self.spec.pca, progress=progress,
            store_as=self.spec.store_as,
        )

    def _fit_with_heartbeats(self, pixels: np.ndarray) -> Iterator[Any]:
        """Run the fit in a thread; yield None every ``heartbeat_s`` while it runs, then its result (or raise)."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = self._fit(pixels, len(pixels))
            except BaseException as exc:  # re-raised on the actor's thread below
                result["error"] = exc

        self._report(step=0, total=int(getattr(self.spec.fit, "steps", 0)), active=len(pixels), images=len(pixels))
        thread = threading.Thread(target=target, name="implicit-fit", daemon=True)
        thread.start()
        while True:
            thread.join(self.spec.heartbeat_s)
            if not thread.is_alive():
                break
            yield None
        self._report(done=True)
        if "error" in result:
            raise result["error"]
        yield result["value"]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        keep = {k: v for k, v in batch.items() if k not in ("pixels", "ok")}
        pixels_all, ok_all = np.asarray(batch["pixels"]), np.asarray(batch["ok"], dtype=bool)
        s = pixels_all.shape[1]
        c = len(self.spec.pca["components"]) if self.spec.pca else int(self.backbone.dim)
        hi, wi = self.spec.output_size
        for u in range(len(batch["shard"])):
            meta = json.loads(str(batch["meta"][u]))
            n = int(batch["n"][u])
            shard = int(batch["shard"][u])
            rows = meta.get("rows") or list(range(shard * s, shard * s + n))
            where = {int(r): i for i, r in enumerate(rows)}
            todo = sorted(int(r) for r in meta.get("fit_rows", rows))
            idx = np.asarray([where[r] for r in todo], dtype=np.int64)
            decode_errors = meta.get("error") or [""] * n
            ok = ok_all[u][idx] if idx.size else np.zeros(0, bool)
            status = np.where(ok, Status.COMPLETE, Status.FAILED).astype(np.uint8)
            reasons = ["" if k else (decode_errors[i] or "image could not be decoded") for k, i in zip(ok, idx)]
            parts: dict[str, np.ndarray] = {}  # the unit's stored columns, S rows each (fitted rows in order)
            good = np.flatnonzero(ok)
            if good.size:
                try:
                    for fitted in self._fit_with_heartbeats(pixels_all[u][idx[good]]):
                        if fitted is None:
                            yield {"heartbeat": np.zeros(1, dtype=np.int64)}
                except Exception as exc:  # a failed fit is a failed row with its reason, never a crashed job
                    reason = f"implicit fit failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                    for i in good:
                        status[i], reasons[i] = Status.FAILED, reason
                else:
                    feats, params = fitted
                    finite = np.ones(len(good), bool)
                    for name, values in (("implicit", feats), ("implicit_params", params)):
                        if values is None:
                            continue
                        finite &= np.isfinite(values.reshape(len(good), -1).numpy()).all(axis=1)
                        stored = to_store_dtype(values, self.spec.dtype) if name == "implicit" else values.numpy()
                        parts[name] = np.zeros((s, *stored.shape[1:]), dtype=stored.dtype)
                        parts[name][good] = stored
                    for i in good[~finite]:
                        status[i], reasons[i] = Status.FAILED, "implicit fit gave non-finite features"
            if self.spec.store_as != "function" and "implicit" not in parts:
                dt = np.uint16 if self.spec.dtype == "bfloat16" else np.dtype(self.spec.dtype)
                parts["implicit"] = np.zeros((s, c, hi, wi), dtype=dt)
            if self.spec.store_as != "array" and "implicit_params" not in parts:
                parts["implicit_params"] = np.zeros((s, self.spec.function_size), dtype=np.float32)
            if self.spec.guidance:  # the colour the stored networks read, for the store's guidance array
                parts["implicit_guidance"] = np.zeros_like(pixels_all[u])
                parts["implicit_guidance"][: len(idx)] = pixels_all[u][idx]
            padded = np.zeros(s, dtype=np.uint8)
            padded[: len(status)] = status
            out = {k: np.asarray(v)[u : u + 1] for k, v in keep.items() if k != "meta"}
            out["meta"] = np.asarray(
                [json.dumps({**meta, "implicit_rows": todo, "implicit_error": reasons})], dtype=object
            )
            out.update({name: values[None] for name, values in parts.items()})
            out["implicit_status"] = padded[None]
            yield out


def actor_resources(cfg: ImplicitStageConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments that give the ImplicitFitter pool its own resources."""
    import ray.data

    args: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=1),
        "num_cpus": cfg.cpus_per_actor,
    }
    if cfg.gpus > 0:
        args["num_gpus"] = cfg.gpus
    return args


def default_implicit_gpus() -> float:
    """1 GPU per fitting actor when the Ray cluster has GPUs, else 0 (CPU actors). Needs Ray initialised."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def heartbeat_seconds() -> float:
    """Seconds between a fitter's heartbeat rows: a tenth of Ray Data's no-progress window (at most a minute)."""
    from ray.data import DataContext

    window = float(DataContext.get_current().execution_no_progress_timeout_s)
    return 60.0 if window <= 0 else max(0.05, min(60.0, window / HEARTBEATS_PER_WINDOW))


def fitter_spec(
    stage: ImplicitStageConfig, attrs: dict[str, Any], *, weights: str | None,
    storage_options: dict[str, Any] | None,
) -> FitterSpec:
    """The :class:`FitterSpec` of a stage over a store with main attributes ``attrs`` (existing or about to be
    created); ``use_gpu`` is None when ``stage.gpus`` is (the plan decides from the cluster)."""
    from pipeline.store.implicit import function_layout_of

    return FitterSpec(
        backbone=str(attrs["backbone"]), weights=weights, weights_hash=str(attrs.get("weights_hash") or ""),
        fit=stage.fit_config(), seed=stage.seed, images_per_fit=stage.images_per_fit,
        output_size=tuple(stage.output_size or attrs["output_size"]), pca=attrs.get("pca"), dtype=str(attrs["dtype"]),
        use_gpu=None if stage.gpus is None else stage.gpus > 0, torch_threads=stage.torch_threads or max(1, math.ceil(stage.cpus_per_actor)),
        heartbeat_s=heartbeat_seconds(), storage_options=storage_options, store_as=stage.store_as,
        function_size=0 if stage.store_as == "array" else function_layout_of(attrs, stage.fit_config()).size,
        guidance=stage.store_as != "array" and attrs.get("hires_mode") != "on-read",
    )
