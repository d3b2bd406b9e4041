"""Implicit-fit throughput: images/s of ``featup_ops.fit_implicit`` per device at several group sizes.

A fitting actor of the implicit stage fits a group of images as one batched problem (one network per image, one
view bank filled in large backbone batches, the training step captured as a CUDA graph on a GPU). This measures
that work alone, per group size: G sample photos (cycled) decoded at ``--size`` px, one ``fit_implicit`` call of
the whole group, wall and process-CPU seconds, images/s = G / wall seconds, the steps each image ran (early
stopping), the step mode (``cuda_graph`` or ``eager``) and, on CUDA, the peak memory. One untimed warm-up fit
first (CUDA context, cuDNN autotuning, allocator). No Ray, no Zarr: it runs on a bare GPU machine.

    python benchmarks/implicit_throughput.py --group-sizes 1 8 32 --size 224          # GPU (infra/gpu_check.sh)
    python benchmarks/implicit_throughput.py --group-sizes 1 2 --size 64 --steps 4     # CPU smoke check

The backbone is EfficientNet-Lite0 with its packaged ImageNet weights (no network needed); ``--preset`` picks the
fit settings (default: ``featup_ops.config.DEFAULT_IMPLICIT_PRESET``), ``--steps`` / ``--views`` shorten them for
a smoke check (the figures are then not the preset's).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _images(n: int, size: int, backbone: Any, device: Any) -> Any:
    """(n, 3, size, size) float32 normalised sample photos (cycled), centre-cropped, on ``device``."""
    import numpy as np

    from pipeline.decode import decode_image, normalize

    photos = sorted((REPO / "pipeline" / "samples").glob("*.jpg"))
    pixels = [decode_image(photos[i % len(photos)].read_bytes(), size=(size, size), policy="crop").pixels
              for i in range(n)]
    return normalize(np.stack(pixels), backbone.mean, backbone.std).to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[1, 8, 32], help="images per fit_implicit call")
    p.add_argument("--size", type=int, default=224, help="input side in px (a multiple of 32)")
    p.add_argument("--preset", default=None, help="implicit preset (default: DEFAULT_IMPLICIT_PRESET)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps (smoke checks)")
    p.add_argument("--views", type=int, default=None, help="override the preset's view bank size (smoke checks)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=None, help="override cfg.cuda_graph")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    import featup_ops
    from featup_ops.config import DEFAULT_IMPLICIT_PRESET, implicit_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or DEFAULT_IMPLICIT_PRESET
    cfg = implicit_preset(preset)
    over: dict[str, Any] = {}
    if args.steps is not None:
        over["steps"] = args.steps
    if args.views is not None:
        over.update(n_views=args.views, pca_views=min(cfg.pca_views, args.views))
    if args.cuda_graph is not None:
        over["cuda_graph"] = args.cuda_graph
    cfg = dataclasses.replace(cfg, **over)
    backbone = featup_ops.load_backbone("efficientnet_lite0").to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    warm = dataclasses.replace(cfg, steps=min(cfg.steps, 8), n_views=min(cfg.n_views, 16),
                               pca_views=min(cfg.pca_views, 16), early_stop=False)
    featup_ops.fit_implicit(_images(1, args.size, backbone, dev), backbone, cfg=warm)
    sync()

    rows = []
    for g in args.group_sizes:
        x = _images(g, args.size, backbone, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        info: dict = {}
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        featup_ops.fit_implicit(x, backbone, cfg=cfg, info=info)
        sync()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        row = {
            "group_size": g, "images_per_s": g / wall, "s_per_image": wall / g, "wall_s": wall, "cpu_s": cpu,
            "steps_mean": sum(info["steps"]) / g, "step_mode": info["step_mode"],
            "train_size": list(info["train_size"]),
        }
        if dev.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out = {"device": name, "size": args.size, "preset": preset, "overrides": over, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"Summary: implicit fit throughput, {name}, {args.size} px, preset {preset}"
          + (f" (overrides {over})" if over else ""))
    for r in rows:
        mem = f", peak {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
        print(f"  group {r['group_size']:>3}: {r['images_per_s']:.3f} img/s ({r['s_per_image']:.2f} s/img, "
              f"{r['cpu_s'] / r['group_size']:.2f} CPU-s/img, {r['steps_mean']:.0f} steps, {r['step_mode']}{mem})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
