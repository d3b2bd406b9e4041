"""Benchmark: materialized vs on-read (compact) feature stores, side by side in one run.

    python -m benchmarks.store_modes                  # 32 images (16 per work unit), efficientnet_lite0 (random weights) @224 -> 224, fp16
    python -m benchmarks.store_modes --images 64 --json out/store_modes.json
    python -m benchmarks.store_modes --gpu-only       # on a GPU machine without Ray: only the on-read GPU section

Sections:

1. **bytes per image** at 224^2 output, fp16, 384 and 320 channels (ViT-S/16 at 224 -> 14^2 grid; EfficientNet-Lite0
   at 224 -> 7^2 grid): uncompressed from the store layout, both modes; plus on disk, measured on the stores that
   section 2 writes (320 channels).
2. **featurize throughput** through the Ray plan on this machine's CPU: materialized, on-read, and backbone-only
   (the same decode -> actor plan with the backbone alone and no store write): steady images/s (after the first unit).
3. **loader read throughput** (CPU): ``FeatureDataset.loader`` over both stores, images/s, best of 2 passes.
4. **GPU** (only when CUDA is present): ``hires`` produced on read at 224^2, 384 channels, batch 64, images/s, for
   the fixed bilateral and a default (feature-agnostic) JBU upsampler; no Ray needed.
5. **implicit: function vs array** (``--implicit-store``; ``--implicit-only`` runs just this, no Ray): bytes per
   image of each at 224^2, fp16, 384 and 320 channels, the ``lite`` preset's network (64 coefficients), from the
   store layout; then on disk, with the store's codecs, for one sample photo fitted with EfficientNet-Lite0
   (random weights, 320 channels; the fit truncated to ``--implicit-steps`` steps: the size does not depend on
   the steps), and the seconds to render its function at 224^2 on this CPU (and on CUDA when present).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as python benchmarks/<name>.py too

__all__ = ["bytes_per_image", "featurize_modes", "loader_reads", "gpu_on_read", "implicit_modes", "main"]


def bytes_per_image() -> list[dict[str, Any]]:
    """Uncompressed bytes of one row in each mode at 224^2 output, fp16 (from the store's own layout)."""
    from pipeline.store import FeatureStoreSchema

    out = []
    for channels, grid in ((384, 14), (320, 7)):
        kw = dict(n_rows=1, channels=channels, lowres_size=(grid, grid), output_size=(224, 224), dtype="float16")
        mat = FeatureStoreSchema(**kw).row_bytes
        comp = FeatureStoreSchema(**kw, hires_mode="on-read", input_size=(224, 224)).row_bytes
        out.append({"channels": channels, "grid": grid, "materialized_bytes": mat, "on_read_bytes": comp,
                    "ratio": round(mat / comp, 1)})
    return out


def _backbone_only(cfg: Any) -> float:
    """Steady images/s of the featurize plan's decode -> actor stages with the backbone alone (no upsampler, no
    store write): the ceiling both store modes are compared against. ``cfg`` is resolved as the job would resolve
    it (nothing is written), so the units, the decode spec, the model spec and the resources are the plan's own."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.datasource import Datasink

    from pipeline.featurize.compact import featurize_lowres
    from pipeline.featurize.resolve import resolve_featurize
    from pipeline.featurize.stages import decode_units

    job = resolve_featurize(cfg)
    spec, res = job.model, job.resources

    class BackboneOnly:
        def __init__(self) -> None:
            import torch

            import featup_ops
            from pipeline.featurize.stages import default_torch_threads

            torch.set_num_threads(spec.torch_threads or default_torch_threads())  # as a Featurizer actor
            self.backbone = featup_ops.load_backbone(spec.backbone, spec.weights).eval()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            px = np.asarray(batch["pixels"])
            low = featurize_lowres(px.reshape(-1, *px.shape[2:]), self.backbone, batch_size=spec.batch_size,
                                   out_dtype=spec.dtype)
            return {"shard": batch["shard"], "n": batch["n"], "lowres_sum": low.float().sum((1, 2, 3)).numpy()
                    .reshape(len(px), -1)}  # one row per unit, as the Featurizer returns

    ds = ray.data.from_items(job.units, override_num_blocks=len(job.units))
    ds = ds.map_batches(decode_units, fn_kwargs={"spec": job.decode}, batch_size=1, batch_format="numpy",
                        num_cpus=res.decode_cpus)
    ds = ds.map_batches(BackboneOnly, batch_size=max(1, res.batch_size // job.schema.rows_per_shard),
                        batch_format="numpy", compute=ActorPoolStrategy(size=res.num_actors),
                        num_cpus=res.actor_cpus)

    class _TimingSink(Datasink):
        """A sink that stores nothing but times units as the store's sink does (``(wall time, rows)`` per unit in
        ``write``, steady rate after the first unit in ``on_write_complete``), so backbone-only and the store modes
        are measured by one clock at the same point of the plan."""

        def __init__(self) -> None:
            self.steady = float("nan")

        def write(self, blocks: Any, ctx: Any) -> list[tuple[float, int]]:
            from ray.data.block import BlockAccessor

            done = []
            for block in blocks:
                for unit in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                    done.append((time.time(), int(unit["n"])))
            return done

        def on_write_complete(self, write_result: Any) -> None:
            done = sorted(d for r in write_result.write_returns for d in r)
            if len(done) >= 2 and done[-1][0] > done[0][0]:
                self.steady = sum(k for _, k in done[1:]) / (done[-1][0] - done[0][0])

    sink = _TimingSink()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": res.decode_cpus})  # scheduled as the store sink's writes
    return sink.steady


def featurize_modes(root: Path, n: int, batch_size: int = 8, rows_per_shard: int = 4) -> dict[str, Any]:
    """Run the Ray featurize plan in both modes (and backbone-only) on ``n`` copies of the sample photos."""
    from benchmarks.featurize_e2e import make_images
    from pipeline.cli import init_ray
    from pipeline.featurize import FeaturizeConfig, run_featurize
    from pipeline.io.storage import filesystem

    folder = str(make_images(root / "images", n))
    init_ray()
    out: dict[str, Any] = {"images": n, "rows_per_shard": rows_per_shard}
    base = dict(input=folder, weights="random", input_size=224, output_size=224, dtype="float16",
                batch_size=batch_size, rows_per_shard=rows_per_shard, quiet=True)
    for mode in ("on-read", "materialized"):
        uri = str(root / f"{mode}.zarr")
        r = run_featurize(FeaturizeConfig(output=uri, hires=mode, **base))
        fs, path = filesystem(uri)
        out[mode] = {"store": uri, "steady_images_per_s": r.get("steady_images_per_s"),
                     "images_per_s": r["images_per_s"], "disk_bytes_per_image": int(fs.du(path)) // n}
    backbone_only = FeaturizeConfig(output=str(root / "backbone_only.zarr"), hires="on-read", **base)  # never written
    out["backbone_only"] = {"steady_images_per_s": round(_backbone_only(backbone_only), 3)}
    bb = out["backbone_only"]["steady_images_per_s"]
    for mode in ("on-read", "materialized"):
        out[mode]["vs_backbone_only"] = round((out[mode]["steady_images_per_s"] or 0) / bb, 3) if bb else None
    return out


def loader_reads(stores: dict[str, str], batch_size: int = 8, repeats: int = 2) -> dict[str, float]:
    """Images/s of one pass of ``FeatureDataset(...).loader`` over each store (CPU), best of ``repeats``."""
    from pipeline.read.dataset import FeatureDataset

    out = {}
    for mode, uri in stores.items():
        best = 0.0
        for _ in range(repeats):
            ds = FeatureDataset(uri, "hires")
            t = time.perf_counter()
            rows = sum(len(b["row"]) for b in ds.loader(batch_size, shuffle=False))
            best = max(best, rows / (time.perf_counter() - t))
        out[mode] = round(best, 2)
    return out


def gpu_on_read(batch: int = 64, channels: int = 384, iters: int = 20) -> dict[str, Any] | None:
    """``hires`` produced on read on the GPU at 224^2 from a 14^2 grid, ``channels`` channels, fp16 store dtype;
    images/s per upsampler (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    import featup_ops

    from pipeline.read.on_read import hires_from_compact

    low = torch.randn(batch, channels, 14, 14).half().numpy()
    guid = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "batch": batch, "channels": channels}
    for name, up in (("bilateral", featup_ops.BilateralUpsampler()), ("jbu", featup_ops.JBUUpsampler())):
        up = up.cuda().eval()
        kw = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dtype="float16", size=(224, 224),
                  device="cuda", batch_size=batch)
        for _ in range(3):
            hires_from_compact(low, guid, up, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            hires_from_compact(low, guid, up, **kw)
        torch.cuda.synchronize()
        out[name] = round(batch * iters / (time.perf_counter() - t), 1)
    return out


def implicit_modes(steps: int = 10, size: int = 224, preset: str = "lite") -> dict[str, Any]:
    """Implicit features as an array vs as a function: bytes per image (layout and on disk) and render time."""
    import dataclasses

    import torch
    import zarr

    import featup_ops
    from featup_ops.config import IMPLICIT_PRESETS
    from featup_ops.implicit_fit import fit_implicit_functions
    from featup_ops.implicit_function import function_layout
    from pipeline.io.decode import decode_image, normalize
    from pipeline.store import FeatureStoreSchema
    from pipeline.store.foreign import array_kwargs

    cfg = IMPLICIT_PRESETS[preset]
    out: dict[str, Any] = {"preset": preset, "size": size, "dtype": "float16", "layout": []}
    guidance = size * size * 3
    for channels in (384, 320):
        lay = function_layout(cfg, min(cfg.proj_dim, channels), channels)
        array = channels * size * size * 2
        out["layout"].append({"channels": channels, "array_bytes": array, "function_floats": lay.size,
                              "function_bytes": lay.size * 4 + guidance, "network_bytes": (lay.size - lay.k * channels
                              - channels) * 4, "basis_bytes": (lay.k + 1) * channels * 4, "guidance_bytes": guidance,
                              "ratio": round(array / (lay.size * 4 + guidance), 1)})
    photo = sorted((REPO / "pipeline" / "samples").glob("*.jpg"))[0]
    pixels = decode_image(photo.read_bytes(), size=(size, size), policy="crop").pixels[None]
    backbone = featup_ops.load_backbone("efficientnet_lite0", "random").eval()
    images = normalize(pixels, backbone.mean, backbone.std)
    fns = fit_implicit_functions(images, backbone, cfg=dataclasses.replace(cfg, steps=steps, early_stop=False))
    feats = fns.render(images, (size, size)).half()
    c = int(feats.shape[1])
    schema = FeatureStoreSchema(n_rows=1, channels=c, lowres_size=(size // 32, size // 32), output_size=(size, size))
    specs = schema.implicit_arrays((size, size), store_as="both", function_size=fns.layout.size,
                                   input_size=(size, size))
    values = {"implicit": feats.numpy(), "implicit_params": fns.params.numpy(), "guidance": pixels}
    with tempfile.TemporaryDirectory() as tmp:
        g = zarr.open_group(tmp, mode="w")
        disk = {}
        for name, value in values.items():
            g.create_array(name, **array_kwargs(name, specs[name].create_kwargs(), feature_dtype="float16"))
            g[name][:] = value
            disk[name] = sum(p.stat().st_size for p in (Path(tmp) / name).rglob("*") if p.is_file())
    out["disk"] = {"photo": photo.name, "channels": c, "array_bytes": disk["implicit"],
                   "function_bytes": disk["implicit_params"] + disk["guidance"],
                   "params_bytes": disk["implicit_params"],
                   "guidance_bytes": disk["guidance"],
                   "ratio": round(disk["implicit"] / (disk["implicit_params"] + disk["guidance"]), 1)}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out["render_s_per_image"] = {}
    for dev in devices:
        x = images.to(dev)
        fns.render(x, (size, size))  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        reps = 3 if dev == "cpu" else 20
        for _ in range(reps):
            fns.render(x, (size, size))
        if dev == "cuda":
            torch.cuda.synchronize()
        out["render_s_per_image"][dev] = round((time.perf_counter() - t) / reps, 4)
    out["torch_threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--gpu-only", action="store_true", help="only the GPU section (no Ray needed)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--implicit-only", action="store_true", help="only section 5 (implicit function vs array)")
    p.add_argument("--implicit-steps", type=int, default=10, help="fit steps of section 5's photo")
    p.add_argument("--rows-per-shard", type=int, default=16,
                   help="images per work unit in section 2, all three plans alike (default 16: a 2.9 MB on-read "
                        "shard; the job's own on-read default is ~64 MiB, 4 makes the per-write cost dominate)")
    args = p.parse_args(argv)
    res: dict[str, Any] = {}
    if args.implicit_only:
        res["implicit"] = implicit_modes(args.implicit_steps)
        print("implicit function vs array:", json.dumps(res["implicit"]), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2))
        return res
    if not args.gpu_only:
        res["bytes_per_image"] = bytes_per_image()
        for r in res["bytes_per_image"]:
            print(f"bytes/image {r['channels']}ch 224^2 fp16: materialized {r['materialized_bytes']:,} vs on-read "
                  f"{r['on_read_bytes']:,} ({r['ratio']}x)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            f = featurize_modes(Path(tmp), args.images, rows_per_shard=args.rows_per_shard)
            res["featurize"] = {k: ({kk: vv for kk, vv in v.items() if kk != "store"} if isinstance(v, dict) else v)
                                for k, v in f.items()}
            print("featurize (CPU, Ray plan):", json.dumps(res["featurize"]), flush=True)
            res["loader_images_per_s"] = loader_reads({m: f[m]["store"] for m in ("materialized", "on-read")})
            print("loader read (CPU):", json.dumps(res["loader_images_per_s"]), flush=True)
    res["gpu_on_read"] = gpu_on_read()
    print("GPU on-read:", json.dumps(res["gpu_on_read"]) if res["gpu_on_read"] else "unmeasured (no CUDA here)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
