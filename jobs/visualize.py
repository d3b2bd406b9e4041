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


def _json_object(text: str):
    from pipeline.cli import json_object

    return json_object(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="feature store (local or s3://); with --rows")
    src.add_argument("--image", help="one image file (local or s3://); with --backbone")
    p.add_argument("--rows", type=int, nargs="+", default=[0], help="store rows to draw")
    p.add_argument("--array", default="hires", choices=["hires", "implicit"], help="store array shown as high-res")
    p.add_argument("--backbone", default=None, help="featup_ops backbone preset (with --image)")
    p.add_argument("--weights", default=None, help="backbone weights: file, s3:// URI or 'random'")
    p.add_argument("--upsampler", default=None, help="upsampler checkpoint dir; default: featup_ops.default_upsampler_for(backbone)")
    p.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="SIDE",
                   help="input: one side (square) or H W, multiples of the stride (with --image)")
    p.add_argument("--policy", default="crop", choices=["crop", "pad"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--storage-options", type=_json_object, default=None,
                   help='fsspec options as JSON for the store, image, weights and checkpoint, e.g. \'{"anon": true}\'')
    args = p.parse_args(argv)
    if args.image and not args.backbone:
        p.error("--image needs --backbone")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from pipeline.cli import run_job

    return run_job("visualize", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.visualize import render_image, render_store_rows

    if args.store:
        paths = render_store_rows(args.store, args.rows, args.out, array=args.array,
                                  storage_options=args.storage_options)
    else:
        stem = Path(args.image.split("?")[0]).stem
        paths = [render_image(args.image, Path(args.out) / f"{stem}_{args.backbone}.png", backbone=args.backbone,
                              weights=args.weights, upsampler=args.upsampler, input_size=args.input_size,
                              policy=args.policy, storage_options=args.storage_options)]
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
