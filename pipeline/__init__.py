"""Ray Data pipeline around featup_ops: sources, decode, featurizer stages, the Zarr feature store and its
Datasink, the torch Dataset over stores, and the Ray Train wiring. Names are imported lazily."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "build_manifest": "sources",
    "Manifest": "sources",
    "FeaturizeConfig": "featurize",
    "TrainJobConfig": "train",
    "build_trainer": "train",
    "run_training": "train",
    "run_featurize": "featurize",
    "ImplicitStageConfig": "implicit_stage",
    "FitImplicitConfig": "implicit_stage",
    "run_fit_implicit": "implicit_stage",
    "open_store": "store",
    "store_summary": "store",
    "complete_rows": "store",
    "read_attrs": "store",
    "read_bytes": "sources",
    "decode_image": "decode",
    "ZarrFeatureDatasink": "sink",
    "PipelineError": "errors",
    "FeatureDataset": "dataset",
    "ShardBatchSampler": "dataset",
    "collate_features": "dataset",
    "LabelSource": "labels",
    "ProbeConfig": "probe",
    "pca_rgb": "visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
