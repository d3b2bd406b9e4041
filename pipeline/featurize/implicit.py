"""The implicit-fitting stage: per-image implicit upsampler features written into a feature store.

FeatUp's implicit variant fits a small network to each image (``featup_ops.fit_implicit``) and can be read out at
any resolution. It costs seconds to minutes per image, so it runs as its own Ray Data plan of CPU decode tasks and
an ``ImplicitFitter`` actor pool with its own resources (``--implicit-gpus``, fractional allowed; CPU actors where
no GPU exists), apart from the featurizer actors::

    ray.data.from_items(units with pending implicit rows)     # one unit = the pending rows of one store shard
      .map_batches(pipeline.featurize.stages.decode_units)              # the featurize job's decode stage, reused as is
      .map_batches(ImplicitFitter, compute=ActorPoolStrategy, # fit, cast, write implicit rows; implicit_status last
                   num_gpus=G, num_cpus=c)

* In the featurize job (``--implicit``) :func:`start_implicit` runs this plan in a background thread beside the
  main plan, so the slow fits use spare GPUs without holding back the featurizer and its sink (each decodes its
  own copy of the images: decoding is milliseconds, fitting seconds).
* As a second pass over an existing store (``jobs/fit_implicit.py``, :func:`run_fit_implicit`) the same plan fills
  the complete rows, re-read from the store's ``uri`` and decoded with its recorded input size and resize policy.
* :func:`add_implicit_stage` inserts the same actors inline into any plan of decoded units (passthrough).

The arrays, recorded settings and row writes of the implicit features are the store's
(:mod:`pipeline.store.implicit`). The unit of work is one store shard, so each shard of ``implicit`` has exactly one
writer; rows whose ``implicit_status`` is set are skipped, so a rerun resumes and gives the same bytes as an
uninterrupted run.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from pipeline.store.implicit import (
    ATTRS_KEY,
    IMPLICIT,
    IMPLICIT_ERROR,
    IMPLICIT_STATUS,
    add_implicit_arrays,
    pending_implicit_rows,
    write_implicit_rows,
)
from pipeline.store.schema import Status, to_store_dtype

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

__all__ = [
    "ATTRS_KEY",
    "IMPLICIT",
    "IMPLICIT_ERROR",
    "IMPLICIT_STATUS",
    "FitImplicitConfig",
    "ImplicitFitter",
    "ImplicitRun",
    "ImplicitStageConfig",
    "add_implicit_arrays",
    "add_implicit_stage",
    "fit_pixels",
    "implicit_units",
    "pending_implicit_rows",
    "run_fit_implicit",
    "start_implicit",
    "write_implicit_rows",
]

DEFAULT_IMAGES_PER_FIT = 4
"""Images per ``fit_implicit`` call: fitting is batched over images, so a few at once use the device better; more
only adds memory (results per image do not depend on the grouping)."""
DEFAULT_CPUS_PER_ACTOR = 1.0
"""CPUs reserved per ImplicitFitter actor. On GPU actors they feed the device; on CPU actors they are also the
torch threads the fit uses. Fractional values pack actors (a 2-core machine must leave room for decode tasks)."""
DECODE_CPUS = 0.25
"""CPUs per decode task: reading and decoding is light next to fitting ."""
DECODE_TASKS_IN_FLIGHT = 2
"""Decode tasks the implicit plan budgets for: one unit being decoded while the actors fit the previous ones is
enough (a fit takes seconds, a decode milliseconds); two absorb stragglers."""


@dataclass(frozen=True)
class ImplicitStageConfig:
    """Settings of the implicit stage, shared by the featurize job and the second pass.

    Attributes:
        preset: name in ``featup_ops.config.IMPLICIT_PRESETS`` ("fast" default; "paper" = the method's values).
        implicit_cfg: an explicit ``featup_ops.ImplicitConfig``; overrides ``preset`` (e.g. tiny test configs).
        output_size: ``(Hi, Wi)`` of the implicit features; None = the store's hires output size. Any size,
            non-square allowed.
        gpus: GPUs per ImplicitFitter actor (fractional packs actors on one GPU); 0 = CPU actors.
        actors: size of the ImplicitFitter actor pool.
        cpus_per_actor: CPUs reserved per actor.
        torch_threads: torch intra-op threads of a CPU actor; None = ``ceil(cpus_per_actor)``.
        seed: fitting seed (the same for every image; the result of an image does not depend on its group).
        images_per_fit: images per ``fit_implicit`` call.
    """

    preset: str = "fast"
    implicit_cfg: Any = None
    output_size: tuple[int, int] | None = None
    gpus: float = 0.0
    actors: int = 1
    cpus_per_actor: float = DEFAULT_CPUS_PER_ACTOR
    torch_threads: int | None = None
    seed: int = 0
    images_per_fit: int = DEFAULT_IMAGES_PER_FIT

    def __post_init__(self) -> None:
        if self.output_size is not None:
            size = tuple(int(s) for s in self.output_size)
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"--implicit-size {self.output_size!r} must be two positive ints (H W)")
            object.__setattr__(self, "output_size", size)
        if self.gpus < 0:
            raise ConfigError(f"--implicit-gpus {self.gpus} must be >= 0 (0 = CPU actors)")
        if self.actors < 1:
            raise ConfigError(f"--implicit-actors {self.actors} must be >= 1")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"--implicit-cpus {self.cpus_per_actor} must be > 0")
        if self.images_per_fit < 1:
            raise ConfigError(f"--images-per-fit {self.images_per_fit} must be >= 1")
        if self.implicit_cfg is None:
            from featup_ops.config import IMPLICIT_PRESETS

            if self.preset not in IMPLICIT_PRESETS:
                raise ConfigError(
                    f"--implicit-preset {self.preset!r} is not one of {', '.join(sorted(IMPLICIT_PRESETS))}"
                )

    def fit_config(self) -> Any:
        """The ``featup_ops.ImplicitConfig`` to fit with (``implicit_cfg`` or the named preset)."""
        if self.implicit_cfg is not None:
            return self.implicit_cfg
        from featup_ops.config import IMPLICIT_PRESETS

        return IMPLICIT_PRESETS[self.preset]

    def fit_identity(self) -> dict[str, Any]:
        """What the store records about this fit (:func:`pipeline.store.implicit.add_implicit_arrays`' keywords)."""
        return {
            "preset": self.preset_label(), "config": self.fit_config(), "output_size": self.output_size,
            "seed": self.seed,
        }

    def preset_label(self) -> str:
        """The preset name, or ``"custom"`` when an explicit config is given."""
        return "custom" if self.implicit_cfg is not None else self.preset


def implicit_units(
    rows: np.ndarray, rows_per_shard: int, image_ids: Sequence[str], uris: Sequence[str]
) -> list[dict[str, Any]]:
    """One work unit per store shard holding any of ``rows``, in :func:`pipeline.featurize.stages.decode_units`' input form.

    Args:
        rows: ``(n,) int64`` sorted row indices.
        rows_per_shard: the store's S.
        image_ids / uris: per manifest row (indexed by row).

    Returns:
        ``[{"shard": k, "start": first row, "meta": JSON {"image_id", "uri", "rows"}}]``, shards ascending.
    """
    rows = np.asarray(rows, dtype=np.int64)
    units = []
    for shard in np.unique(rows // rows_per_shard):
        r = rows[rows // rows_per_shard == shard].tolist()
        meta = {"image_id": [str(image_ids[i]) for i in r], "uri": [str(uris[i]) for i in r], "rows": r}
        units.append({"shard": int(shard), "start": int(r[0]), "meta": json.dumps(meta)})
    return units


# ---------------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------------


def fit_pixels(
    pixels: np.ndarray,
    backbone: "torch.nn.Module",
    *,
    cfg: Any,
    output_size: tuple[int, int],
    seed: int,
    images_per_fit: int = DEFAULT_IMAGES_PER_FIT,
    pca: dict[str, Any] | None = None,
) -> "torch.Tensor":
    """Fit implicit features for decoded images (the model part of the stage; also used by the tests).

    Args:
        pixels: ``(n, H, W, 3) uint8`` decoded images at the store's input size.
        backbone: ``featup_ops`` backbone; fitting runs on its device.
        cfg: ``featup_ops.ImplicitConfig``.
        output_size: ``(Hi, Wi)``.
        seed: fitting seed.
        images_per_fit: images per ``fit_implicit`` call.
        pca: the store's PCA basis (``PCABasis.to_dict()``) or None.

    Returns:
        ``(n, C, Hi, Wi) float32`` CPU tensor (C = k when ``pca`` is given).
    """
    import torch

    import featup_ops
    from pipeline.io.decode import normalize
    from featup_ops.pca import PCABasis, apply_pca

    device = next(iter(backbone.parameters())).device
    basis = PCABasis.from_dict(pca) if pca else None
    out = []
    for i in range(0, len(pixels), images_per_fit):
        images = normalize(np.asarray(pixels[i : i + images_per_fit]), backbone.mean, backbone.std).to(device)
        feats = featup_ops.fit_implicit(images, backbone, cfg=cfg, output_size=tuple(output_size), seed=seed)
        feats = feats.detach().float()
        if basis is not None:
            feats = apply_pca(feats, basis)
        out.append(feats.cpu())
    return torch.cat(out)


class ImplicitFitter:
    """Ray Data actor (callable class): fits and writes the implicit features of decoded work units.

    Input rows are :func:`pipeline.featurize.stages.decode_units` output: ``shard``, ``n``, ``pixels (U, S, H, W, 3) uint8``,
    ``ok (U, S)``, ``meta`` (JSON with ``error`` per row and, for units of chosen rows, ``rows``; otherwise the
    unit holds rows ``shard*S .. shard*S + n - 1``). Rows whose ``implicit_status`` is already set are skipped
    (resume); rows that failed to decode are recorded as failed with the decode reason. The batch is returned
    unchanged (``passthrough``, to feed a featurizer) or reduced to counts ``fitted``, ``failed``, ``skipped``.

    Args:
        store: store URI (its implicit arrays must exist: :func:`add_implicit_arrays`).
        cfg: the stage settings.
        storage_options: fsspec options for the store and the backbone weights.
        weights: backbone weights source (None = the preset's default); its hash must match the store's.
        passthrough: return the input batch instead of counts.
    """

    def __init__(
        self,
        store: str,
        cfg: ImplicitStageConfig,
        *,
        storage_options: dict[str, Any] | None = None,
        weights: str | None = None,
        passthrough: bool = False,
    ) -> None:
        import torch

        from pipeline.store import open_store, read_attrs

        self.cfg = cfg
        self.group = open_store(store, mode="r+", storage_options=storage_options)
        attrs = read_attrs(self.group)
        settings = self.group.attrs.get(ATTRS_KEY)
        if settings is None or IMPLICIT_STATUS not in self.group:
            raise StoreError(f"{store}: no implicit arrays; call add_implicit_arrays on the driver first")
        self.output_size = tuple(settings["output_size"])
        self.rows_per_shard = int(attrs["rows_per_shard"])
        self.pca = attrs.get("pca")
        self.dtype = str(attrs["dtype"])
        self.fit_cfg = cfg.fit_config()
        use_gpu = cfg.gpus > 0 and torch.cuda.is_available()
        if not use_gpu:
            # Ray sets OMP_NUM_THREADS to the (rounded) CPU request; make the fit use what the actor reserved.
            torch.set_num_threads(cfg.torch_threads or max(1, math.ceil(cfg.cpus_per_actor)))
        self.backbone = load_store_backbone(attrs, weights=weights, storage_options=storage_options)
        self.backbone = self.backbone.to("cuda" if use_gpu else "cpu").eval()
        self.passthrough = passthrough

    def fit_unit(
        self, rows: np.ndarray, pixels: np.ndarray, ok: np.ndarray, errors: Sequence[str]
    ) -> dict[str, int]:
        """Fit and write one unit's rows; returns counts ``{"fitted", "failed", "skipped"}``.

        Args:
            rows: ``(n,) int64`` row indices, all in one shard.
            pixels: ``(n, H, W, 3) uint8``.
            ok: ``(n,) bool`` rows that decoded.
            errors: ``n`` decode reasons (used where ``ok`` is False).
        """
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        rows, pixels, ok = rows[order], np.asarray(pixels)[order], np.asarray(ok, dtype=bool)[order]
        errors = [str(errors[i]) for i in order]
        done = np.asarray(self.group[IMPLICIT_STATUS].oindex[rows]) != Status.PENDING
        counts = {"fitted": 0, "failed": 0, "skipped": int(done.sum())}
        keep = np.flatnonzero(~done)
        if keep.size == 0:
            return counts
        rows, pixels, ok = rows[keep], pixels[keep], ok[keep]
        reasons = ["" if k else (errors[i] or "image could not be decoded") for k, i in zip(ok, keep)]
        status = np.where(ok, Status.COMPLETE, Status.FAILED).astype(np.uint8)
        feats = None
        good = np.flatnonzero(ok)
        if good.size:
            try:
                fitted = fit_pixels(
                    pixels[good], self.backbone, cfg=self.fit_cfg, output_size=self.output_size,
                    seed=self.cfg.seed, images_per_fit=self.cfg.images_per_fit, pca=self.pca,
                )
            except Exception as exc:  # a failed fit is a failed row with its reason, never a crashed job
                reason = f"implicit fit failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                for i in good:
                    status[i], reasons[i] = Status.FAILED, reason
            else:
                finite = np.isfinite(fitted.reshape(len(good), -1).numpy()).all(axis=1)
                stored = to_store_dtype(fitted, self.dtype)
                feats = np.zeros((len(rows), *stored.shape[1:]), dtype=stored.dtype)
                feats[good] = stored
                for i in good[~finite]:
                    status[i], reasons[i] = Status.FAILED, "implicit fit gave non-finite features"
        write_implicit_rows(self.group, rows, feats, status, reasons)
        counts["fitted"] = int((status == Status.COMPLETE).sum())
        counts["failed"] = int((status == Status.FAILED).sum())
        return counts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        totals: dict[str, list[int]] = {"shard": [], "fitted": [], "failed": [], "skipped": []}
        for u in range(len(batch["shard"])):
            n = int(batch["n"][u])
            meta = json.loads(str(batch["meta"][u]))
            shard = int(batch["shard"][u])
            rows = meta.get("rows") or list(range(shard * self.rows_per_shard, shard * self.rows_per_shard + n))
            errors = meta.get("error") or [""] * n
            counts = self.fit_unit(
                np.asarray(rows, dtype=np.int64), np.asarray(batch["pixels"][u])[:n],
                np.asarray(batch["ok"][u], dtype=bool)[:n], errors,
            )
            totals["shard"].append(shard)
            for k, v in counts.items():
                totals[k].append(v)
        if self.passthrough:
            return batch
        return {k: np.asarray(v, dtype=np.int64) for k, v in totals.items()}


def load_store_backbone(
    attrs: dict[str, Any], *, weights: str | None = None, storage_options: dict[str, Any] | None = None
) -> Any:
    """Load the store's backbone (name from attrs) and check its weights hash against the recorded one.

    ``weights`` None means: the source recorded in attrs (``weights``) if any, ``"random"`` when the recorded hash
    is of random weights, else the preset's default weights.

    Raises:
        StoreMismatchError: the weights differ from those the store was made with.
    """
    import featup_ops

    recorded = str(attrs.get("weights_hash") or "")
    if weights is None and attrs.get("weights"):
        weights = attrs["weights"]  # the source, where the store records it
    elif weights is None and recorded.startswith("random:"):
        weights = "random"  # deterministic random weights identify themselves by their hash
    backbone = featup_ops.load_backbone(attrs["backbone"], weights, storage_options=storage_options)
    if attrs.get("weights_hash") and backbone.weights_hash != attrs["weights_hash"]:
        raise StoreMismatchError(
            f"backbone {attrs['backbone']} weights {backbone.weights_hash} differ from the store's "
            f"{attrs['weights_hash']}; pass the weights the store was made with (--weights)"
        )
    return backbone


# ---------------------------------------------------------------------------------------------------------------
# Ray plans
# ---------------------------------------------------------------------------------------------------------------


def default_implicit_gpus() -> float:
    """1 GPU per fitting actor when the Ray cluster has GPUs, else 0 (CPU actors). Needs Ray initialised."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


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


def plan_resource_limits(cfg: ImplicitStageConfig) -> Any:
    """Resource cap of the implicit plan: its actors plus :data:`DECODE_TASKS_IN_FLIGHT` decode tasks."""
    from ray.data import ExecutionResources

    return ExecutionResources(
        cpu=cfg.actors * cfg.cpus_per_actor + DECODE_TASKS_IN_FLIGHT * DECODE_CPUS,
        gpu=cfg.actors * cfg.gpus,
    )


def add_implicit_stage(
    ds: "ray.data.Dataset",
    store: str,
    cfg: ImplicitStageConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    weights: str | None = None,
    passthrough: bool = True,
) -> "ray.data.Dataset":
    """Append the ImplicitFitter actor stage to a Dataset of decoded units (:func:`pipeline.featurize.stages.decode_units`).

    Call :func:`add_implicit_arrays` on the driver first. One unit per call (each unit is one shard's writer). With
    ``passthrough`` the units flow on unchanged; otherwise each unit becomes one row of counts.
    """
    return ds.map_batches(
        ImplicitFitter,
        fn_constructor_args=(store, cfg),
        fn_constructor_kwargs={"storage_options": storage_options, "weights": weights, "passthrough": passthrough},
        batch_size=1,
        batch_format="numpy",
        **actor_resources(cfg),
    )


def _decode_spec(attrs: dict[str, Any], storage_options: dict[str, Any] | None) -> Any:
    from pipeline.io.decode import MAX_PIXELS
    from pipeline.featurize.stages import DecodeSpec

    return DecodeSpec(
        input_size=tuple(int(s) for s in attrs["input_size"]),
        policy=attrs["resize_policy"],
        min_side=int(attrs["stride"]),
        rows_per_shard=int(attrs["rows_per_shard"]),
        max_pixels=int(attrs.get("max_pixels") or MAX_PIXELS),
        storage_options=storage_options,
    )


class ImplicitRun:
    """A running implicit plan (a background thread on the driver); :meth:`wait` returns its counts.

    Attributes:
        pending: rows the plan was started with.
        units: work units (shards) it covers.
    """

    def __init__(self, target: Callable[[], dict[str, int]], pending: int, units: int) -> None:
        self.pending, self.units = pending, units
        self._result: dict[str, int] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name="implicit-plan", daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], dict[str, int]]) -> None:
        try:
            self._result = target()
        except BaseException as exc:  # re-raised on the caller's thread by wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> dict[str, int]:
        """Block until the plan finishes; re-raises its error. Returns ``{"pending", "units", "fitted", ...}``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"implicit plan still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def start_implicit(
    store: str,
    cfg: ImplicitStageConfig,
    *,
    image_ids: Sequence[str] | None = None,
    uris: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    limit: int | None = None,
    require_complete: bool = False,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImplicitRun:
    """Add the implicit arrays to a store and start fitting its pending rows in a background Ray Data plan.

    The featurize job calls this beside its main plan (``require_complete=False``, ids and uris from its manifest);
    the second pass calls it with ``require_complete=True`` (ids and uris from the store). Ray must be initialised.

    Args:
        store: store URI (it must exist: ``pipeline.store.create_or_open_store`` ran).
        cfg: the stage settings.
        image_ids / uris: per manifest row; None = read them from the store's ``image_id`` / ``uri`` arrays.
        rows / limit: restrict the rows (see :func:`pending_implicit_rows`).
        require_complete: only rows whose main ``status`` is complete.
        weights: backbone weights the store was made with.
        storage_options: fsspec options for store, sources and weights.
        progress: called with one line per finished unit (None: silent).

    Returns:
        An :class:`ImplicitRun`; ``wait()`` gives ``{"pending", "units", "fitted", "failed", "skipped"}``.
    """
    import ray
    from ray.data import DataContext

    from pipeline.featurize.stages import decode_units
    from pipeline.store import open_store, read_attrs

    group = open_store(store, mode="r+", storage_options=storage_options)
    attrs = read_attrs(group)
    settings = add_implicit_arrays(group, **cfg.fit_identity())
    pending = pending_implicit_rows(group, rows, limit, require_complete=require_complete)
    if image_ids is None or uris is None:
        image_ids = [str(v) for v in np.asarray(group["image_id"][:]).tolist()]
        uris = [str(v) for v in np.asarray(group["uri"][:]).tolist()]
    units = implicit_units(pending, int(attrs["rows_per_shard"]), image_ids, uris)
    say = progress or (lambda _msg: None)
    hi, wi = settings["output_size"]
    row_bytes = group[IMPLICIT].dtype.itemsize * int(settings["channels"]) * hi * wi
    say(
        f"implicit: {len(pending)} rows in {len(units)} shard units to fit; preset {settings['preset']}, "
        f"{settings['channels']}x{hi}x{wi} ({row_bytes / 1e6:.1f} MB per image uncompressed), "
        f"{cfg.actors} actor(s) x ({cfg.gpus:g} GPU, {cfg.cpus_per_actor:g} CPU)"
    )

    def target() -> dict[str, int]:
        counts = {"pending": int(len(pending)), "units": len(units), "fitted": 0, "failed": 0, "skipped": 0}
        if not units:
            return counts
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(
            decode_units, fn_kwargs={"spec": _decode_spec(attrs, storage_options)}, batch_size=1,
            batch_format="numpy", num_cpus=DECODE_CPUS,
        )
        ds = add_implicit_stage(ds, store, cfg, storage_options=storage_options, weights=weights, passthrough=False)
        # Ray Data shares the cluster between concurrent plans through its autoscaling coordinator; capping this
        # plan at what its actors and decode tasks need leaves the rest to the featurize plan beside it.
        ds.context.execution_options.resource_limits = plan_resource_limits(cfg)
        t0 = time.monotonic()
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for k in ("fitted", "failed", "skipped"):
                counts[k] += int(np.sum(batch[k]))
            done = counts["fitted"] + counts["failed"] + counts["skipped"]
            dt = time.monotonic() - t0
            say(
                f"implicit: {done}/{len(pending)} rows ({counts['failed']} failed) | "
                f"{dt / max(1, counts['fitted'] + counts['failed']):.1f} s/img"
            )
        return counts

    return ImplicitRun(target, int(len(pending)), len(units))


@dataclass(frozen=True)
class FitImplicitConfig:
    """Settings of the second pass (``jobs/fit_implicit.py``).

    Attributes:
        store: URI of an existing feature store.
        stage: the implicit stage settings.
        rows: only these rows (None = all complete rows).
        limit: at most this many rows (after ``rows``).
        weights: backbone weights source the store was made with (None = the preset's default weights).
        storage_options: fsspec options for the store, the sources and the weights.
        quiet: print nothing.
    """

    store: str
    stage: ImplicitStageConfig = field(default_factory=ImplicitStageConfig)
    rows: tuple[int, ...] | None = None
    limit: int | None = None
    weights: str | None = None
    storage_options: dict[str, Any] | None = field(default=None, hash=False)
    quiet: bool = False


def run_fit_implicit(cfg: FitImplicitConfig) -> dict[str, int]:
    """Fill ``implicit`` for the complete rows of an existing store; resumable (rows already set are skipped).

    Starts a local Ray on 127.0.0.1 unless Ray is initialised or ``RAY_ADDRESS`` is set.

    Returns:
        Counts ``{"pending", "units", "fitted", "failed", "skipped"}`` of this run.

    Raises:
        StoreError: no feature store at ``cfg.store``.
        StoreMismatchError: implicit features with other settings, or other backbone weights.
        ConfigError: bad settings (``--rows`` out of range, unknown preset).
    """
    from pipeline.cli import init_ray

    say = None if cfg.quiet else (lambda msg: print(msg, flush=True))
    init_ray()
    run = start_implicit(
        cfg.store, cfg.stage, rows=cfg.rows, limit=cfg.limit, require_complete=True, weights=cfg.weights,
        storage_options=cfg.storage_options, progress=say,
    )
    return run.wait()


# ---------------------------------------------------------------------------------------------------------------
# featurize-job wiring (pipeline.featurize calls these; its config carries the implicit_* fields below)
# ---------------------------------------------------------------------------------------------------------------


def add_implicit_args(parser: Any) -> Any:
    """Add ``--implicit``, ``--implicit-size``, ``--implicit-gpus``, ``--implicit-preset`` (+ actors, CPUs) to a
    featurize job's parser; the names match ``FeaturizeConfig``'s ``implicit*`` fields."""
    a = parser.add_argument
    a("--implicit", action="store_true", help="also fit per-image implicit features (slow; own actors)")
    a("--implicit-size", type=int, nargs=2, metavar=("H", "W"), default=None,
      help="implicit feature size, any H W (default: the hires output size)")
    a("--implicit-gpus", type=float, default=None,
      help="GPUs per implicit actor, fractional allowed (default: 1 if the cluster has GPUs, else 0 = CPU actors)")
    a("--implicit-preset", default="fast", help="implicit fit preset: fast (default) or paper (FeatUp's values)")
    a("--implicit-actors", type=int, default=1, help="implicit fitting actors")
    a("--implicit-cpus", type=float, default=DEFAULT_CPUS_PER_ACTOR, help="CPUs reserved per implicit actor")
    return parser


def stage_config_from(job_cfg: Any) -> ImplicitStageConfig:
    """The :class:`ImplicitStageConfig` of a featurize config's ``implicit_*`` fields.

    ``implicit_preset`` is a preset name or (API use) a ``featup_ops.ImplicitConfig``. Ray must be initialised when
    ``implicit_gpus`` is None: the default depends on the cluster's GPUs.
    """
    gpus = getattr(job_cfg, "implicit_gpus", None)
    size = getattr(job_cfg, "implicit_size", None)
    preset = getattr(job_cfg, "implicit_preset", "fast")
    return ImplicitStageConfig(
        preset=preset if isinstance(preset, str) else "fast",
        implicit_cfg=None if isinstance(preset, str) else preset,  # an ImplicitConfig given through the API
        output_size=tuple(size) if size else None,
        gpus=default_implicit_gpus() if gpus is None else float(gpus),
        actors=int(getattr(job_cfg, "implicit_actors", 1)),
        cpus_per_actor=float(getattr(job_cfg, "implicit_cpus", DEFAULT_CPUS_PER_ACTOR)),
        seed=int(getattr(job_cfg, "implicit_seed", 0)),
    )


def start_featurize_implicit(job_cfg: Any, manifest: Any) -> ImplicitRun:
    """Start the implicit plan of a featurize job beside its main plan (after the store exists).

    Every manifest row whose ``implicit_status`` is pending is fitted (decoded by the plan itself), so a rerun
    resumes both plans independently. Wait for it with ``.wait()`` after the main plan.
    """
    from pipeline.cli import init_ray

    init_ray()
    quiet = bool(getattr(job_cfg, "quiet", False))
    return start_implicit(
        job_cfg.output,
        stage_config_from(job_cfg),
        image_ids=manifest.image_ids,
        uris=manifest.uris,
        require_complete=False,
        weights=job_cfg.weights,
        storage_options=job_cfg.storage_options,
        progress=None if quiet else (lambda msg: print(msg, flush=True)),
    )
