"""Throughput of one featurizer actor's model work: images/s of ``pipeline.featurize.stages.Featurizer`` per upsampler.

What a GPU (or CPU) actor of the featurize job does per batch of decoded images: normalise, backbone, upsampler,
cast to the store dtype, copy to host memory. Decode (CPU tasks) and the Zarr write (sink tasks) run beside it in
the job and are not timed here. Every upsampler runs in the same process on the same pixels, against two baselines
measured in the same run: the backbone alone (low-res features only) and bilinear upsampling. No Ray, no Zarr:
it runs on a bare GPU machine.

    python benchmarks/featurizer_throughput.py                                   # dinov2_vits14 224 -> 224, fp16
    python benchmarks/featurizer_throughput.py --backbone vit_s16 --output-size 448 --images 128 --json out.json

Weights are random by default (the architecture and the cost are the same as with real weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _BackboneOnly:
    """Stands in for an upsampler and returns the low-res map: the cost of the backbone alone."""

    channel_agnostic = False

    def __call__(self, feats: Any, image: Any, output_size: Any = None) -> Any:
        return feats


def _units(n: int, unit_rows: int, size: tuple[int, int]) -> list[dict[str, np.ndarray]]:
    """``n`` images (the sample photos, cycled) decoded by the pipeline's own decode stage into work units of
    ``unit_rows`` rows: exactly what the Featurizer actors receive. Decoded up front, so it is not timed."""
    from pipeline.featurize.stages import DecodeSpec, decode_units

    photos = [str(p) for p in sorted((REPO / "pipeline" / "samples").glob("*.jpg"))]
    uris = [photos[i % len(photos)] for i in range(n)]
    spec = DecodeSpec(input_size=size, policy="crop", min_side=1, rows_per_shard=unit_rows)
    units = []
    for k, start in enumerate(range(0, n, unit_rows)):
        meta = {"image_id": list(range(start, min(n, start + unit_rows))), "uri": uris[start : start + unit_rows]}
        units.append(decode_units({"shard": np.array([k]), "start": np.array([start]),
                                   "meta": np.array([json.dumps(meta)], dtype=object)}, spec))
    return units


def _time(stage: Any, units: list[dict[str, np.ndarray]]) -> dict[str, float]:
    stage(units[0])  # warm-up: cuDNN plans, kernel compilation, allocator
    t0 = time.perf_counter()
    out_bytes = images = 0
    for unit in units:
        out = stage(unit)
        out_bytes += out["hires"].nbytes + out["lowres"].nbytes
        images += int(unit["n"].sum())
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "seconds": seconds, "store_mb_per_s": out_bytes / seconds / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/featurizer_throughput.py", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="dinov2_vits14")
    p.add_argument("--weights", default="random", help="the job's --weights (default random: no download)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--output-size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="store dtype")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--unit-rows", type=int, default=64, help="images per work unit (store shard rows)")
    p.add_argument("--images", type=int, default=256, help="images timed per upsampler (after one warm-up unit)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from featup_ops import BilinearUpsampler, JBUUpsampler, save_upsampler
    from pipeline.featurize.stages import Featurizer, ModelSpec

    size, out_size = (args.input_size,) * 2, (args.output_size,) * 2
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        jbu_path = str(Path(tmp) / "jbu")
        save_upsampler(jbu_path, JBUUpsampler().eval())  # feature-agnostic JBU, untrained: the same cost as trained
        variants = {"backbone only": None, "bilinear": None, "job default (default_upsampler_for)": None,
                    "JBU checkpoint": jbu_path}
        units = _units(args.images, args.unit_rows, size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        name = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
        print(f"featurizer throughput on {device} ({name}): {args.backbone} ({args.weights}), {size[0]}^2 -> "
              f"{out_size[0]}^2, store {args.dtype}, batch {args.batch_size}, {args.images} images", flush=True)
        results: dict[str, Any] = {"device": device, "device_name": name, "args": vars(args), "rows": {}}
        for label, upsampler in variants.items():
            stage = Featurizer(ModelSpec(args.backbone, args.weights, upsampler, out_size, args.dtype,
                                         args.batch_size))
            if label == "backbone only":
                stage.upsampler = _BackboneOnly()
                low = (size[0] // stage.backbone.stride, size[1] // stage.backbone.stride)
                stage.spec = dataclasses.replace(stage.spec, output_size=low)
            elif label == "bilinear":
                stage.upsampler = BilinearUpsampler().to(stage.device)
            r = _time(stage, units)
            results["rows"][label] = r
            print(f"  {label:26s} {r['images_per_s']:8.1f} img/s  {r['store_mb_per_s']:8.1f} MB/s of features",
                  flush=True)
            del stage
            if device == "cuda":
                torch.cuda.empty_cache()
    rows = results["rows"]
    base = rows["backbone only"]["images_per_s"]
    print("\nratios (images/s relative to the backbone alone; 1.0 = the upsampler is free)")
    for label, r in rows.items():
        if label != "backbone only":
            print(f"  {label:26s} {r['images_per_s'] / base:6.2f}x   vs bilinear "
                  f"{r['images_per_s'] / rows['bilinear']['images_per_s']:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
