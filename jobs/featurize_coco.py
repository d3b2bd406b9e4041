"""Featurize a COCO split into a Zarr v3 feature store (or, with ``--demo``, the sample photos the project ships).

Runs the same way locally and on a cluster:

    python jobs/featurize_coco.py --demo
    python jobs/featurize_coco.py --input /data/coco --split val2017 --output out/val2017.zarr --limit 500
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/featurize_coco.py --input s3://bucket/coco --split val2017 --output s3://bucket/feats/val.zarr

With ``RAY_ADDRESS`` set (as ``ray job submit`` does) it joins that cluster; otherwise it starts a local Ray bound
to 127.0.0.1. Rerunning the same command resumes; other settings into the same ``--output`` are refused.

``--demo`` writes ``demo.zarr`` and ``demo_pictures/`` under ``$FEATUP_DEMO_DIR``, by default ``out/`` or, under
``ray job submit --working-dir`` (whose copy of the working directory Ray deletes), ``~/featup-pipeline/``, where it
also copies the sample photos the store's rows point to; it prints where.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/featurize_coco.py` without installing the package
    sys.path.insert(0, str(REPO))

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import demo_dir, ray_working_dir_copy, run_job  # noqa: E402
from pipeline.featurize.config import FeaturizeConfig  # noqa: E402

#: --demo: the photos shipped in pipeline/samples/, a local store (``demo.zarr`` in pipeline.cli.demo_dir()), the
#: real packaged EfficientNet-Lite0 weights and the default upsampler (featup_ops.default_upsampler_for: the JBU
#: checkpoint shipped in the package).
DEMO_INPUT = REPO / "pipeline" / "samples"
DEMO_STORE = "demo.zarr"
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
    parser.add_argument("--demo", action="store_true", help="featurize the shipped sample photos into out/demo.zarr "
                        "($FEATUP_DEMO_DIR/demo.zarr if set; under ray job submit ~/featup-pipeline/demo.zarr)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and (not args.input or not args.output):
        parser.error("--input and --output are required (or use --demo)")
    return args


def _demo_input() -> Path:
    """The demo's photos: the shipped ones; inside a Ray job's working-directory copy, a copy of them in the demo
    folder (:func:`_copy_demo_input`), so that the store's ``uri`` column (read again by visualize and fit_implicit)
    outlives the job."""
    return DEMO_INPUT if ray_working_dir_copy() is None else demo_dir() / "samples"


def _copy_demo_input(target: Path) -> None:
    """Copy the shipped photos to ``target`` (unless it is where they are)."""
    if target == DEMO_INPUT:
        return
    target.mkdir(parents=True, exist_ok=True)
    for photo in sorted(DEMO_INPUT.glob("*.jpg")):
        if not (target / photo.name).exists():
            shutil.copyfile(photo, target / photo.name)


def _demo_pictures(store: str, out_dir: Path) -> None:
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
            input=str(_demo_input()),
            output=args.output or str(demo_dir() / DEMO_STORE),
            kind="folder",
            split=None,
            output_size=args.output_size or DEMO_OUTPUT_SIZE,
            progress_interval_s=min(args.progress_interval_s, 5.0),
        )
        _copy_demo_input(Path(cfg.input))
    else:
        cfg = config_from(FeaturizeConfig, args, kind="coco")
    from pipeline.featurize import main_from_config

    rc = main_from_config(cfg)
    if args.demo and rc == 0:
        print(f"demo store: {Path(cfg.output).resolve()}")
        _demo_pictures(cfg.output, demo_dir() / "demo_pictures")
    return rc


if __name__ == "__main__":
    sys.exit(main())
