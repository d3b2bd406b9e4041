"""Linear-probe evaluation of feature stores: the protocol the recent upsampler papers share (frozen features,
1x1 conv probe, AdamW, cosine schedule stepped per optimizer step, mIoU and pixel accuracy; depth: RMSE, delta1).

    # bilinear vs JBU vs implicit on the same images (split by image id, identical for every store)
    python jobs/eval_probe.py --store bilinear=out/bilinear.zarr --store jbu=out/jbu.zarr \\
        --store implicit=out/jbu.zarr:implicit --labels /data/cocostuff/stuffthingmaps/val2017 \\
        --label-kind coco-stuff-27 --epochs 5 --seeds 0 1 2 --out results.json
    # every probe protocol (AdamW raw / standardised, L-BFGS to convergence standardised / raw), boundary scores too
    python jobs/eval_probe.py --store bilinear=... --store jbu=... --labels ... --protocol all --seeds 0 1 2
    # feature preservation: train on low-res features, score the same probe on the upsampled ones
    python jobs/eval_probe.py --store jbu=out/jbu.zarr --labels ... --preservation
    # separate train and val stores, probes as Ray tasks (one GPU each when the cluster has GPUs)
    python jobs/eval_probe.py --store jbu=s3://b/train.zarr --val-store jbu=s3://b/val.zarr --labels ... --ray

A store is ``NAME=URI`` or ``NAME=URI:ARRAY`` (array ``hires`` by default, ``implicit`` for implicit features).
Stores are compared on the image ids complete in all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/eval_probe.py` without installing the package
    sys.path.insert(0, str(REPO))

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.evaluate.probe_job import EvalProbeConfig  # noqa: E402


CONFIG = EvalProbeConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`EvalProbeConfig` field (``jobs/flags.py``)."""
    return parser_for(EvalProbeConfig, doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts
    args = build_parser().parse_args(argv)
    return run_job("eval_probe", lambda: _run(config_from(EvalProbeConfig, args)))


def _run(cfg: EvalProbeConfig) -> int:
    from pipeline.evaluate.probe import summarize
    from pipeline.evaluate.probe_job import build_runs, execute

    runs = build_runs(cfg)
    print(f"{len(runs)} probe runs; {len(runs[0].train_ids)} train / {len(runs[0].val_ids)} val images", flush=True)
    results = execute(runs, cfg.ray)
    for r in results:
        print(json.dumps(r), flush=True)
    summary = summarize(results)
    seg = runs[0].task != "depth"
    print("\nname            protocol   trained on -> scored on   " + (
        "mIoU            pixel acc       boundary mIoU   boundary acc" if seg else "RMSE            delta1"))
    for s in summary:
        metrics = ("miou", "pixel_accuracy", "boundary_miou", "boundary_pixel_accuracy") if seg else ("rmse", "delta1")
        cells = "  ".join(f"{s[m]:.4f}±{s[m + '_std']:.4f}" for m in metrics if m in s)
        print(f"{s['name']:<15s} {s['protocol']:<10s} {s['train_array']:>10s} -> {s['array']:<9s} {cells}  "
              f"({s['seeds']} seeds)")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
