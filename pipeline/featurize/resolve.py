"""Resolve once, then build: a job's config becomes a :class:`PlanJob`, everything the plan needs, on the driver
before Ray starts work.

:func:`resolve_featurize` lists the input (the manifest), reads the backbone's stride, channels, normalisation and
weights hash from its preset (``featup_ops.backbones.describe_backbone``: no model is built), loads the upsampler
once (validating a checkpoint and reading its hash in the same read), validates every setting in one place, derives
the store schema and the fingerprinted settings, and compares them with an existing store (resume, or one line
saying what differs). Only ``--pca`` on a new store builds the backbone on the driver, to fit the basis.
:func:`resolve_fit_implicit` does the same for the second implicit pass from the store's own attributes. The plan
builder (:func:`pipeline.featurize.plan.run_plan`) takes the :class:`PlanJob` and nothing else.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featup_ops.pca import fit_pca
from pipeline.errors import ConfigError
from pipeline.featurize.config import FeaturizeConfig, size_text
from pipeline.featurize.implicit import FitterSpec, fitter_spec
from pipeline.featurize.implicit_config import FitImplicitConfig, ImplicitStageConfig
from pipeline.featurize.stages import DecodeSpec, ModelSpec, build_upsampler
from pipeline.io.decode import MAX_PIXELS, read_and_decode
from pipeline.io.sources import Manifest, build_manifest
from pipeline.io.storage import check_writable
from pipeline.store.implicit import ATTRS_KEY as IMPLICIT_ATTRS_KEY
from pipeline.store.implicit import IMPLICIT_STATUS, check_implicit, pending_implicit_rows
from pipeline.store.schema import FeatureStoreSchema, Status, rows_per_shard_for
from pipeline.store.zarr_store import check_store, open_store, read_attrs, status_counts

__all__ = ["PlanJob", "PlanResources", "implicit_units", "resolve_featurize", "resolve_fit_implicit"]


@dataclass(frozen=True)
class PlanResources:
    """How the plan's stages are scheduled (Ray resources), from the job's flags."""

    num_gpus: int | None = None
    num_actors: int = 1
    actor_cpus: float = 1.0
    decode_cpus: float = 0.25
    batch_size: int = 8


@dataclass(frozen=True)
class PlanJob:
    """Everything one plan needs, resolved: what to run, on which units, into which store.

    Attributes:
        uri / storage_options: the store.
        schema: the store's layout.
        settings: the fingerprinted settings (:func:`pipeline.store.zarr_store.create_or_open_store`).
        extra_attrs: attributes stored at creation, not fingerprinted (the PCA basis).
        create: the sink creates or validates the main store (False: the second pass writes an existing store).
        units: work units (one shard each), :func:`pipeline.featurize.stages.decode_units`' input.
        decode: the decode stage's spec.
        model: the featurizer's spec, or None (no featurizer stage: the second pass).
        fitter / stage / implicit: the implicit stage's spec, resources and recorded identity, or None.
        resources: scheduling of the decode and featurizer stages.
        resumed: the store existed with these settings.
        pending_fits: rows the implicit stage will fit.
        progress_interval_s / quiet: progress lines.
    """

    uri: str
    schema: FeatureStoreSchema
    settings: dict[str, Any]
    units: list[dict[str, Any]]
    decode: DecodeSpec
    model: ModelSpec | None = None
    fitter: FitterSpec | None = None
    stage: ImplicitStageConfig | None = None
    implicit: dict[str, Any] | None = None
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    create: bool = True
    resources: PlanResources = field(default_factory=PlanResources)
    resumed: bool = False
    pending_fits: int = 0
    storage_options: dict[str, Any] | None = None
    progress_interval_s: float = 10.0
    quiet: bool = False


def _check_sizes(cfg: FeaturizeConfig, stride: int, dim: int) -> None:
    """Every check of the input size and PCA against the backbone, one message each."""
    input_hw = cfg.input_hw
    if input_hw[0] % stride or input_hw[1] % stride:
        from featup_ops.backbones import nearest_valid_sizes

        lower, upper = zip(*(nearest_valid_sizes(side, stride) for side in input_hw))
        options = " or ".join(dict.fromkeys(size_text(hw) for hw in (lower, upper)))
        raise ConfigError(
            f"--input-size {size_text(input_hw)} is not a multiple of the stride {stride} of {cfg.backbone!r}; "
            f"use {options}"
        )
    if cfg.pca is not None and cfg.pca > dim:
        raise ConfigError(f"--pca {cfg.pca} is more than the {dim} channels of {cfg.backbone!r}")


def _fit_pca_basis(cfg: FeaturizeConfig, manifest: Manifest, upsampler: Any) -> dict[str, Any]:
    """Fit the PCA basis on the low-res features of the first ``pca_fit_images`` decodable images (after the
    upsampler's own low-res preprocessing, as they are stored).

    Low-res features suffice: the upsamplers output per-pixel (nearly convex, for a JBU with the kernel fix-up)
    combinations of low-res features, so high-res features lie in their span (and near their mean).
    """
    from featup_ops.guidance import split_upsampler

    import featup_ops
    import torch

    from pipeline.io.decode import normalize

    backbone = featup_ops.load_backbone(cfg.backbone, cfg.weights, storage_options=cfg.storage_options).eval()
    pixels = []
    uris = list(manifest.uris[: max(cfg.pca_fit_images * 2, cfg.pca_fit_images + 8)])
    decoded = read_and_decode(uris, cfg.storage_options, size=cfg.input_hw, policy=cfg.policy,
                              min_side=backbone.stride, max_pixels=cfg.max_pixels)
    for _, d, _ in decoded:
        if d is not None:
            pixels.append(d.pixels)
        if len(pixels) == cfg.pca_fit_images:
            break
    if not pixels:
        raise ConfigError("--pca: none of the first images could be decoded to fit the PCA basis")
    feats = []
    with torch.inference_mode():
        for start in range(0, len(pixels), cfg.batch_size):
            x = normalize(np.stack(pixels[start : start + cfg.batch_size]), backbone.mean, backbone.std)
            feats.append(split_upsampler(upsampler)[0](backbone(x)))
    return fit_pca(torch.cat(feats), cfg.pca).to_dict()


def _unit(manifest: Manifest, schema: FeatureStoreSchema, k: int, fit_rows: list[int] | None) -> dict[str, Any]:
    start, stop = schema.shard_rows(k)
    meta: dict[str, Any] = {"image_id": list(manifest.image_ids[start:stop]), "uri": list(manifest.uris[start:stop])}
    if fit_rows is not None:
        meta["rows"] = list(range(start, stop))
        meta["fit_rows"] = fit_rows
    return {"shard": k, "start": start, "meta": json.dumps(meta)}


def _attribute(upsampler: Any, quiet: bool) -> None:
    """Print the attribution a published upsampler's licence asks for (AnyUp: CC-BY-4.0)."""
    from featup_ops.published import KINDS

    entry = getattr(upsampler, "published", None)
    if entry is not None and KINDS[entry.kind].attribution and not quiet:
        print(f"featurize: upsampler {entry.spec}: {KINDS[entry.kind].attribution}", flush=True)


def resolve_featurize(cfg: FeaturizeConfig) -> PlanJob:
    """Resolve a featurize job (see the module docstring).

    Raises:
        InputNotFoundError: missing/unreadable input, or no images.
        featup_ops.errors.UnknownBackboneError / WeightsNotFoundError / CheckpointError: bad model settings.
        StoreMismatchError: the output store exists with other settings.
        StorageAccessError: the output cannot be written (no credentials, missing bucket, read-only folder).
        ConfigError: invalid settings (e.g. input size not a multiple of the stride).
    """
    from featup_ops.backbones import describe_backbone
    from featup_ops.defaults import default_upsampler_for
    from featup_ops.upsampler_spec import check_fits_backbone, read_published

    manifest = build_manifest(
        cfg.input, kind=cfg.kind, split=cfg.split, limit=cfg.limit, storage_options=cfg.storage_options
    )
    check_writable(cfg.output, cfg.storage_options)  # before any model
    info = describe_backbone(cfg.backbone, cfg.weights, storage_options=cfg.storage_options)
    _check_sizes(cfg, info.stride, info.dim)
    model = ModelSpec(
        backbone=cfg.backbone, weights=cfg.weights, output_size=cfg.output_hw,
        upsampler=cfg.upsampler or default_upsampler_for(cfg.backbone),
        dtype=cfg.dtype, batch_size=cfg.batch_size, storage_options=cfg.storage_options,
        torch_threads=cfg.torch_threads, hires_mode=cfg.hires,
    )
    published = read_published(model.upsampler, cfg.storage_options)  # fetched/read once, here
    if published is not None:  # the actors build from these bytes: no download or read per actor or node
        model = dataclasses.replace(model, upsampler=published[0], upsampler_data=published[1])
    upsampler = build_upsampler(model)  # validates the weights; their hash comes with them
    check_fits_backbone(upsampler.published, upsampler, backbone=cfg.backbone, dim=info.dim, stride=info.stride)
    _attribute(upsampler, cfg.quiet)
    on_read = cfg.hires == "on-read"  # compact store mode (pipeline/featurize/compact.py)
    if on_read:
        from pipeline.featurize.compact import check_on_read

        check_on_read(upsampler, cfg.pca)
    input_hw = cfg.input_hw
    probe = FeatureStoreSchema(
        n_rows=len(manifest), channels=cfg.pca or info.dim,
        lowres_size=(input_hw[0] // info.stride, input_hw[1] // info.stride), output_size=cfg.output_hw,
        dtype=cfg.dtype, codec=cfg.codec, hires_mode=cfg.hires, input_size=input_hw if on_read else None,
    )
    shard_row_bytes = probe.row_bytes if on_read else probe.hires_row_bytes  # on-read: ~64 MiB of compact rows
    schema = dataclasses.replace(
        probe, rows_per_shard=cfg.rows_per_shard or rows_per_shard_for(shard_row_bytes)
    )
    settings = {
        "backbone": cfg.backbone,
        "weights_hash": info.weights_hash,
        "stride": info.stride,
        "upsampler": upsampler.config_dict(),
        "upsampler_spec": upsampler.upsampler_spec,  # KIND[:VARIANT]; the hash says which file
        "upsampler_checkpoint_hash": upsampler.checkpoint_hash,
        "lowres_normalized": upsampler.lowres_normalized,  # lowres stored after the kind's own normalisation
        "input_size": list(input_hw),
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "resize_policy": cfg.policy,
        "pca_spec": None if cfg.pca is None else {"k": cfg.pca, "fit_images": cfg.pca_fit_images},
        "max_pixels": cfg.max_pixels,
        "manifest": {"input": manifest.input, "kind": manifest.kind, "rows": len(manifest),
                     "digest": manifest.digest()},
    }
    existing = check_store(cfg.output, schema, settings, storage_options=cfg.storage_options)
    attrs = read_attrs(existing) if existing is not None else None
    if attrs is not None:
        pca = attrs.get("pca")
    else:
        pca = None if cfg.pca is None else _fit_pca_basis(cfg, manifest, upsampler)
    model = dataclasses.replace(model, pca=pca)
    decode = DecodeSpec(
        input_size=input_hw, policy=cfg.policy, min_side=info.stride,  # images smaller than one cell are refused
        rows_per_shard=schema.rows_per_shard, max_pixels=cfg.max_pixels, storage_options=cfg.storage_options,
    )
    stage = fitter = identity = None
    main_attrs = attrs or {**schema.to_dict(), **settings, "pca": pca}
    if cfg.implicit:
        stage = cfg.stage_config()
        identity = stage.fit_identity()
        check_implicit(main_attrs, existing.attrs.get(IMPLICIT_ATTRS_KEY) if existing is not None else None,
                       **identity)
        fitter = fitter_spec(stage, main_attrs, weights=cfg.weights, storage_options=cfg.storage_options)
    units, pending_fits = _pending_units(manifest, schema, existing, cfg.implicit)
    return PlanJob(
        uri=cfg.output, schema=schema, settings=settings, units=units, decode=decode, model=model, fitter=fitter,
        stage=stage, implicit=identity, create=True,
        # settings_keys: what jobs/materialize.py carries over from a compact store into a materialized one
        extra_attrs={"pca": pca, "settings_keys": sorted(settings), "upsampler_source": upsampler.weights_path},
        resources=PlanResources(cfg.num_gpus, cfg.num_actors, cfg.actor_cpus, cfg.decode_cpus, cfg.batch_size),
        resumed=existing is not None, pending_fits=pending_fits, storage_options=cfg.storage_options,
        progress_interval_s=cfg.progress_interval_s, quiet=cfg.quiet,
    )


def _pending_units(
    manifest: Manifest, schema: FeatureStoreSchema, existing: Any, implicit: bool
) -> tuple[list[dict[str, Any]], int]:
    """Units of the shards with a pending row (main status, or implicit status when fitting), and the rows to fit."""
    n = schema.n_rows
    status = np.asarray(existing["status"][:]) if existing is not None else np.zeros(n, np.uint8)
    fit = np.zeros(n, bool)
    if implicit:
        fit = (np.asarray(existing[IMPLICIT_STATUS][:]) == Status.PENDING
               if existing is not None and IMPLICIT_STATUS in existing else np.ones(n, bool))
    units = []
    for k in range(schema.num_shards):
        start, stop = schema.shard_rows(k)
        if (status[start:stop] == Status.PENDING).any() or fit[start:stop].any():
            rows = [int(r) for r in np.flatnonzero(fit[start:stop]) + start] if implicit else None
            units.append(_unit(manifest, schema, k, rows))
    return units, int(fit.sum())


def implicit_units(
    rows: np.ndarray, rows_per_shard: int, image_ids: Sequence[str], uris: Sequence[str]
) -> list[dict[str, Any]]:
    """One work unit per store shard holding any of ``rows``, in :func:`pipeline.featurize.stages.decode_units`' input form.

    Args:
        rows: ``(n,) int64`` sorted row indices.
        rows_per_shard: the store's S.
        image_ids / uris: per manifest row (indexed by row).

    Returns:
        ``[{"shard": k, "start": first row, "meta": JSON {"image_id", "uri", "rows", "fit_rows"}}]``, shards
        ascending (every row of such a unit is to be fitted).
    """
    rows = np.asarray(rows, dtype=np.int64)
    units = []
    for shard in np.unique(rows // rows_per_shard):
        r = rows[rows // rows_per_shard == shard].tolist()
        meta = {"image_id": [str(image_ids[i]) for i in r], "uri": [str(uris[i]) for i in r], "rows": r, "fit_rows": r}
        units.append({"shard": int(shard), "start": int(r[0]), "meta": json.dumps(meta)})
    return units


def resolve_fit_implicit(cfg: FitImplicitConfig) -> PlanJob:
    """Resolve the second implicit pass over an existing store: its complete rows still lacking implicit features.

    Raises:
        StoreError: no feature store at ``cfg.store``.
        StoreMismatchError: implicit features with other settings, or other backbone weights.
        ConfigError: bad settings (``--rows`` out of range, unknown preset).
    """
    from featup_ops.backbones import describe_backbone
    from pipeline.store.implicit import ATTRS_KEY

    group = open_store(cfg.store, storage_options=cfg.storage_options)
    attrs = read_attrs(group)
    schema = FeatureStoreSchema.from_dict(attrs)
    stage = cfg.stage_config()
    identity = stage.fit_identity()
    check_implicit(attrs, group.attrs.get(ATTRS_KEY), **identity)
    recorded = str(attrs.get("weights_hash") or "")
    weights = cfg.weights
    if weights is None and attrs.get("weights"):
        weights = attrs["weights"]  # the source, where the store records it
    elif weights is None and recorded.startswith("random:"):
        weights = "random"  # deterministic random weights identify themselves by their hash
    info = describe_backbone(str(attrs["backbone"]), weights, storage_options=cfg.storage_options)
    if recorded and info.weights_hash != recorded:
        from pipeline.errors import StoreMismatchError

        raise StoreMismatchError(
            f"backbone {attrs['backbone']} weights {info.weights_hash} differ from the store's {recorded}; pass "
            "the weights the store was made with (--weights)"
        )
    pending = pending_implicit_rows(group, cfg.rows, cfg.limit, require_complete=True)
    ids = [str(v) for v in np.asarray(group["image_id"][:]).tolist()]
    uris = [str(v) for v in np.asarray(group["uri"][:]).tolist()]
    decode = DecodeSpec(
        input_size=tuple(int(s) for s in attrs["input_size"]), policy=str(attrs["resize_policy"]),
        min_side=int(attrs["stride"]), rows_per_shard=schema.rows_per_shard,
        max_pixels=int(attrs.get("max_pixels") or MAX_PIXELS), storage_options=cfg.storage_options,
    )
    return PlanJob(
        uri=cfg.store, schema=schema, settings={}, units=implicit_units(pending, schema.rows_per_shard, ids, uris),
        decode=decode, fitter=fitter_spec(stage, attrs, weights=weights, storage_options=cfg.storage_options),
        stage=stage, implicit=identity, create=False, resumed=True, pending_fits=int(len(pending)),
        storage_options=cfg.storage_options, progress_interval_s=cfg.progress_interval_s, quiet=cfg.quiet,
    )


def counts_before(job: PlanJob) -> dict[str, int]:
    """Rows already done in the store (0 for a new store): ``complete``, ``failed``, ``pending`` of the main status
    and ``implicit_done`` (rows whose implicit status is set)."""
    if not job.resumed:
        return {"complete": 0, "failed": 0, "pending": job.schema.n_rows, "implicit_done": 0}
    group = open_store(job.uri, storage_options=job.storage_options)
    done = int((np.asarray(group[IMPLICIT_STATUS][:]) != Status.PENDING).sum()) if IMPLICIT_STATUS in group else 0
    return {**status_counts(group), "implicit_done": done}
