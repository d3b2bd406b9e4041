"""Train FeatUp's JBU upsampler with the multi-view loss on Ray Train (N workers, GPU or CPU, DDP).

Checkpoints and ``metrics.csv`` go to ``<output>/<name>/``; rerunning the same command resumes from the last
checkpoint. The final upsampler is exported to ``<output>/<name>/upsampler`` for ``featurize_coco.py --upsampler``.
Defaults are the method's (FeatUp's jbu_upsampler.yaml: batch 4, NAdam 1e-3, 5 jitters, projection 30, 2000 steps).

    python jobs/train_upsampler.py --input pipeline/samples --output runs --name lite0 --steps 60 --workers 2 \\
        --cpus-per-worker 0.5 --checkpoint-every 20 --val-every 20
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_upsampler.py \\
        --input s3://bucket/coco --split train2017 --output s3://bucket/runs --name dinov2 --backbone dinov2_vits14 \\
        --workers 8 --use-gpu --val-images 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds loopback only (docs/design.md, "Running")

from jobs.flags import config_from, parser_for  # noqa: E402
from pipeline.cli import run_job  # noqa: E402
from pipeline.train.config import TrainJobConfig  # noqa: E402  (cheap: dataclasses only)


CONFIG = TrainJobConfig
"""The job's config: its fields are the job's flags."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainJobConfig` field (``jobs/flags.py``), grouped data / model / optimisation / run."""
    return parser_for(TrainJobConfig, doc=__doc__)


def config_from_args(args: argparse.Namespace) -> TrainJobConfig:
    """The job's :class:`TrainJobConfig` from parsed flags (flag names = field names)."""
    return config_from(TrainJobConfig, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("train_upsampler", lambda: _run(config_from_args(args)))


def _run(cfg: TrainJobConfig) -> int:
    from pipeline.cli import init_ray
    from pipeline.train import run_training

    init_ray(cfg.address, log_to_driver=True)
    out = run_training(cfg)
    print(f"train_upsampler: step {out['step']}; upsampler -> {out['upsampler']}; metrics -> {out['metrics_csv']}")
    print(json.dumps({k: v for k, v in out["metrics"].items() if isinstance(v, (int, float, str))}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
