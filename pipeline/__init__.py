"""Ray Data pipeline around featup_ops, one sub-package per step of the data flow:

``io`` (storage, sources, decode) -> ``featurize`` (settings, stages, implicit stage, plan) -> ``store`` (the Zarr v3
layout, create/open/write/read, the Datasink) -> ``read`` (the torch Dataset over stores) -> ``train`` (Ray Train)
and ``evaluate`` (labels, probes, pictures). ``cli`` and ``errors`` are shared by all. The names below are imported
lazily (``import pipeline`` does no work)."""
from __future__ import annotations

from featup_ops._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "build_manifest": "io.sources",
    "Manifest": "io.sources",
    "FeaturizeConfig": "featurize",
    "TrainJobConfig": "train",
    "build_trainer": "train",
    "run_training": "train",
    "run_featurize": "featurize",
    "ImplicitStageConfig": "featurize.implicit_config",
    "FitImplicitConfig": "featurize.implicit_config",
    "run_fit_implicit": "featurize.fit_implicit",
    "open_store": "store",
    "store_summary": "store",
    "complete_rows": "store",
    "read_attrs": "store",
    "read_bytes": "io.sources",
    "decode_image": "io.decode",
    "ZarrFeatureDatasink": "store.sink",
    "PipelineError": "errors",
    "FeatureDataset": "read.dataset",
    "ShardBatchSampler": "read.sampler",
    "collate_features": "read.collate",
    "LabelSource": "evaluate.labels",
    "ProbeConfig": "evaluate.probe",
    "pca_rgb": "evaluate.visualize",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
