"""The featurize plan: settings (:mod:`.config`), resolution before Ray starts (:mod:`.resolve`), its Ray Data stages
(:mod:`.stages`: decode tasks, featurizer actors), the implicit-fitting stage (:mod:`.implicit`, its settings and
flags :mod:`.implicit_config`), progress lines (:mod:`.progress`), the plan that ties them to the store's sink
(:mod:`.plan`) and the second implicit pass over an existing store (:mod:`.fit_implicit`).

Names are imported lazily: Ray workers that only need :mod:`.stages` do not import the plan, Zarr or the driver's
code."""
from __future__ import annotations

from featup_ops._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "FeaturizeConfig": "config",
    "main_from_config": "plan",
    "plan_sizes": "plan",
    "run_featurize": "plan",
    "run_plan": "plan",
    "resolve_featurize": "resolve",
}

__all__ = sorted([*_EXPORTS, "init_ray"])

__getattr__, _dir = lazy_exports(__name__, {**_EXPORTS}, globals())


def init_ray(*args, **kwargs):  # noqa: ANN002, ANN003 - the one function that starts Ray, re-exported
    """:func:`pipeline.cli.init_ray` (kept importable from here)."""
    from pipeline.cli import init_ray as start

    return start(*args, **kwargs)


def __dir__() -> list[str]:
    return __all__
