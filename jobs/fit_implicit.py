"""Second pass: fill the ``implicit`` features of an existing feature store.

Fits FeatUp's per-image implicit upsampler to the complete rows of a store (re-reading each image from the store's
recorded ``uri`` and decoding it with the store's input size and resize policy) and writes ``implicit`` at
``--implicit-size`` into the same store. Resumable: rows whose ``implicit_status`` is set are skipped, so rerun the
same command after a crash.

    python jobs/fit_implicit.py --store out/feats.zarr --preset fast --implicit-size 112 112
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/fit_implicit.py --store s3://bucket/feats.zarr --implicit-gpus 0.5 --implicit-actors 4
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds loopback only (docs/design.md, "Running")

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.featurize.implicit_config import FitImplicitConfig  # noqa: E402  (no Ray, no torch at import)


CONFIG = FitImplicitConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FitImplicitConfig` field (``jobs/flags.py``); ``--preset`` and ``--seed`` are kept as
    the older spellings of ``--implicit-preset`` and ``--implicit-seed``."""
    return parser_for(FitImplicitConfig, doc=__doc__, aliases={"implicit_preset": ["--preset"],
                                                              "implicit_seed": ["--seed"]})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("fit_implicit", lambda: _locked(config_from(FitImplicitConfig, args)))


def _locked(cfg: FitImplicitConfig) -> int:
    """:func:`_run` holding the store's lock: one driver per store (pipeline/store/lock.py)."""
    from pipeline.store.lock import store_lock

    with store_lock(cfg.store, cfg.storage_options, job="fit_implicit"):
        return _run(cfg)


def _run(cfg: FitImplicitConfig) -> int:
    from pipeline.featurize.fit_implicit import run_fit_implicit

    counts = run_fit_implicit(cfg)
    print(
        f"fit_implicit: done: {counts['fitted']} fitted, {counts['failed']} failed, {counts['skipped']} already set "
        f"({counts['pending']} pending at start, {counts['units']} shard units)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
