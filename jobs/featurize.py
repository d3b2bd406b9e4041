"""Featurize any image source into a Zarr v3 feature store: a folder/prefix of images, webdataset tar shards or
parquet files with image bytes, local or s3://.

    python jobs/featurize.py --input /data/imgs --output out/imgs.zarr
    python jobs/featurize.py --input s3://bucket/shards/ --kind tar --output s3://bucket/feats/shards.zarr
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/featurize.py --input ... --output ...

With ``RAY_ADDRESS`` set (as ``ray job submit`` does) it joins that cluster; otherwise it starts a local Ray bound
to 127.0.0.1. Rerunning the same command resumes; other settings into the same ``--output`` are refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/featurize.py` without installing the package
    sys.path.insert(0, str(REPO))

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.featurize.config import FeaturizeConfig  # noqa: E402


CONFIG = FeaturizeConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FeaturizeConfig` field (``jobs/flags.py``)."""
    return parser_for(FeaturizeConfig, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts

    def body() -> int:
        from pipeline.featurize import main_from_config

        return main_from_config(config_from(FeaturizeConfig, args))

    return run_job("featurize", body)


if __name__ == "__main__":
    sys.exit(main())
