"""Distributed upsampler training on Ray Train: the job's settings (:mod:`.config`), its data and trainer
(:mod:`.job`) and the loop each worker runs (:mod:`.loop`)."""
from __future__ import annotations

from pipeline.train.config import EXPORT_DIR, METRICS_FILE, STATE_FILE, VAL_SEED, VAL_VIEWS, TrainJobConfig
from pipeline.train.job import build_datasets, build_trainer, export_upsampler, run_training, split_rows
from pipeline.train.loop import read_metrics, train_loop_per_worker

__all__ = [
    "EXPORT_DIR",
    "METRICS_FILE",
    "STATE_FILE",
    "VAL_SEED",
    "VAL_VIEWS",
    "TrainJobConfig",
    "build_datasets",
    "build_trainer",
    "export_upsampler",
    "read_metrics",
    "run_training",
    "split_rows",
    "train_loop_per_worker",
]
