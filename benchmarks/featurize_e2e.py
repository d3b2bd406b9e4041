"""Benchmark: the Ray featurize pipeline vs a bare single-process loop doing the same work on the same images.

    python -m benchmarks.featurize_e2e                       # 96 images, efficientnet_lite0 @224, bilateral to 56, fp16
    python -m benchmarks.featurize_e2e --codecs              # compression ratio / speed of the store codecs
    python -m benchmarks.featurize_e2e --backbone vit_s16 --weights random --output-size 56 --json out/bench.json

Both sides do: read bytes, decode + resize (crop) to the input size, backbone, upsampler, cast to the store dtype,
write a Zarr v3 feature store with the same layout. Both include model loading; the Ray side runs on an already
started local Ray (cluster start-up is a one-off per node, not per job). Prints images/s of each and their ratio
(target >= 0.9 on the 2-core development machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as python benchmarks/<name>.py too

__all__ = ["make_images", "bare_loop", "ray_pipeline", "main"]

SAMPLES = REPO / "pipeline" / "samples"


def make_images(folder: Path, n: int) -> Path:
    """Copy the shipped sample photos into ``folder`` until it holds ``n`` files (distinct names)."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = photos[i % len(photos)]
        shutil.copyfile(src, folder / f"{i:05d}_{src.name}")
    return folder


def bare_loop(cfg: Any) -> tuple[float, float]:
    """The same work in one process, no Ray.

    Returns:
        ``(wall seconds including model load, steady images/s after the first unit)``.
    """
    import torch

    threads = torch.get_num_threads()
    from pipeline.featurize.stages import default_torch_threads

    torch.set_num_threads(cfg.torch_threads or default_torch_threads())  # the same threads as a Featurizer actor
    try:
        return _bare_loop(cfg)
    finally:
        torch.set_num_threads(threads)


def _bare_loop(cfg: Any) -> tuple[float, float]:
    from dataclasses import replace

    from pipeline.io.decode import read_and_decode
    from pipeline.io.sources import build_manifest
    from pipeline.featurize.stages import ModelSpec, build_models, featurize_pixels
    from pipeline.store import (
        FeatureStoreSchema, Status, create_or_open_store, rows_per_shard_for, to_store_dtype, write_shard,
    )

    t0 = time.perf_counter()
    m = build_manifest(cfg.input)
    out = cfg.output_hw
    spec = ModelSpec(cfg.backbone, cfg.weights, cfg.upsampler, out, cfg.dtype, cfg.batch_size)
    backbone, up = build_models(spec)
    low_hw = (cfg.input_hw[0] // backbone.stride, cfg.input_hw[1] // backbone.stride)
    schema = FeatureStoreSchema(n_rows=len(m), channels=backbone.dim, lowres_size=low_hw, output_size=out,
                                dtype=cfg.dtype, codec=cfg.codec)
    schema = replace(schema, rows_per_shard=cfg.rows_per_shard or rows_per_shard_for(schema.hires_row_bytes))
    group, _ = create_or_open_store(cfg.output, schema, {"bench": "bare"})
    done: list[float] = []
    for k in range(schema.num_shards):
        start, stop = schema.shard_rows(k)
        px, ok, orig, err = [], [], [], []
        for _, d, reason in read_and_decode(m.uris[start:stop], size=cfg.input_hw, policy=cfg.policy,
                                            min_side=backbone.stride):
            if d is not None:
                px.append(d.pixels), ok.append(True), orig.append(d.orig_size), err.append("")
            else:
                ok.append(False), orig.append((0, 0)), err.append(reason)
        low, high = featurize_pixels(np.stack(px), backbone, up, output_size=out, batch_size=cfg.batch_size,
                                     out_dtype=cfg.dtype)
        n = stop - start
        write_shard(group, k, {
            "image_id": np.asarray(m.image_ids[start:stop]), "uri": np.asarray(m.uris[start:stop]),
            "error": np.asarray(err), "orig_size": np.asarray(orig, dtype=np.int32),
            "valid_size": np.asarray(orig, dtype=np.int32),
            "lowres": to_store_dtype(low, cfg.dtype), "hires": to_store_dtype(high, cfg.dtype),
            "status": np.where(ok, Status.COMPLETE, Status.FAILED).astype(np.uint8)[:n],
        })
        done.append(time.perf_counter())
    steady = (len(m) - schema.rows_per_shard) / (done[-1] - done[0]) if len(done) > 1 else float("nan")
    return time.perf_counter() - t0, steady


def ray_pipeline(cfg: Any) -> tuple[float, float]:
    """The featurize job through Ray Data on the running local Ray.

    Returns:
        ``(wall seconds including actor start-up and model load, steady images/s after the first unit)``.
    """
    from pipeline.featurize import run_featurize

    t0 = time.perf_counter()
    result = run_featurize(cfg)
    return time.perf_counter() - t0, float(result.get("steady_images_per_s", float("nan")))


def _flags(cfg: Any) -> list[str]:
    """``jobs/featurize.py`` flags for the benchmark's config."""
    return ["--input", cfg.input, "--output", cfg.output, "--kind", cfg.kind, "--backbone", cfg.backbone,
            *(["--weights", cfg.weights] if cfg.weights else []), "--input-size", str(cfg.input_size),
            "--output-size", str(cfg.output_size), "--dtype", cfg.dtype, "--batch-size", str(cfg.batch_size),
            "--rows-per-shard", str(cfg.rows_per_shard), "--actor-cpus", str(cfg.actor_cpus),
            "--decode-cpus", str(cfg.decode_cpus), "--num-gpus", "0", "--quiet",
            *(["--torch-threads", str(cfg.torch_threads)] if cfg.torch_threads else [])]


def command_runs(cfg: Any, out_dir: Path, tag: str = "0") -> tuple[float, float]:
    """Each side as the command a user runs, timed from process start to exit (imports and model load included on
    both sides): the bare loop as ``python -m benchmarks.featurize_e2e --bare-only ...`` and the job as
    ``python jobs/featurize.py ...`` joining the already running local Ray (``RAY_ADDRESS``).

    Returns:
        ``(bare seconds, ray seconds)``.
    """
    import subprocess
    from dataclasses import replace

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    times = []
    for name, cmd in (
        ("bare", [sys.executable, "-m", "benchmarks.featurize_e2e", "--bare-only",
                  *_flags(replace(cfg, output=str(out_dir / f"cmd-bare{tag}.zarr")))]),
        ("ray", [sys.executable, str(REPO / "jobs" / "featurize.py"),
                 *_flags(replace(cfg, output=str(out_dir / f"cmd-ray{tag}.zarr")))]),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} command failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return times[0], times[1]


def _bare_only(argv: list[str]) -> int:
    """``--bare-only`` + featurize flags: run :func:`bare_loop` on that config in this process (for
    :func:`command_runs`)."""
    from jobs.featurize import CONFIG
    from jobs.flags import config_from, parser_for

    bare_loop(config_from(CONFIG, parser_for(CONFIG).parse_args(argv)))
    return 0


def bench_codecs(images: int = 4, size: int = 112) -> list[dict[str, Any]]:
    """Compression ratio and write/read speed of each codec on real features (efficientnet_lite0, packaged
    ImageNet weights, bilateral upsampling to ``size``, fp16, one chunk per image), through the store's own layout."""
    from pipeline.io.decode import decode_image
    from pipeline.io.sources import build_manifest, read_many
    from pipeline.featurize.stages import ModelSpec, build_models, featurize_pixels
    from pipeline.store.schema import to_store_dtype
    from pipeline.store import CODECS, FeatureStoreSchema, create_or_open_store, write_shard

    m = build_manifest(str(SAMPLES), limit=images)
    backbone, up = build_models(ModelSpec("efficientnet_lite0", None, None, (size, size), "float16", 4))
    px = np.stack([decode_image(d, size=(224, 224)).pixels for d in read_many(m.uris)])
    low, high = featurize_pixels(px, backbone, up, output_size=(size, size), batch_size=4)
    low16, high16 = to_store_dtype(low, "float16"), to_store_dtype(high, "float16")
    n = len(px)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in CODECS:
            schema = FeatureStoreSchema(n_rows=n, channels=backbone.dim, lowres_size=low.shape[-2:],
                                        output_size=(size, size), dtype="float16", rows_per_shard=n, codec=codec)
            uri = f"{tmp}/{codec}.zarr"
            group, _ = create_or_open_store(uri, schema, {"bench": codec})
            data = {"image_id": np.asarray(m.image_ids), "uri": np.asarray(m.uris), "error": np.asarray([""] * n),
                    "orig_size": np.zeros((n, 2), np.int32), "valid_size": np.zeros((n, 2), np.int32),
                    "lowres": low16, "hires": high16, "status": np.ones(n, np.uint8)}
            t0 = time.perf_counter()
            write_shard(group, 0, data)
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = group["hires"][:]
            t_read = time.perf_counter() - t0
            assert np.array_equal(back, high16)
            on_disk = sum(f.stat().st_size for f in Path(uri, "hires").rglob("*") if f.is_file())
            rows.append({"codec": codec, "ratio": round(high16.nbytes / on_disk, 3),
                         "write_MBps": round(high16.nbytes / 1e6 / t_write, 1),
                         "read_MBps": round(high16.nbytes / 1e6 / t_read, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--output-size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rows-per-shard", type=int, default=8, help="images per work unit (default 8 = one batch)")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--decode-cpus", type=float, default=0.25)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="alternate bare/ray this many times; report the best")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--codecs", action="store_true", help="measure the store codecs on real features instead")
    p.add_argument("--commands", action="store_true",
                   help="also time both sides as the commands a user runs (fresh processes, imports included)")
    args = p.parse_args(argv)
    if args.codecs:
        for row in bench_codecs():
            print(json.dumps(row))
        return 0

    from dataclasses import replace

    from pipeline.featurize import FeaturizeConfig, init_ray

    work = Path(tempfile.mkdtemp(prefix="featup-bench-"))
    try:
        images = make_images(work / "images", args.images)
        base = FeaturizeConfig(
            input=str(images), output="", kind="folder", backbone=args.backbone, weights=args.weights,
            input_size=args.input_size, output_size=args.output_size, dtype=args.dtype, batch_size=args.batch_size,
            rows_per_shard=args.rows_per_shard, actor_cpus=args.actor_cpus, decode_cpus=args.decode_cpus,
            torch_threads=args.torch_threads, num_gpus=0, quiet=True, progress_interval_s=3600,
        )
        init_ray()
        bare, ray_ = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(replace(base, output=str(work / f"bare{r}.zarr"))))
            ray_.append(ray_pipeline(replace(base, output=str(work / f"ray{r}.zarr"))))
        commands = [command_runs(base, work, str(r)) for r in range(args.repeats)] if args.commands else []
        bare_rate = args.images / min(t for t, _ in bare)
        ray_rate = args.images / min(t for t, _ in ray_)
        bare_steady = max(v for _, v in bare)
        ray_steady = max(v for _, v in ray_)
        result = {
            "images": args.images, "backbone": args.backbone, "input_size": args.input_size,
            "output_size": args.output_size, "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard,
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
            "bare_images_per_s": round(bare_rate, 2), "ray_images_per_s": round(ray_rate, 2),
            "ratio": round(ray_rate / bare_rate, 3),
            "bare_steady_images_per_s": round(bare_steady, 2), "ray_steady_images_per_s": round(ray_steady, 2),
            "steady_ratio": round(ray_steady / bare_steady, 3),
            "bare_s": [round(t, 2) for t, _ in bare], "ray_s": [round(t, 2) for t, _ in ray_],
        }
        if commands:
            b, r = min(t for t, _ in commands), min(t for _, t in commands)
            result.update(command_bare_s=[round(t, 2) for t, _ in commands],
                          command_ray_s=[round(t, 2) for _, t in commands], command_ratio=round(b / r, 3))
        print(f"end to end (incl. start-up): bare {bare_rate:6.2f} img/s | ray {ray_rate:6.2f} img/s | "
              f"ratio {ray_rate / bare_rate:.3f}")
        print(f"steady state (after 1st unit): bare {bare_steady:6.2f} img/s | ray {ray_steady:6.2f} img/s | "
              f"ratio {ray_steady / bare_steady:.3f} (target >= 0.9)")
        if commands:
            print(f"as commands (process start to exit, imports included): bare {args.images / b:6.2f} img/s | "
                  f"ray {args.images / r:6.2f} img/s | ratio {b / r:.3f}")
        print(json.dumps(result))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-only"]:
        sys.exit(_bare_only(sys.argv[2:]))
    sys.exit(main())
