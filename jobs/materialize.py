"""Turn a compact (``--hires on-read``) feature store into a materialized one, for readers outside this project
(xarray, tensorstore, other languages) that read ``hires`` as an array.

    python jobs/materialize.py --source out/imgs_compact.zarr --output out/imgs.zarr
    python jobs/materialize.py --source s3://bucket/feats/c.zarr --output s3://bucket/feats/m.zarr --num-actors 2

Shard by shard through Ray (the featurize plan's sink writes each target shard whole, status last); rerunning the same
command resumes; another store at ``--output`` is refused. With ``RAY_ADDRESS`` set it joins that cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/materialize.py` without installing the package
    sys.path.insert(0, str(REPO))

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.featurize.materialize import MaterializeConfig  # noqa: E402


CONFIG = MaterializeConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`MaterializeConfig` field (``jobs/flags.py``)."""
    return parser_for(MaterializeConfig, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts
    return run_job("materialize", lambda: _run(config_from(MaterializeConfig, args)))


def _run(cfg: MaterializeConfig) -> int:
    from pipeline.featurize.materialize import run_materialize
    from pipeline.store import store_summary

    result = run_materialize(cfg)
    if not cfg.quiet:
        print(store_summary(cfg.output, cfg.storage_options))
        print(json.dumps(result))
    return 0 if result["pending"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
