"""Implicit upsampler quality and cost: multi-view reconstruction error vs the JBU upsampler and bilinear.

On held-out sample photos with the real pretrained EfficientNet-Lite0 backbone, every method's high-res features
are scored the same way (``featup_ops.multiview.reconstruction_error``): the same fixed jittered views (drawn with
a seed the fits never use; the first is the identity), the same fixed box downsampler, relative squared error.
Methods: bilinear, the JBU upsampler (the fixed joint bilateral ``BilateralUpsampler`` by default, or a trained
checkpoint with ``--upsampler``), and implicit features fitted with each preset of ``--presets`` (default "fast"
and "lite"), all in the same run on the same photos. Errors are reported as ratios to the JBU's and bilinear's,
and each preset's CPU seconds per image as a ratio to the "fast" preset's (``cost_vs_fast``).

Cost: seconds per image of each preset (full fits), and of the "paper" preset (FeatUp's 3,000-view bank and
1,200 steps). The paper preset takes minutes per image on a CPU, so by default it is *extrapolated*: two truncated
fits of the first image (the same ``--paper-views`` bank, ``--paper-steps`` A and B steps) give the cost per step
(difference / step difference) and per bank view (the rest, overheads included, divided by the views), and
``paper = 3000 * per_view + 1200 * per_step``. ``--paper-full`` runs the real thing instead (and scores it).
Wall seconds and process CPU seconds are both reported: on a shared machine the CPU seconds are the steadier
measure of the work.

    python benchmarks/implicit_quality.py                      # CPU, a few minutes
    python benchmarks/implicit_quality.py --presets lite fast --skip-paper --threads 2
    python benchmarks/implicit_quality.py --size 224 --images bird_left plant skate --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Held-out photos: none of them is used to fit anything but its own implicit network (the default JBU is not
#: trained; pass photos a checkpoint never saw with ``--upsampler``).
DEFAULT_IMAGES = ("plant", "skate")
#: Validation views per image (identity + jittered), drawn with :data:`VIEW_SEED`, which no fit uses.
DEFAULT_VIEWS = 4
#: Default input side on CPU: a fast fit at 224 px costs ~10 CPU-minutes per image here (2 cores), 128 px ~4x less;
#: the lowres grid is then 4x4 EfficientNet cells, each upsampled 32x.
CPU_SIZE = 128
VIEW_SEED = 1234
FIT_SEED = 0


class _Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> "_Clock":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), help="sample photo names (pipeline/samples)")
    p.add_argument("--size", type=int, default=None,
                   help="input side (crop), a multiple of 32 (default: 224 on CUDA, 128 on CPU)")
    p.add_argument("--views", type=int, default=DEFAULT_VIEWS, help="validation views per image")
    p.add_argument("--upsampler", default=None, help="JBU checkpoint (default: the fixed BilateralUpsampler)")
    p.add_argument("--paper-steps", type=int, nargs=2, default=(2, 6), metavar=("A", "B"),
                   help="steps of the two truncated paper fits used to extrapolate its cost")
    p.add_argument("--paper-views", type=int, default=32, help="view bank of the truncated paper fits")
    p.add_argument("--paper-full", action="store_true", help="run and score the full paper preset (slow on CPU)")
    p.add_argument("--skip-paper", action="store_true", help="no paper-preset timing (quality and fast cost only)")
    p.add_argument("--presets", nargs="+", default=["lite", "fast"],
                   help="implicit presets fitted and scored side by side, in this order per photo")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    import featup_ops
    from featup_ops.config import IMPLICIT_PRESETS
    from featup_ops.multiview import fixed_views, reconstruction_error
    from pipeline.io.decode import decode_image, normalize

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.size is None:
        args.size = 224 if dev.type == "cuda" else CPU_SIZE
    backbone = featup_ops.load_backbone("efficientnet_lite0").to(dev)
    if args.upsampler:
        jbu = featup_ops.load_upsampler(args.upsampler).to(dev).eval()
        jbu_name = f"JBU checkpoint {args.upsampler}"
    else:
        jbu = featup_ops.BilateralUpsampler().to(dev).eval()
        jbu_name = "JBU (fixed joint bilateral, no checkpoint)"
    bilinear = featup_ops.BilinearUpsampler()
    size = (args.size, args.size)
    views = fixed_views(args.views, size, IMPLICIT_PRESETS["fast"].jitter, seed=VIEW_SEED)

    rows = []
    for name in args.images:
        path = REPO / "pipeline" / "samples" / f"{Path(name).stem}.jpg"
        pixels = decode_image(path.read_bytes(), size=size, policy="crop").pixels
        x = normalize(pixels[None].copy(), backbone.mean, backbone.std).to(dev)
        with torch.no_grad():
            low = backbone(x)
            hr = {"bilinear": bilinear(low, x), "jbu": jbu(low, x)}
        row: dict = {"image": path.stem}
        for preset in args.presets:
            info: dict = {}
            with _Clock() as clock:
                hr[f"implicit_{preset}"] = featup_ops.fit_implicit(x, backbone, cfg=preset, seed=FIT_SEED, info=info)
            row.update({f"{preset}_wall_s": round(clock.wall, 2), f"{preset}_cpu_s": round(clock.cpu, 2),
                        f"{preset}_steps": info["steps"][0]})
            print(json.dumps({"image": path.stem, "preset": preset, "wall_s": round(clock.wall, 2),
                              "cpu_s": round(clock.cpu, 2), "steps": info["steps"][0]}), flush=True)
        if args.paper_full:
            with _Clock() as pc:
                hr["implicit_paper"] = featup_ops.fit_implicit(x, backbone, cfg="paper", seed=FIT_SEED)
            row["paper_wall_s"], row["paper_cpu_s"] = round(pc.wall, 2), round(pc.cpu, 2)
        for method, feats in hr.items():
            row[f"err_{method}"] = float(reconstruction_error(feats, x, backbone, views)[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not (args.paper_full or args.skip_paper):
        print("timing truncated paper-preset fits...", flush=True)

    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in rows[0] if k.startswith("err_")}
    ratios: dict = {"jbu / bilinear": mean["err_jbu"] / mean["err_bilinear"]}
    cost: dict = {}
    for preset in args.presets:
        m = mean[f"err_implicit_{preset}"]
        ratios[f"implicit_{preset} / jbu"] = m / mean["err_jbu"]
        ratios[f"implicit_{preset} / bilinear"] = m / mean["err_bilinear"]
        cost[preset] = {kind: sum(r[f"{preset}_{kind}_s"] for r in rows) / n for kind in ("wall", "cpu")}
    out: dict = {
        "backbone": "efficientnet_lite0 (packaged ImageNet weights)",
        "jbu": jbu_name,
        "size": args.size,
        "views": args.views,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "presets": list(args.presets),
        "per_image": rows,
        "mean_error": mean,
        "ratios": ratios,
        "s_per_img": cost,
    }
    if "fast" in cost:
        out["fast_s_per_img"] = cost["fast"]
        out["cost_vs_fast"] = {
            p: {kind: cost["fast"][kind] / max(c[kind], 1e-9) for kind in ("wall", "cpu")} for p, c in cost.items()
        }
    if args.paper_full:
        out["ratios"]["implicit_paper / jbu"] = mean["err_implicit_paper"] / mean["err_jbu"]
        out["paper_s_per_img"] = {
            "wall": sum(r["paper_wall_s"] for r in rows) / n, "cpu": sum(r["paper_cpu_s"] for r in rows) / n,
            "how": "measured (full paper preset)",
        }
    elif not args.skip_paper:
        out["paper_s_per_img"] = _extrapolate_paper(args, backbone, dev, size)
    if "paper_s_per_img" in out and "fast_s_per_img" in out:
        for kind in ("wall", "cpu"):
            out.setdefault("speedup_fast_vs_paper", {})[kind] = (
                out["paper_s_per_img"][kind] / out["fast_s_per_img"][kind]
            )
    print(json.dumps(out, indent=2))
    _summary(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _extrapolate_paper(args: argparse.Namespace, backbone, dev, size) -> dict:
    """Paper-preset seconds per image from two truncated fits of the first image (see the module docstring)."""
    import featup_ops
    from featup_ops.config import IMPLICIT_PRESETS
    from pipeline.io.decode import decode_image, normalize

    paper = IMPLICIT_PRESETS["paper"]
    path = REPO / "pipeline" / "samples" / f"{Path(args.images[0]).stem}.jpg"
    pixels = decode_image(path.read_bytes(), size=size, policy="crop").pixels
    x = normalize(pixels[None].copy(), backbone.mean, backbone.std).to(dev)
    a, b = args.paper_steps
    views = min(args.paper_views, paper.n_views)
    t = {}
    for steps in (a, b):
        cfg = dataclasses.replace(paper, steps=steps, n_views=views, pca_views=min(paper.pca_views, views))
        with _Clock() as clock:
            featup_ops.fit_implicit(x, backbone, cfg=cfg, seed=FIT_SEED)
        t[steps] = clock
    res = {"how": f"extrapolated from {a}- and {b}-step fits with a {views}-view bank"}
    for kind in ("wall", "cpu"):
        ta, tb = getattr(t[a], kind), getattr(t[b], kind)
        per_step = max(tb - ta, 0.0) / (b - a)
        per_view = max(ta - a * per_step, 0.0) / views
        res[kind] = paper.n_views * per_view + paper.steps * per_step
        res[f"{kind}_per_step"] = per_step
        res[f"{kind}_per_view"] = per_view
    return res


def _summary(out: dict) -> None:
    r = out["ratios"]
    print(
        f"\n{out['device']} ({out['torch_threads']} threads), {out['size']} px, efficientnet_lite0, "
        f"{len(out['per_image'])} images, {out['views']} views; JBU/bilinear {r['jbu / bilinear']:.3f}"
    )
    for p, c in out["s_per_img"].items():
        line = (f"  {p:>6}: error implicit/JBU {r[f'implicit_{p} / jbu']:.3f}, implicit/bilinear "
                f"{r[f'implicit_{p} / bilinear']:.3f}; s/img {c['wall']:.1f} wall ({c['cpu']:.1f} CPU)")
        if "cost_vs_fast" in out:
            v = out["cost_vs_fast"][p]
            line += f"; fast/this {v['cpu']:.2f}x CPU-s, {v['wall']:.2f}x wall"
        print(line)
    if "paper_s_per_img" in out and "fast_s_per_img" in out:
        pp = out["paper_s_per_img"]
        print(
            f"s/img paper {pp['wall']:.1f} wall ({pp['cpu']:.1f} CPU; {pp['how']}); paper/fast "
            f"{out['speedup_fast_vs_paper']['wall']:.1f}x wall, {out['speedup_fast_vs_paper']['cpu']:.1f}x CPU"
        )


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
