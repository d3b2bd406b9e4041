"""Featurize a COCO split into a Zarr v3 feature store (or, with ``--demo``, the sample photos the project ships).

Runs the same way locally and on a cluster:

    python jobs/featurize_coco.py --demo
    python jobs/featurize_coco.py --input /data/coco --split val2017 --output out/val2017.zarr --limit 500
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/featurize_coco.py --input s3://bucket/coco --split val2017 --output s3://bucket/feats/val.zarr

With ``RAY_ADDRESS`` set (as ``ray job submit`` does) it joins that cluster; otherwise it starts a local Ray bound
to 127.0.0.1. Rerunning the same command resumes; other settings into the same ``--output`` are refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/featurize_coco.py` without installing the package
    sys.path.insert(0, str(REPO))

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.featurize.config import FeaturizeConfig  # noqa: E402

#: --demo: the photos shipped in pipeline/samples/, a local store, the real packaged EfficientNet-Lite0 weights
#: and the default upsampler (featup_ops.default_upsampler_for: the JBU checkpoint shipped in the package).
DEMO_INPUT = REPO / "pipeline" / "samples"
DEMO_OUTPUT = Path("out") / "demo.zarr"
#: --demo draws PCA pictures of this many rows
DEMO_PICTURES = 3
#: --demo's high-res side: 112 px keeps the CPU demo to a few minutes (the upsampler at 224 px and
#: 320 channels costs ~4x more); pass --output-size 224 for full resolution.
DEMO_OUTPUT_SIZE = 112


CONFIG = FeaturizeConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`FeaturizeConfig` field (``jobs/flags.py``) but ``--kind`` (always coco), plus ``--demo``."""
    parser = parser_for(
        FeaturizeConfig, doc=__doc__, exclude={"kind"}, defaults={"input": None, "output": None, "split": "val2017"}
    )
    parser.add_argument("--demo", action="store_true", help="featurize the shipped sample photos into out/demo.zarr")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and (not args.input or not args.output):
        parser.error("--input and --output are required (or use --demo)")
    return args


def _demo_pictures(store: str, out_dir: Path = Path("out") / "demo_pictures") -> None:
    """PCA pictures (image | low-res | high-res, one basis per image) of the demo store's first complete rows."""
    from pipeline.store import complete_rows, open_store
    from pipeline.evaluate.visualize import render_store_rows

    rows = [int(r) for r in complete_rows(open_store(store))[:DEMO_PICTURES]]
    for path in render_store_rows(store, rows, out_dir):
        print(f"demo picture: {path.resolve()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts
    return run_job("featurize_coco", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.demo:
        cfg = config_from(
            FeaturizeConfig,
            args,
            input=str(DEMO_INPUT),
            output=args.output or str(DEMO_OUTPUT),
            kind="folder",
            split=None,
            output_size=args.output_size or DEMO_OUTPUT_SIZE,
            progress_interval_s=min(args.progress_interval_s, 5.0),
        )
    else:
        cfg = config_from(FeaturizeConfig, args, kind="coco")
    from pipeline.featurize import main_from_config

    rc = main_from_config(cfg)
    if args.demo and rc == 0:
        print(f"demo store: {Path(cfg.output).resolve()}")
        _demo_pictures(cfg.output)
    return rc


if __name__ == "__main__":
    sys.exit(main())
