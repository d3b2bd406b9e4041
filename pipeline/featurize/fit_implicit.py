"""The second implicit pass (``jobs/fit_implicit.py``): implicit features for the complete rows of an existing store.

The featurize plan without its featurizer stage: :func:`pipeline.featurize.resolve.resolve_fit_implicit` picks the
rows still lacking implicit features, :func:`pipeline.featurize.plan.run_plan` fits them
(:class:`pipeline.featurize.implicit.ImplicitFitter`) and writes them. Driver only: Ray workers never import it.
"""
from __future__ import annotations

from pipeline.featurize.implicit_config import FitImplicitConfig
from pipeline.featurize.plan import run_plan
from pipeline.featurize.resolve import resolve_fit_implicit

__all__ = ["run_fit_implicit"]


def run_fit_implicit(cfg: FitImplicitConfig) -> dict[str, int]:
    """Fill ``implicit`` for the complete rows of an existing store; resumable (rows already set are skipped).

    The featurize plan without its featurizer stage (:func:`pipeline.featurize.plan.run_plan`). Starts a local Ray
    on 127.0.0.1 unless Ray is initialised or ``RAY_ADDRESS`` is set.

    Returns:
        Counts ``{"pending", "units", "fitted", "failed", "skipped"}`` of this run.

    Raises:
        StoreError: no feature store at ``cfg.store``.
        StoreMismatchError: implicit features with other settings, or other backbone weights.
        ConfigError: bad settings (``--rows`` out of range, unknown preset).
    """
    job = resolve_fit_implicit(cfg)
    written = run_plan(job)
    return {
        "pending": job.pending_fits, "units": len(job.units), "fitted": int(written.get("fitted", 0)),
        "failed": int(written.get("fit_failed", 0)), "skipped": 0,
    }
