"""Micro-benchmark of the JBU adaptive conv: ``python -m kernels.bench [--device cpu|cuda] [--sizes 224 448]``.

For C=384, K=7 and each output size it times forward and forward+backward of

- ``ours``: ``kernels.adaptive_conv`` (torch reference on CPU, CuPy kernels on CUDA),
- ``unfold``: ``F.unfold`` + ``einsum`` (the memory-hungry formulation FeatUp's issue #4 proposed),
- ``bilinear``: ``F.interpolate`` 2x from ``(H/2, W/2)`` to ``(H, W)`` (the cheapest way to produce the output),

and on CUDA also the torch path on the GPU, the fused JBU kernels (scalar and vectorised, fp32/fp16/bf16) against
weights + adaptive conv, and a 4-layer JBU stack 28^2 -> 448^2 in fp16 (target: forward <= 5 ms and <= 0.5 GB).

Memory, honestly measured:
- CPU: every case runs in a fresh subprocess; peak = ``ru_maxrss`` (the process's resident high-water mark) minus
  the resident size just before the op, inputs already built. It counts every page the op touched (torch's
  allocator has no CPU peak counter; ``tracemalloc`` does not see torch's allocations).
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the op (torch's caching allocator holds
  every tensor, including the CuPy kernels' outputs, which are allocated with torch).

Unfold cases whose estimated footprint exceeds ~60% of the free memory are skipped and reported as such.
Benchmarks, not tests: numbers on a shared 2-core machine are noisy; the ratios are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

C_DEFAULT = 384
K_DEFAULT = 7
#: fraction of free memory an unfold case may be estimated to need before it is skipped
UNFOLD_MEMORY_FRACTION = 0.8
#: H100/H200 target (issue 15): JBU stack 28^2 -> 448^2, C=384, fp16 forward <= 5 ms and <= 0.5 GB (was 20 ms / 1 GB)
STACK_TARGET_MS, STACK_TARGET_BYTES = 5.0, 500 * 10**6


# --------------------------------------------------------------------------------------------------- the ops
def _unfold_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    B, C = x.shape[:2]
    _, H, W, K, _ = w.shape
    cols = F.unfold(x, K).view(B, C, K * K, H, W)
    return torch.einsum("bcthw,bhwt->bchw", cols, w.reshape(B, H, W, K * K))


def _unfold_bytes(C: int, H: int, W: int, K: int, backward: bool, itemsize: int = 4) -> int:
    cols = C * K * K * H * W * itemsize
    return cols * (2 if backward else 1)  # cols and, with backward, its gradient (measured: 3.7 / 7.3 GB at 224^2)


def _make(method: str, size: int, C: int, K: int, dtype: torch.dtype, device: str, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    if method == "bilinear":
        low = torch.randn(1, C, size // 2, size // 2, generator=g).to(device=device, dtype=dtype)
        low.requires_grad_(grad)
        return (low,), lambda a: F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
    x = torch.randn(1, C, size + K - 1, size + K - 1, generator=g).to(device=device, dtype=dtype)
    w = torch.softmax(torch.randn(1, size, size, K * K, generator=g), -1).view(1, size, size, K, K)
    w = w.to(device=device, dtype=dtype)
    x.requires_grad_(grad), w.requires_grad_(grad)
    if method == "unfold":
        return (x, w), _unfold_conv
    if method == "ours":  # the dispatcher: CuPy on CUDA, the compiled CPU library (or torch) on CPU
        from . import adaptive_conv

        return (x, w), adaptive_conv
    if method == "torch":  # the torch reference on whatever device (CUDA: compared against CuPy)
        from .reference import adaptive_conv_reference

        return (x, w), adaptive_conv_reference
    raise ValueError(f"unknown method {method!r}")


def _run_once(fn, inputs, backward: bool) -> None:
    out = fn(*inputs)
    if backward:
        out.float().sum().backward()
        for t in inputs:
            t.grad = None


# ------------------------------------------------------------------------------------------------- CPU worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_worker(case: dict) -> dict:
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    inputs, fn = _make(case["method"], case["size"], case["C"], case["K"], torch.float32, "cpu", case["backward"])
    rss0 = _rss_bytes()
    if case["warmup"]:
        _run_once(fn, inputs, case["backward"])
    t0 = time.perf_counter()
    _run_once(fn, inputs, case["backward"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # ru_maxrss is KiB on Linux
    return {"seconds": seconds, "peak_bytes": max(0, peak), "threads": torch.get_num_threads()}


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_case(method: str, size: int, C: int, K: int, backward: bool, threads: int = 0) -> dict:
    if method == "unfold":
        need = _unfold_bytes(C, size, size, K, backward)
        if need > UNFOLD_MEMORY_FRACTION * _available_ram():
            return {"skipped": f"needs ~{need / 2**30:.0f} GiB, {_available_ram() / 2**30:.0f} GiB available"}
    case = {"method": method, "size": size, "C": C, "K": K, "backward": backward, "warmup": method != "unfold",
            "threads": threads}
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--worker", json.dumps(case)],
                          capture_output=True, text=True, cwd=root, env=env)
    if proc.returncode != 0:
        return {"skipped": f"worker failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ CUDA
def _cuda_time(fn, reps: int, warmup: int = 2) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / reps, torch.cuda.max_memory_allocated() - base


def _cuda_case(method: str, size: int, C: int, K: int, backward: bool, dtype: torch.dtype, reps: int) -> dict:
    if method == "unfold":
        need = _unfold_bytes(C, size, size, K, backward, torch.finfo(dtype).bits // 8)
        free, _ = torch.cuda.mem_get_info()
        if need > UNFOLD_MEMORY_FRACTION * free:
            return {"skipped": f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"}
    if method == "ours":
        from .dispatch import backend_for

        probe = torch.empty(1, device="cuda", dtype=dtype)
        if backend_for(probe) != "cupy":
            return {"skipped": "CuPy not available: 'ours' would be the torch path"}
    inputs, fn = _make(method, size, C, K, dtype, "cuda", backward)
    try:
        seconds, peak = _cuda_time(lambda: _run_once(fn, inputs, backward), reps)
    except torch.OutOfMemoryError:
        return {"skipped": "out of GPU memory"}
    finally:
        del inputs
        torch.cuda.empty_cache()
    return {"seconds": seconds, "peak_bytes": peak}


def _cuda_fused(size: int, C: int, K: int, dtype: torch.dtype, reps: int) -> list[tuple[str, dict]]:
    """Fused JBU inference at one size: both CUDA kernels (scalar and vectorised; in fp16 also the vectorised one
    at 128, 192 and C channels per z step instead of 64) and the unfused path."""
    from . import jbu_fused
    from .dispatch import backend_for
    from .reference import jbu_weights_reference

    g = torch.Generator(device="cpu").manual_seed(0)
    pad = size + K - 1
    x = torch.randn(1, C, pad, pad, generator=g).to("cuda", dtype)
    keys = torch.randn(1, 32, pad, pad, generator=g).to("cuda", dtype)
    temp = torch.tensor(1.0, device="cuda")
    spatial = torch.rand(K, K, generator=g).to("cuda")
    rows = []
    with torch.no_grad():
        if backend_for(x) == "cupy":
            from ._cupy import jbu_fused_cupy

            for name, vec in (("fused vectorised (cupy)", True), ("fused scalar (cupy)", False)):
                t, m = _cuda_time(lambda v=vec: jbu_fused_cupy(x, keys, temp, spatial, vectorized=v), reps)
                rows.append((name, {"seconds": t, "peak_bytes": m}))
            if dtype == torch.float16:  # tuning data: fewer channels-per-step recomputations vs fewer blocks
                for cpb in (128, 192, C):
                    t, m = _cuda_time(
                        lambda c=cpb: jbu_fused_cupy(x, keys, temp, spatial, vectorized=True, channels_per_block=c),
                        reps,
                    )
                    rows.append((f"fused vectorised, {cpb} ch/step", {"seconds": t, "peak_bytes": m}))
            default = "vectorised" if dtype != torch.float32 else "scalar"
            t, m = _cuda_time(lambda: jbu_fused(x, keys, temp, spatial), reps)
            rows.append((f"kernels.jbu_fused ({default})", {"seconds": t, "peak_bytes": m}))
        from . import adaptive_conv

        t, m = _cuda_time(lambda: adaptive_conv(x, jbu_weights_reference(keys, temp, spatial).to(dtype)), reps)
        rows.append(("weights + adaptive_conv", {"seconds": t, "peak_bytes": m}))
    return rows


def _jbu_stack(feats: torch.Tensor, image: torch.Tensor, proj: torch.Tensor, K: int) -> torch.Tensor:
    """4 JBU layers, each 2x: bicubic upsample, reflect pad, keys = 1x1 projection of the pooled image, fused op."""
    from . import jbu_fused

    r = (K - 1) // 2
    temp = torch.tensor(1.0, device=feats.device)
    ax = torch.linspace(-1, 1, K, device=feats.device)
    spatial = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / 2)
    for _ in range(4):
        h, w = feats.shape[-2] * 2, feats.shape[-1] * 2
        guidance = F.adaptive_avg_pool2d(image, (h, w))
        keys = torch.einsum("dc,bchw->bdhw", proj, guidance)
        up = F.pad(F.interpolate(feats, size=(h, w), mode="bicubic", align_corners=False), (r,) * 4, mode="reflect")
        feats = None  # the low-res input and the unpadded upsample are dead before the kernel runs: drop them
        feats = jbu_fused(up, F.pad(keys, (r,) * 4, mode="reflect"), temp, spatial)
        del up
    return feats


def _cuda_stack(C: int, K: int, reps: int) -> list[tuple[str, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(1, C, 28, 28, generator=g).to("cuda", torch.float16)
    image = torch.randn(1, 3, 448, 448, generator=g).to("cuda", torch.float16)
    proj = torch.randn(32, 3, generator=g).to("cuda", torch.float16)
    rows = []
    with torch.no_grad():
        t, m = _cuda_time(lambda: _jbu_stack(feats, image, proj, K), reps)
        rows.append(("kernels JBU stack (fused, keys given)", {"seconds": t, "peak_bytes": m}))
        try:  # the real upsampler, when featup_ops provides it
            from featup_ops import JBUUpsampler

            up = JBUUpsampler(dim=C).to("cuda", torch.float16).eval()
            t, m = _cuda_time(lambda: up(feats, image, (448, 448)), reps)
            rows.append(("featup_ops.JBUUpsampler", {"seconds": t, "peak_bytes": m}))
        except Exception as e:  # noqa: BLE001 - report, never fail the benchmark
            rows.append(("featup_ops.JBUUpsampler", {"skipped": f"{type(e).__name__}: {str(e)[:100]}"}))
    return rows


# --------------------------------------------------------------------------------------------------- report
def _fmt(r: dict) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    return f"{r['seconds'] * 1e3:10.1f} ms  {r['peak_bytes'] / 2**20:9.1f} MiB"


def _ratio_line(ours: dict, other: dict, name: str) -> str:
    if "skipped" in ours or "skipped" in other:
        return f"    vs {name}: n/a"
    t = other["seconds"] / ours["seconds"]
    m = other["peak_bytes"] / max(ours["peak_bytes"], 1)
    return f"    vs {name}: {t:7.1f}x time ({'faster' if t >= 1 else 'slower'}), {m:7.1f}x peak memory ratio ({name}/ours)"


def _ours_backend(device: str) -> str:
    from .dispatch import backend_for

    try:
        return backend_for(torch.empty(1, device=device))
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e}"


def run(device: str, sizes: list[int], C: int, K: int, reps: int, threads: int = 0,
        methods: tuple[str, ...] = ("ours", "torch", "unfold", "bilinear")) -> dict:
    results: dict = {"device": device, "C": C, "K": K, "cases": {}, "loadavg_start": os.getloadavg()}
    print(f"kernels.bench: device={device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({os.cpu_count()} cpus, "
             f"torch threads {threads or torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})")
          + f", C={C}, K={K}, batch 1", flush=True)
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16]
    methods = [m for m in ("ours", "torch", "unfold", "bilinear") if m in methods]
    for dtype in dtypes:
        for size in sizes:
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                key = f"{size}x{size} {str(dtype).removeprefix('torch.')} {mode}"
                print(f"\n[{key}]", flush=True)
                rows = {}
                for m in methods:
                    if device == "cpu":
                        r = _cpu_case(m, size, C, K, backward, threads)
                    else:
                        r = _cuda_case(m, size, C, K, backward, dtype, reps)
                    rows[m] = r
                    label = {"ours": f"ours ({_ours_backend(device)})", "torch": "torch reference"}.get(m, m)
                    print(f"  {label:22s} {_fmt(r)}", flush=True)
                for other in ("unfold", "bilinear", "torch"):
                    if other in rows and "ours" in rows:
                        print(_ratio_line(rows["ours"], rows[other], other))
                results["cases"][key] = rows
    if device == "cuda":
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for size in sizes:
                key = f"fused JBU {size}x{size} {str(dtype).removeprefix('torch.')} inference"
                print(f"\n[{key}] (D=32 keys)")
                rows = dict(_cuda_fused(size, C, K, dtype, reps))
                for name, r in rows.items():
                    print(f"  {name:30s} {_fmt(r)}")
                results["cases"][key] = rows
    if device == "cuda":
        print("\n[JBU stack 28^2 -> 448^2, fp16, forward]")
        rows = dict(_cuda_stack(C, K, reps))
        for name, r in rows.items():
            print(f"  {name:40s} {_fmt(r)}")
        results["cases"]["jbu stack"] = rows
    results["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {results['loadavg_start'][0]:.1f}, at end {results['loadavg_end'][0]:.1f} "
          f"({os.cpu_count()} cpus): timings on a shared machine are noisy, the ratios are the point")
    _summary(results)
    return results


def _summary(results: dict) -> None:
    print("\nSummary")
    key = "224x224 float32 fwd+bwd"
    rows = results["cases"].get(key)
    if rows and all("seconds" in rows[m] for m in ("ours", "unfold")):
        t = rows["unfold"]["seconds"] / rows["ours"]["seconds"]
        m = rows["unfold"]["peak_bytes"] / max(rows["ours"]["peak_bytes"], 1)
        ok = t >= 10 and m >= 10
        print(f"  {results['device']} target (224^2, C={results['C']}, K={results['K']}, fwd+bwd >= 10x faster than "
              f"unfold at <= 1/10 its peak memory): {'MET' if ok else 'MISSED'} ({t:.1f}x faster, {m:.1f}x less memory)")
    for size in sorted({int(k.split()[2].split("x")[0]) for k in results["cases"] if k.startswith("fused JBU")}):
        cells = []
        for dt in ("float32", "float16", "bfloat16"):
            rows = results["cases"].get(f"fused JBU {size}x{size} {dt} inference", {})
            for name in ("fused scalar (cupy)", "fused vectorised (cupy)"):
                if "seconds" in rows.get(name, {}):
                    cells.append(f"{dt} {name.split()[1]} {rows[name]['seconds'] * 1e3:.2f} ms")
        if cells:
            print(f"  fused JBU {size}^2, C={results['C']}, D=32: " + ", ".join(cells))
    stack = results["cases"].get("jbu stack", {})
    r = next((v for v in stack.values() if "seconds" in v), None)
    if r:
        ok = r["seconds"] * 1e3 <= STACK_TARGET_MS and r["peak_bytes"] <= STACK_TARGET_BYTES
        print(f"  GPU target (JBU stack 28^2 -> 448^2, C={results['C']}, fp16 fwd <= {STACK_TARGET_MS:g} ms and "
              f"<= {STACK_TARGET_BYTES / 1e9:g} GB): "
              f"{'MET' if ok else 'MISSED'} ({r['seconds'] * 1e3:.1f} ms, {r['peak_bytes'] / 2**20:.0f} MiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="output sizes (square)")
    p.add_argument("--channels", type=int, default=C_DEFAULT)
    p.add_argument("--k", type=int, default=K_DEFAULT)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per CUDA case")
    p.add_argument("--methods", nargs="+", default=["ours", "torch", "unfold", "bilinear"],
                   choices=["ours", "torch", "unfold", "bilinear"], help="which implementations to time")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the CPU workers (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_cpu_worker(json.loads(args.worker))))
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run(device, args.sizes, args.channels, args.k, args.reps, args.threads, tuple(args.methods))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
