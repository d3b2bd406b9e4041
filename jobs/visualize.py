"""Pictures of features as PNG: ``[image | low-res | high-res]``, PCA to RGB with one basis per image.

    python jobs/visualize.py --store out/demo.zarr --rows 0 3 --out pictures/
    python jobs/visualize.py --store out/demo.zarr --rows 0 --array implicit --out pictures/
    python jobs/visualize.py --image pipeline/samples/skate.jpg --backbone efficientnet_lite0 --out pictures/
    python jobs/visualize.py --image photo.jpg --backbone dinov2_vits14 --upsampler ckpt/jbu --input-size 224 --out p/
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/visualize.py` without installing the package
    sys.path.insert(0, str(REPO))


from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.evaluate.visualize import VisualizeConfig  # noqa: E402


CONFIG = VisualizeConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`VisualizeConfig` field (``jobs/flags.py``)."""
    return parser_for(VisualizeConfig, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return run_job("visualize", lambda: _run(config_from(VisualizeConfig, args)))


def _run(cfg: VisualizeConfig) -> int:
    from pipeline.evaluate.visualize import run_visualize

    for path in run_visualize(cfg):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
