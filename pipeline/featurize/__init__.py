"""The featurize plan: settings (:mod:`.config`), its Ray Data stages (:mod:`.stages`: decode tasks, featurizer
actors), the implicit-fitting stage (:mod:`.implicit`) and the plan that ties them to the store's sink (:mod:`.plan`)."""
from __future__ import annotations

from pipeline.cli import init_ray
from pipeline.featurize.config import FeaturizeConfig, add_featurize_args, config_from_args
from pipeline.featurize.plan import main_from_config, plan_sizes, run_featurize

__all__ = [
    "FeaturizeConfig",
    "add_featurize_args",
    "config_from_args",
    "init_ray",
    "main_from_config",
    "plan_sizes",
    "run_featurize",
]
