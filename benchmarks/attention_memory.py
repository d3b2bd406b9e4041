"""Benchmark: peak memory and time of an attention upsampler, dense vs tiled, measured side by side in one run.

    python benchmarks/attention_memory.py --kind anyup                    # CPU fp32, 1 thread: 32^2 tokens, C=384
                                                                          #   -> 448^2 dense and tiled, 2048^2 tiled
    python benchmarks/attention_memory.py --kind anyup --device cuda --dtype bf16 --tokens 28
    python benchmarks/attention_memory.py --kind loftup                   # LoftUp (needs featup_ops/loftup.py)
    python benchmarks/attention_memory.py --kind anyup --big 0 --json out/attention_memory.json

Every configuration runs in a fresh subprocess (random weights, seeded): the model and the inputs are built and a
small warm-up call is made, then the measured call. Peak memory is what the call adds on top of that baseline:
on CPU the process's high-water mark ``ru_maxrss`` after the call minus its resident bytes just before (an upper
bound: nothing transient is missed, and a high-water mark left by the build counts against the call), on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated bytes before. The output tensor is part of the peak;
the table also shows the peak beyond it. "dense" is the module with ``max_tile_bytes=None`` (the reference
computation); "tiled" uses the module's default budget unless ``--budget`` is given. The image has the output's size
(the default output size of both kinds), ImageNet-normalised random values; the features are random.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as python benchmarks/<name>.py too

__all__ = ["KINDS", "build_upsampler", "measure", "main"]

KINDS = ("anyup", "loftup")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
_MB = 2**20


def build_upsampler(kind: str, *, channels: int, max_tile_bytes: int | None | str = "default") -> Any:
    """A ``kind`` upsampler with seeded random weights, in eval mode.

    Args:
        kind: ``anyup`` or ``loftup``.
        channels: feature channels (LoftUp is built for exactly these; AnyUp takes any).
        max_tile_bytes: the tile budget; None = dense; ``"default"`` = the module's default.

    Raises:
        SystemExit: ``loftup`` while ``featup_ops.loftup`` is not importable.
    """
    import torch

    kw = {} if max_tile_bytes == "default" else {"max_tile_bytes": max_tile_bytes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "anyup":
            from featup_ops.anyup import AnyUpUpsampler

            return AnyUpUpsampler("paper", **kw).eval()
        if kind == "loftup":
            try:
                from featup_ops.loftup import LoftUpUpsampler
            except ImportError as exc:
                raise SystemExit(f"--kind loftup needs featup_ops.loftup ({exc}); it is not in this checkout") from None
            return LoftUpUpsampler(None, dim=channels, **kw).eval()
    raise SystemExit(f"unknown --kind {kind!r}; choose one of {KINDS}")


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process (call it in a fresh one).

    Args:
        cfg: kind, mode (dense/tiled), device, dtype (torch name), tokens, channels, size, budget (None = module
            default), repeats, threads.

    Returns:
        cfg plus peak_mb (added by the call), output_mb, beyond_output_mb, seconds (wall) and cpu_seconds (this
        process's CPU time), each the least over the repeats.
    """
    import resource

    import torch

    torch.set_num_threads(int(cfg["threads"]))
    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    budget: int | None | str = None if cfg["mode"] == "dense" else (cfg["budget"] or "default")
    model = build_upsampler(cfg["kind"], channels=cfg["channels"], max_tile_bytes=budget).to(dev, dtype)
    gen = torch.Generator().manual_seed(1)
    t, c, s = cfg["tokens"], cfg["channels"], cfg["size"]
    feats = torch.randn(1, c, t, t, generator=gen).to(dev, dtype)
    image = torch.randn(1, 3, s, s, generator=gen).to(dev, dtype)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        small = torch.randn(1, 3, 2 * t, 2 * t, generator=gen).to(dev, dtype)
        model(feats, small)  # warm-up: libraries' one-time allocations stay out of the measurement
        if cuda:  # and on CUDA a full-size warm-up (cuBLAS workspaces, kernel selection)
            model(feats, image)
        out = None
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = _current_rss()
        times, cpu_times = [], []
        for _ in range(int(cfg["repeats"])):
            out = None
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(feats, image)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        out_bytes = out.numel() * out.element_size()
        ok = bool(torch.isfinite(out).all())
    return {**cfg, "peak_mb": peak / _MB, "output_mb": out_bytes / _MB, "beyond_output_mb": (peak - out_bytes) / _MB,
            "seconds": min(times), "cpu_seconds": min(cpu_times), "finite": ok}


def _current_rss() -> int:
    """This process's resident bytes now (Linux ``/proc/self/statm``; elsewhere the high-water mark so far)."""
    import os
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_child(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**cfg, "error": f"exit {res.returncode}: {tail}"}
    return json.loads(lines[-1])


def _row(r: dict[str, Any]) -> str:
    label = f"{r['mode']:<5} {r['tokens']}^2->{r['size']}^2"
    if "error" in r:
        return f"{label:<20} {r['error']}"
    return (f"{label:<20} {r['peak_mb']:>10.0f} {r['output_mb']:>10.0f} {r['beyond_output_mb']:>12.0f} "
            f"{r['seconds']:>9.3f} {r['cpu_seconds']:>9.3f}" + ("" if r["finite"] else "  NON-FINITE OUTPUT"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, default="anyup")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    ap.add_argument("--tokens", type=int, default=32, help="low-res grid side (default 32)")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--size", type=int, default=448, help="output (and image) side of the dense-vs-tiled pair")
    ap.add_argument("--big", type=int, default=2048, help="output side of the extra tiled run; 0 = none")
    ap.add_argument("--budget", type=int, default=None, help="tiled max_tile_bytes (default: the module's)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per row, the least time kept (default 1 on CPU, 5 on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (e.g. where it cannot fit)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    repeats = args.repeats or (5 if args.device.startswith("cuda") else 1)
    base = dict(kind=args.kind, device=args.device, dtype=_DTYPES[args.dtype], tokens=args.tokens,
                channels=args.channels, budget=args.budget, repeats=repeats, threads=args.threads)
    plan = [] if args.no_dense else [dict(base, mode="dense", size=args.size)]
    plan.append(dict(base, mode="tiled", size=args.size))
    if args.big:
        plan.append(dict(base, mode="tiled", size=args.big))
    print(f"{args.kind} on {args.device} {args.dtype}, C={args.channels}, threads={args.threads}, "
          f"tiled budget={'module default' if args.budget is None else args.budget}; peak in MiB; time of the "
          "call (wall, and this process's CPU time: on a shared machine the CPU time is the steadier)")
    print(f"{'config':<20} {'peak':>10} {'output':>10} {'peak-output':>12} {'wall s':>9} {'cpu s':>9}")
    rows = []
    for cfg in plan:
        r = _run_child(cfg, args.timeout)
        rows.append(r)
        print(_row(r), flush=True)
    pair = {r["mode"]: r for r in rows if r["size"] == args.size and "error" not in r}
    if len(pair) == 2:
        d, t = pair["dense"], pair["tiled"]
        print(f"at {args.size}^2: tiled/dense peak {t['peak_mb'] / d['peak_mb']:.3f} "
              f"(beyond output {t['beyond_output_mb'] / max(d['beyond_output_mb'], 1e-9):.3f}), "
              f"time {t['seconds'] / d['seconds']:.2f}x wall, {t['cpu_seconds'] / d['cpu_seconds']:.2f}x cpu")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r and r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
