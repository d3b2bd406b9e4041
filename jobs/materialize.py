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

from pipeline.cli import json_object, run_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="the on-read store (path or s3:// URI)")
    p.add_argument("--output", required=True, help="the materialized store to write (path or s3:// URI)")
    p.add_argument("--rows-per-shard", type=int, default=None, help="target images per shard (default ~64 MiB)")
    p.add_argument("--num-actors", type=int, default=1, help="materializer actors (one GPU each when present)")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per CPU actor")
    p.add_argument("--batch-size", type=int, default=16, help="rows per upsampler call")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor")
    p.add_argument("--storage-options", type=json_object, default=None, help="fsspec options as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts

    def body() -> int:
        from pipeline.featurize.materialize import run_materialize
        from pipeline.store import store_summary

        result = run_materialize(
            args.source, args.output, storage_options=args.storage_options, rows_per_shard=args.rows_per_shard,
            num_actors=args.num_actors, actor_cpus=args.actor_cpus, batch_size=args.batch_size,
            torch_threads=args.torch_threads, quiet=args.quiet,
        )
        if not args.quiet:
            print(store_summary(args.output, args.storage_options))
            print(json.dumps(result))
        return 0 if result["pending"] == 0 else 1

    return run_job("materialize", body)


if __name__ == "__main__":
    sys.exit(main())
