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
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds loopback only (docs/design.md, "Running")

from featup_ops.config import TrainConfig  # noqa: E402  (cheap: dataclasses only)
from pipeline.cli import json_object, run_job  # noqa: E402  (cheap: stdlib only)

_M = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    data = p.add_argument_group("data")
    data.add_argument("--input", required=True, help="images: local folder / s3:// prefix, COCO root (with --split), "
                      "tar shards or parquet files")
    data.add_argument("--kind", default="auto", choices=["auto", "coco", "folder", "tar", "parquet"],
                      help="input kind (default: detect)")
    data.add_argument("--split", default=None, help="COCO split, e.g. train2017")
    data.add_argument("--limit", type=int, default=None, help="use only the first N images of the input")
    data.add_argument("--val-images", type=int, default=2,
                      help="hold out the last N images for validation (default 2)")
    data.add_argument("--val-views", type=int, default=10,
                      help="fixed jittered views per held-out image at validation, the identity first (default 10)")
    data.add_argument("--input-size", type=int, default=_M.image_size,
                      help=f"square training crop in px, a multiple of the backbone stride (default {_M.image_size})")
    data.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=True,
                      help="keep each worker's decoded shard in memory after the first epoch (default on)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="efficientnet_lite0", help="backbone preset (default efficientnet_lite0)")
    model.add_argument("--backbones", nargs="+", default=None,
                       help="several backbones for feature-agnostic training (one per step, round-robin)")
    model.add_argument("--weights", default=None,
                       help="backbone weights: default/timm/packaged/random or a local or s3:// file")
    model.add_argument("--feature-agnostic", action=argparse.BooleanOptionalAction, default=True,
                       help="upsampler without the final channel mix, usable with any backbone (default on)")
    model.add_argument("--fixup", action=argparse.BooleanOptionalAction, default=_M.jbu.fixup,
                       help="FeatUp's kernel fix-up MLP in every JBU layer (default on, as FeatUp's code trains it; "
                       "off = normalised kernels only, which the fused inference kernel can run)")
    opt = p.add_argument_group("optimisation (defaults: the method's)")
    opt.add_argument("--steps", type=int, default=_M.steps, help=f"optimizer steps (default {_M.steps})")
    opt.add_argument("--batch-size", type=int, default=_M.batch_size,
                     help=f"images per step per worker (default {_M.batch_size})")
    opt.add_argument("--lr", type=float, default=_M.lr, help=f"NAdam learning rate (default {_M.lr})")
    opt.add_argument("--jitters", type=int, default=_M.n_jitters,
                     help=f"jittered views per image per step (default {_M.n_jitters})")
    opt.add_argument("--proj-dim", type=int, default=_M.projection_dim,
                     help=f"random projection dim of the features in the loss (default {_M.projection_dim})")
    opt.add_argument("--grad-clip-steps", type=int, default=_M.grad_clip_steps,
                     help=f"clip the gradient norm to {_M.grad_clip_norm} for the first N steps, FeatUp's warm-up "
                     f"(default {_M.grad_clip_steps}; 0 for very short runs)")
    opt.add_argument("--seed", type=int, default=0, help="initialisation and jitter seed (default 0)")
    run = p.add_argument_group("run")
    run.add_argument("--output", required=True, help="storage path for checkpoints and metrics (local or s3://)")
    run.add_argument("--name", default="jbu", help="run name; the same --output/--name resumes (default jbu)")
    run.add_argument("--checkpoint-every", type=int, default=_M.ckpt_every,
                     help=f"checkpoint interval in steps (default {_M.ckpt_every})")
    run.add_argument("--val-every", type=int, default=_M.val_every,
                     help=f"validation interval in steps (default {_M.val_every})")
    run.add_argument("--log-every", type=int, default=10, help="console/CSV interval in steps (default 10)")
    run.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept in storage (default 3)")
    run.add_argument("--workers", type=int, default=1, help="Ray Train workers / DDP ranks (default 1)")
    run.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=False,
                     help="one GPU per worker (default: CPU workers with gloo)")
    run.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs per worker; leave some free for the decode tasks (default 1)")
    run.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per Ray Data decode task (default 0.5)")
    run.add_argument("--max-failures", type=int, default=0,
                     help="restart failed workers from the last checkpoint this many times (-1: always)")
    run.add_argument("--storage-options", type=json_object, default=None,
                     help='fsspec options for s3:// input/output as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
                     '"http://127.0.0.1:9000"}}\' (default: AWS_* environment variables)')
    run.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args: argparse.Namespace):  # -> pipeline.train.TrainJobConfig
    """The job's :class:`pipeline.train.TrainJobConfig` from parsed flags (flag names = field names)."""
    from pipeline.train import TrainJobConfig

    return TrainJobConfig(
        input=args.input, output=args.output, name=args.name, kind=args.kind, split=args.split, limit=args.limit,
        val_images=args.val_images, val_views=args.val_views, input_size=args.input_size,
        cache_images=args.cache_images,
        backbone=args.backbone, backbones=tuple(args.backbones or ()), weights=args.weights,
        feature_agnostic=args.feature_agnostic, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        jitters=args.jitters, proj_dim=args.proj_dim, grad_clip_steps=args.grad_clip_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        val_every=args.val_every, log_every=args.log_every, keep_checkpoints=args.keep_checkpoints,
        workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, decode_cpus=args.decode_cpus,
        max_failures=args.max_failures, storage_options=args.storage_options,
        jbu=dataclasses.replace(_M.jbu, fixup=args.fixup),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("train_upsampler", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from pipeline.cli import init_ray
    from pipeline.train import run_training

    init_ray(args.address, log_to_driver=True)
    out = run_training(cfg)
    print(f"train_upsampler: step {out['step']}; upsampler -> {out['upsampler']}; metrics -> {out['metrics_csv']}")
    print(json.dumps({k: v for k, v in out["metrics"].items() if isinstance(v, (int, float, str))}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
