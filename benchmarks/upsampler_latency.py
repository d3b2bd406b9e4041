"""Latency and peak memory of each upsampler kind alone (no backbone): ``up(lowres, image, size)`` per call, against
bilinear in the same run; for UPLiFT also the time of each 2x step (the upstream publishes per-step times; the
first step's time includes UPLiFT's image encoder, which runs once per call).

    python benchmarks/upsampler_latency.py                                    # CPU, float32, 16^2 -> 224^2
    python benchmarks/upsampler_latency.py --grid 32 --size 448 --dtype bfloat16 --repeats 20   # on a GPU

Weights: the random-weight files in the publishers' formats under ``tests/fixtures/`` (same layers and shapes as the
published ones, C = 384). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (per row); on CPU each row runs in
its own process and reports its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.featurizer_throughput import DEFAULT_ROWS  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3


def _row(args: argparse.Namespace, label: str, spec: str) -> dict[str, Any]:
    import resource

    import torch

    import featup_ops

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype)
    up = featup_ops.load_upsampler(spec, map_location=device).to(dtype)
    patch = 14
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 384, args.grid, args.grid, generator=g).to(device, dtype)
    image = torch.randn(1, 3, args.grid * patch, args.grid * patch, generator=g).to(device, dtype)
    size = (args.size, args.size)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        ms = _timed(lambda: up(feats, image, size), device, args.repeats)
        steps = []
        if label.startswith("uplift"):  # cumulative time of k steps, k = 1.. : the per-step time is the difference
            k_max = 1  # the fewest 2x steps reaching the output size (what the call above ran)
            while args.grid * 2**k_max < args.size:
                k_max += 1
            prev = 0.0
            for k in range(1, k_max + 1):
                t = _timed(lambda k=k: up(feats, image, steps=k), device, args.repeats)
                steps.append(round(t - prev, 3))
                prev = t
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"label": label, "ms": ms, "peak_mb": peak, "step_ms": steps, "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/upsampler_latency.py", description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=16, help="low-res grid side (image = 14 x grid)")
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is there")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--upsampler", action="append", default=[], metavar="LABEL=SPEC")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.one is not None:
        label, _, spec = args.one.partition("=")
        print("ROW " + json.dumps(_row(args, label, spec)), flush=True)
        return 0
    wanted = dict(r.split("=", 1) for r in args.upsampler) if args.upsampler else {
        k: v for k, v in DEFAULT_ROWS.items() if not k.startswith("jbu")}
    print(f"upsampler latency: {args.grid}^2 -> {args.size}^2, C=384, {args.dtype}, mean of {args.repeats} calls "
          "after a warm-up; one process per row", flush=True)
    rows: dict[str, Any] = {}
    passed = list(argv if argv is not None else sys.argv[1:])
    for label, spec in wanted.items():
        proc = subprocess.run([sys.executable, __file__, *passed, "--one", f"{label}={spec}"],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            print(f"  {label:20s} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        r = rows[label] = json.loads(line[4:])
        steps = f"  per 2x step (ms): {r['step_ms']}" if r["step_ms"] else ""
        print(f"  {label:20s} {r['ms']:10.2f} ms  peak {r['peak_mb']:8.0f} MB  ({r['device']}){steps}", flush=True)
    if "bilinear" in rows:
        print("\nratios measured in this run (time and peak memory vs bilinear)")
        for label, r in rows.items():
            print(f"  {label:20s} {r['ms'] / rows['bilinear']['ms']:8.1f}x time  "
                  f"{r['peak_mb'] / rows['bilinear']['peak_mb']:6.2f}x peak")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
