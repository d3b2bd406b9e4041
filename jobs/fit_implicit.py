"""Second pass: fill the ``implicit`` features of an existing feature store.

Fits FeatUp's per-image implicit upsampler to the complete rows of a store (re-reading each image from the store's
recorded ``uri`` and decoding it with the store's input size and resize policy) and writes ``implicit`` at
``--implicit-size`` into the same store. Resumable: rows whose ``implicit_status`` is set are skipped, so rerun the
same command after a crash.

    python jobs/fit_implicit.py --store out/feats.zarr --preset fast --implicit-size 112 112
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/fit_implicit.py --store s3://bucket/feats.zarr --implicit-gpus 0.5 --implicit-actors 4
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds loopback only (docs/design.md, "Running")

from featup_ops.config import DEFAULT_IMPLICIT_PRESET  # noqa: E402  (cheap: dataclasses only)
from pipeline.cli import json_object, run_job  # noqa: E402  (cheap: stdlib only)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="feature store URI (local path or s3://...)")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="only these row indices (default: all complete rows)")
    p.add_argument("--limit", type=int, default=None, help="at most this many rows")
    p.add_argument("--preset", "--implicit-preset", dest="preset", default=DEFAULT_IMPLICIT_PRESET,
                   help="implicit fit preset: lite (default), fast, or paper (the method's values)")
    p.add_argument("--implicit-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="output size of the implicit features (default: the store's hires size)")
    p.add_argument("--implicit-gpus", type=float, default=None,
                   help="GPUs per fitting actor, fractional allowed (default: 1 if Ray sees a GPU, else 0 = CPU actors)")
    p.add_argument("--implicit-actors", type=int, default=1, help="number of fitting actors")
    p.add_argument("--implicit-cpus", type=float, default=1.0, help="CPUs per fitting actor")
    p.add_argument("--images-per-fit", type=int, default=4, help="images fitted together per call")
    p.add_argument("--seed", "--implicit-seed", dest="seed", type=int, default=0, help="fitting seed")
    p.add_argument("--weights", default=None, help="backbone weights the store was made with (default: pretrained)")
    p.add_argument("--storage-options", type=json_object, default=None,
                   help='fsspec options as JSON for the store, the images and the weights, e.g. \'{"anon": true}\'')
    p.add_argument("--progress-interval-s", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("fit_implicit", lambda: _locked(args))


def _locked(args: argparse.Namespace) -> int:
    """:func:`_run` holding the store's lock: one driver per store (pipeline/store/lock.py)."""
    from pipeline.store.lock import store_lock

    with store_lock(args.store, args.storage_options, job="fit_implicit"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pipeline.featurize.implicit import FitImplicitConfig, ImplicitStageConfig, run_fit_implicit

    stage = ImplicitStageConfig(
        preset=args.preset,
        output_size=tuple(args.implicit_size) if args.implicit_size else None,
        gpus=args.implicit_gpus,
        actors=args.implicit_actors,
        cpus_per_actor=args.implicit_cpus,
        seed=args.seed,
        images_per_fit=args.images_per_fit,
    )
    counts = run_fit_implicit(
        FitImplicitConfig(
            store=args.store,
            stage=stage,
            rows=tuple(args.rows) if args.rows else None,
            limit=args.limit,
            weights=args.weights,
            storage_options=args.storage_options,
            progress_interval_s=args.progress_interval_s,
            quiet=args.quiet,
        )
    )
    print(
        f"fit_implicit: done: {counts['fitted']} fitted, {counts['failed']} failed, {counts['skipped']} already set "
        f"({counts['pending']} pending at start, {counts['units']} shard units)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
