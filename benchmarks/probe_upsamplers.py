"""Segmentation probe of upsamplers: which high-res features does a linear model use best? All in one run.

Real EfficientNet-Lite0 features (packaged ImageNet weights) of 224 px scenes composed offline
(``benchmarks/probe_scenes.py``: Voronoi mosaics of regions from six scikit-image / scikit-learn photos, class =
source photo; the probe trains on scenes from the photos' first halves and is scored on scenes from their second
halves; the shipped JBU never saw any of these photos). Each upsampler brings the 7x7 features to 224x224; a linear
probe (``pipeline.evaluate.probe``: the same code ``jobs/eval_probe.py`` runs on stores) is trained per upsampler and probe
seed and scored at full resolution. Prints mIoU and pixel accuracy (mean and std over seeds) and their deltas to
bilinear.

    python benchmarks/probe_upsamplers.py --seeds 0                    # ~12 min on a loaded 2-core machine
    python benchmarks/probe_upsamplers.py --sweep-bilateral            # also a grid of bilateral sigmas (seed 0)
    python benchmarks/probe_upsamplers.py --checkpoint s300=runs/x/checkpoint_000300 --json out.json
    python benchmarks/probe_upsamplers.py --implicit-scenes 2          # + the implicit upsampler (CPU: minutes/scene)
    python benchmarks/probe_upsamplers.py --write-scenes out/probe     # scenes + label PNGs for the store jobs

The same protocol through the store jobs (``--write-scenes`` first; one store per split and upsampler):
``jobs/featurize.py --input out/probe/train --output out/probe/train_jbu.zarr --input-size 224 --output-size 224``
(and ``--input out/probe/test``), then ``jobs/eval_probe.py --store jbu=out/probe/train_jbu.zarr --val-store
jbu=out/probe/test_jbu.zarr --labels out/probe/labels --label-kind folder --num-classes 6 --seeds 0 1 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import featup_ops  # noqa: E402
from featup_ops.config import DEFAULT_IMPLICIT_PRESET  # noqa: E402
from benchmarks.probe_scenes import PROBE_PHOTOS, load_photos, make_scenes, write_scene_folders  # noqa: E402
from pipeline.evaluate.probe import ProbeConfig, evaluate_segmentation_probe, train_segmentation_probe  # noqa: E402

#: bilateral sigmas tried by --sweep-bilateral: (sigma_spatial, sigma_range)
BILATERAL_GRID = [(1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.5, 2.0)]


class _Features(Dataset):
    """Items ``{"features": (C, S, S) float32, "label": (S, S) int64}`` from float16 features in memory."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.feats[i].float(), "label": self.labels[i]}


def _normalise(images: np.ndarray, backbone: Any) -> torch.Tensor:
    """``(N, S, S, 3) uint8 -> (N, 3, S, S) float32`` normalised with the backbone's mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _upsample(up: Any, low: torch.Tensor, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``(N, C, h, w)`` low-res + ``(N, 3, S, S)`` guidance -> ``(N, C, S, S)`` float16."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return torch.cat([up(low[i : i + batch], x[i : i + batch], size).half() for i in range(0, len(low), batch)])


def _probe(train: _Features, test: _Features, k: int, seed: int, epochs: int) -> dict[str, float]:
    cfg = ProbeConfig(epochs=epochs, seed=seed)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=4, shuffle=True, generator=g)
    probe = train_segmentation_probe(loader, k, cfg=cfg, in_channels=train.feats.shape[1])
    m = evaluate_segmentation_probe(probe, DataLoader(test, batch_size=4), k)
    return {"miou": 100 * m.miou, "acc": 100 * m.pixel_accuracy}


def _score(name: str, up: Any, data: dict, seeds: list[int], epochs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    train = _Features(_upsample(up, data["low_train"], data["x_train"]), data["y_train"])
    test = _Features(_upsample(up, data["low_test"], data["x_test"]), data["y_test"])
    runs = [_probe(train, test, data["k"], s, epochs) for s in seeds]
    row: dict[str, Any] = {"name": name, "config": up.config_dict(), "seconds": time.perf_counter() - t0}
    for m in ("miou", "acc"):
        vals = [r[m] for r in runs]
        row[m], row[m + "_std"], row[m + "_seeds"] = statistics.fmean(vals), statistics.pstdev(vals), vals
    print(f"  {name:<28s} mIoU {row['miou']:5.1f} ± {row['miou_std']:.1f}  acc {row['acc']:5.1f}  "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def _implicit_rows(ups: dict[str, Any], data: dict, backbone: Any, n: int, epochs: int,
                   preset: str = DEFAULT_IMPLICIT_PRESET) -> list[dict[str, Any]]:
    """Probe trained on bilinear features (seed 0), scored on the first n test scenes' features of every method
    including the implicit fit with ``preset`` (fitting it on all training scenes is out of CPU reach)."""
    base = ups["bilinear"]
    train = _Features(_upsample(base, data["low_train"], data["x_train"]), data["y_train"])
    cfg = ProbeConfig(epochs=epochs, seed=0)
    probe = train_segmentation_probe(DataLoader(train, batch_size=4, shuffle=True,
                                                generator=torch.Generator().manual_seed(0)), data["k"], cfg=cfg)
    x, low, y = data["x_test"][:n], data["low_test"][:n], data["y_test"][:n]
    feats = {name: _upsample(up, low, x) for name, up in ups.items()}
    t0 = time.perf_counter()
    feats[f"implicit ({preset})"] = featup_ops.fit_implicit(x, backbone, cfg=preset, seed=0).half()
    fit_s = time.perf_counter() - t0
    rows = []
    for name, f in feats.items():
        m = evaluate_segmentation_probe(probe, DataLoader(_Features(f, y), batch_size=4), data["k"])
        rows.append({"name": name, "miou": 100 * m.miou, "acc": 100 * m.pixel_accuracy})
    rows.append({"name": "implicit fit seconds per scene", "seconds": fit_s / n})
    return rows


def _packaged_checkpoints() -> dict[str, str]:
    try:
        path = featup_ops.default_upsampler_for("efficientnet_lite0")
    except FileNotFoundError:
        path = None
    return {"trained JBU (shipped)": path} if path else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-scenes", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=24)
    p.add_argument("--size", type=int, default=224, help="scene side (a multiple of 32)")
    p.add_argument("--scene-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds")
    p.add_argument("--epochs", type=int, default=10, help="probe epochs (default 10)")
    p.add_argument("--bilateral", type=float, nargs=2, default=[1.0, 1.0], metavar=("SPATIAL", "RANGE"),
                   help="sigmas of the second bilateral row (default: the best of BILATERAL_GRID measured here)")
    p.add_argument("--sweep-bilateral", action="store_true", help="probe every BILATERAL_GRID setting (seed 0)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="trained upsampler checkpoint to add (repeatable); default: the shipped one")
    p.add_argument("--only-checkpoints", action="store_true", help="skip the fixed upsamplers except bilinear")
    p.add_argument("--implicit-scenes", type=int, default=0,
                   help="also fit the implicit upsampler on this many test scenes (a separate, smaller table)")
    p.add_argument("--implicit-preset", default=DEFAULT_IMPLICIT_PRESET,
                   help="implicit fit preset for --implicit-scenes (default %(default)s)")
    p.add_argument("--write-scenes", default=None, help="write the scenes + label PNGs here and exit")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads ran several times slower)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    scenes = make_scenes(load_photos(), args.train_scenes, args.test_scenes, args.size, seed=args.scene_seed)
    if args.write_scenes:
        dirs = write_scene_folders(scenes, args.write_scenes)
        print(json.dumps({k: str(v) for k, v in dirs.items()}))
        return 0
    backbone = featup_ops.load_backbone("efficientnet_lite0").eval()
    data: dict[str, Any] = {"k": len(PROBE_PHOTOS)}
    with torch.no_grad():
        for split in ("train", "test"):
            images, labels = scenes[split]
            x = _normalise(images, backbone)
            data[f"x_{split}"] = x
            data[f"low_{split}"] = torch.cat([backbone(x[i : i + 8]) for i in range(0, len(x), 8)])
            data[f"y_{split}"] = torch.from_numpy(labels).long()
    print(f"probe: {args.train_scenes} train / {args.test_scenes} test scenes of {args.size} px, "
          f"{len(PROBE_PHOTOS)} classes ({', '.join(PROBE_PHOTOS)}), probe seeds {args.seeds}, "
          f"{args.epochs} epochs; features {tuple(data['low_test'].shape[1:])} -> {args.size}", flush=True)

    ups: dict[str, Any] = {"bilinear": featup_ops.BilinearUpsampler()}
    if not args.only_checkpoints:
        s, r = args.bilateral
        ups["bilateral (defaults)"] = featup_ops.BilateralUpsampler()
        ups[f"bilateral (s={s:g}, r={r:g})"] = featup_ops.BilateralUpsampler(sigma_spatial=s, sigma_range=r)
        torch.manual_seed(0)
        ups["JBU untrained"] = featup_ops.JBUUpsampler()
    ckpts = dict(c.split("=", 1) for c in args.checkpoint) if args.checkpoint else _packaged_checkpoints()
    for name, path in ckpts.items():
        ups[name] = featup_ops.load_upsampler(path)
    ups = {n: u.eval() for n, u in ups.items()}

    rows = [_score(name, up, data, args.seeds, args.epochs) for name, up in ups.items()]
    if args.sweep_bilateral:
        print("bilateral sweep (probe seed 0):", flush=True)
        for s, r in BILATERAL_GRID:
            up = featup_ops.BilateralUpsampler(sigma_spatial=s, sigma_range=r)
            rows.append({**_score(f"sweep bilateral s={s:g} r={r:g}", up, data, [0], args.epochs), "sweep": True})

    base = rows[0]
    print(f"\n{'upsampler':<30s} {'mIoU':>12s} {'d mIoU':>7s} {'acc':>6s} {'d acc':>6s}   (mean ± std over "
          f"probe seeds; d = minus bilinear)")
    for row in rows:
        row["d_miou"], row["d_acc"] = row["miou"] - base["miou"], row["acc"] - base["acc"]
        print(f"{row['name']:<30s} {row['miou']:6.1f} ± {row['miou_std']:3.1f} {row['d_miou']:+7.1f} "
              f"{row['acc']:6.1f} {row['d_acc']:+6.1f}")
    out: dict[str, Any] = {"args": vars(args), "rows": rows}
    if args.implicit_scenes:
        print(f"\nimplicit: probe trained on bilinear features (seed 0), scored on {args.implicit_scenes} test scenes")
        keep = {n: u for n, u in ups.items() if not n.startswith("sweep")}
        out["implicit"] = _implicit_rows(keep, data, backbone, args.implicit_scenes, args.epochs,
                                         args.implicit_preset)
        for r in out["implicit"]:
            print("  " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{v}" for k, v in r.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
