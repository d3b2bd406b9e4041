"""Throughput and peak memory of one featurizer actor's model work, one row per upsampler kind, in one run.

What a GPU (or CPU) actor of the featurize job does per batch of decoded images: normalise, backbone, upsampler,
cast to the store dtype, copy to host memory. Decode (CPU tasks) and the Zarr write (sink tasks) run beside it in
the job and are not timed here. Every upsampler runs on the same pixels, against two baselines measured in the same
run: the backbone alone (low-res features only) and bilinear upsampling. No Ray, no Zarr: it runs on a bare GPU
machine. Each row runs in a fresh process (CPU: its peak RSS is that row's; CUDA: ``max_memory_allocated``).

    python benchmarks/featurizer_throughput.py                                   # dinov2_vits14 224 -> 224, fp16
    python benchmarks/featurizer_throughput.py --input-size 448 --output-size 448 --images 16
    python benchmarks/featurizer_throughput.py --upsampler uplift=uplift:dinov2-s14=/w/uplift_dinov2-s14.safetensors

The default rows use the random-weight files in the publishers' formats under ``tests/fixtures/`` (the cost is the
one of the real weights: same layers and shapes, C=384); the backbone is random too (``--weights random``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


FIXTURES = REPO / "tests" / "fixtures"
#: label -> upsampler spec of the default rows (C = 384: DINOv2-S layouts).
DEFAULT_ROWS = {
    "bilinear": "bilinear",
    "jbu (shipped lite0)": "jbu:lite0",
    "featup:dinov2": f"featup:dinov2={FIXTURES / 'featup_jbu' / 'dinov2_jbu_stack_norm.ckpt'}",
    "uplift:dinov2-s14": f"uplift:dinov2-s14={FIXTURES / 'uplift' / 'uplift_dinov2-s14.safetensors'}",
    "anyup:paper": f"anyup:paper={FIXTURES / 'anyup' / 'anyup_paper.pth'}",
    "loftup:dinov2s": f"loftup:dinov2s={FIXTURES / 'loftup' / 'pytorch_model.bin.xz'}",
}


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


def _row(args: argparse.Namespace, label: str, spec: str | None) -> dict[str, Any]:
    """Time one upsampler (None: the backbone alone) in this process; returns images/s and peak memory."""
    import resource

    import torch

    from pipeline.featurize.stages import Featurizer, ModelSpec

    size, out_size = (args.input_size,) * 2, (args.output_size,) * 2
    units = _units(args.images, args.unit_rows, size)
    torch.manual_seed(0)
    stage = Featurizer(ModelSpec(args.backbone, args.weights, spec or "bilinear", out_size, args.dtype,
                                 args.batch_size))
    if spec is None:
        stage.upsampler = _BackboneOnly()
        low = (size[0] // stage.backbone.stride, size[1] // stage.backbone.stride)
        stage.spec = dataclasses.replace(stage.spec, output_size=low)
    if stage.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = _time(stage, units)
    if stage.device == "cuda":
        r["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        r["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["label"] = label
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/featurizer_throughput.py", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="dinov2_vits14")
    p.add_argument("--weights", default="random", help="the job's --weights (default random: no download)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--output-size", type=int, default=224)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="store dtype")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--unit-rows", type=int, default=8, help="images per work unit (store shard rows)")
    p.add_argument("--images", type=int, default=32, help="images timed per upsampler (after one warm-up unit)")
    p.add_argument("--upsampler", action="append", default=[], metavar="LABEL=SPEC",
                   help="rows to time (repeatable); default: bilinear, the shipped JBU and one row per published kind")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: the actor's)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # LABEL=SPEC: time one row, print JSON
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import subprocess

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        label, _, spec = args.one.partition("=")
        print("ROW " + json.dumps(_row(args, label, spec or None)), flush=True)
        return 0
    rows_wanted = dict(r.split("=", 1) for r in args.upsampler) if args.upsampler else dict(DEFAULT_ROWS)
    rows_wanted = {"backbone only": "", **rows_wanted}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"featurizer throughput on {device} ({name}): {args.backbone} ({args.weights}), {args.input_size}^2 -> "
          f"{args.output_size}^2, store {args.dtype}, batch {args.batch_size}, {args.images} images; one process "
          "per row", flush=True)
    results: dict[str, Any] = {"device": device, "device_name": name, "args": vars(args), "rows": {}}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    for label, spec in rows_wanted.items():
        cmd = [sys.executable, __file__, *passed, "--one", f"{label}={spec}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {label:24s} failed: {err}", flush=True)
            continue
        r = json.loads(line[4:])
        results["rows"][label] = r
        print(f"  {label:24s} {r['images_per_s']:8.2f} img/s  peak {r['peak_mb']:8.0f} MB", flush=True)
    rows = results["rows"]
    if "backbone only" in rows and "bilinear" in rows:
        base, bil = rows["backbone only"], rows["bilinear"]
        print("\nratios measured in this run (images/s vs the backbone alone and vs bilinear; peak memory vs bilinear)")
        for label, r in rows.items():
            if label != "backbone only":
                print(f"  {label:24s} {r['images_per_s'] / base['images_per_s']:6.2f}x backbone  "
                      f"{r['images_per_s'] / bil['images_per_s']:6.2f}x bilinear  "
                      f"peak {r['peak_mb'] / bil['peak_mb']:5.2f}x bilinear", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
