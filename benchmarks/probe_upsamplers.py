"""Segmentation probe of upsamplers under several probe protocols: which high-res features does a linear model use
best, whichever way the probe is trained? All upsamplers in one run, on the same pixels.

Real EfficientNet-Lite0 features (packaged ImageNet weights) of 224 px scenes composed offline
(``benchmarks/probe_scenes.py``: Voronoi mosaics of regions from six scikit-image / scikit-learn photos, class =
source photo; the probe trains on scenes from the photos' first halves and is scored on scenes from their second
halves; the shipped JBU never saw any of these photos). Each upsampler brings the 7x7 features to 224x224; for every
protocol of ``pipeline.evaluate.probe.PROTOCOLS`` (the code ``jobs/eval_probe.py`` runs on stores) and probe seed a
linear probe is trained and scored at full resolution:

* ``adamw-raw``: 1x1 conv, AdamW 2e-3 (weight decay 1e-5), cosine per step, flips, 10 epochs, batches of 4 scenes,
  raw features (the probe this benchmark ran alone until 2026-12);
* ``adamw-std``: the same on features standardised per channel with the training scenes' mean and std;
* ``lbfgs-std``: full-batch L-BFGS (strong Wolfe) to convergence on 32768 sampled training pixels (1024 per scene),
  standardised, loss = mean cross-entropy + 1e-4 / 2 * ||W||^2 (weights only), stop at max |grad| <= 1e-6 or 2000
  iterations;
* ``lbfgs-raw``: the same on raw features.

Every upsampler sees the same batches, flips and initialisation (AdamW) and the same pixel sample (L-BFGS) for a
given probe seed. Scores: mIoU and pixel accuracy over all test pixels and over the boundary band (test pixels
within 8 px of a region border), mean and sample std over probe seeds, and the per-seed differences to bilinear
(mean ± std).

    python benchmarks/probe_upsamplers.py --threads 1                  # bilinear, untrained JBU, shipped JBU
    python benchmarks/probe_upsamplers.py --upsampler s300=runs/x/checkpoint_000300 --json out.json
    python benchmarks/probe_upsamplers.py --upsampler bilateral=bilateral --protocol lbfgs-std --seeds 0
    python benchmarks/probe_upsamplers.py --sweep-bilateral            # also a grid of bilateral sigmas (seed 0)
    python benchmarks/probe_upsamplers.py --implicit-scenes 2          # + the implicit upsampler (CPU: minutes/scene)
    python benchmarks/probe_upsamplers.py --write-scenes out/probe     # scenes + label PNGs for the store jobs

``--upsampler NAME=SPEC`` (repeatable; ``--checkpoint NAME=PATH`` is an alias): SPEC ``bilinear``, ``bilateral``
(``BilateralUpsampler()``) and ``jbu-untrained`` (``torch.manual_seed(0); JBUUpsampler()``) are built here; any other
SPEC goes to ``featup_ops.load_upsampler(SPEC)`` unchanged (a checkpoint folder, a FeatUp ``.ckpt``, or whatever
specs it takes). Without ``--upsampler``: bilinear, the untrained JBU (a control) and the JBU checkpoint shipped in
the package (``featup_ops/pretrained/jbu_lite0``). Bilinear is always the first row and the reference of the
differences.

The same protocols through the store jobs (``--write-scenes`` first; one store per split and upsampler):
``jobs/featurize.py --input out/probe/train --output out/probe/train_jbu.zarr --input-size 224 --output-size 224``
(and ``--input out/probe/test``), then ``jobs/eval_probe.py --store jbu=out/probe/train_jbu.zarr --val-store
jbu=out/probe/test_jbu.zarr --labels out/probe/labels --label-kind folder --num-classes 6 --seeds 0 1 2
--epochs 10 --protocol all``.
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
from torch.utils.data import DataLoader  # noqa: E402

import featup_ops  # noqa: E402
from featup_ops.config import DEFAULT_IMPLICIT_PRESET  # noqa: E402
from benchmarks.probe_scenes import PROBE_PHOTOS, load_photos, make_scenes, write_scene_folders  # noqa: E402
from pipeline.evaluate.probe import (  # noqa: E402
    BOUNDARY_PX,
    PROTOCOLS,
    LBFGSConfig,
    ProbeConfig,
    evaluate_segmentation_probe,
    evaluate_segmentation_probes,
    train_protocol_probe,
    train_segmentation_probe,
)

#: bilateral sigmas tried by --sweep-bilateral: (sigma_spatial, sigma_range)
BILATERAL_GRID = [(1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.5, 2.0)]

#: scores reported per protocol (keys of a probe result), in table order
METRICS = ("miou", "acc", "bmiou", "bacc")

#: images per probe batch (AdamW) and per scoring batch
BATCH = 4


class _Features:
    """Scenes' float16 features and labels in memory, served as probe batches ``{"features": (B, C, S, S) float32,
    "label": (B, S, S) int64, "image_id": [str]}`` (``image_id`` keys the L-BFGS pixel sample)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        self.feats, self.labels, self.split = feats, labels, split

    def __len__(self) -> int:
        return len(self.feats)

    def batch(self, index: list[int]) -> dict[str, Any]:
        """The batch of scenes ``index``: float32 features written once (no per-item copies, no stacking copy)."""
        out = torch.empty((len(index), *self.feats.shape[1:]), dtype=torch.float32)
        for j, i in enumerate(index):
            out[j].copy_(self.feats[i])
        return {"features": out, "label": self.labels[index], "image_id": [f"{self.split}_{i:04d}" for i in index]}

    def loader(self, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches of :data:`BATCH` scenes; ``shuffle``: the order ``DataLoader(shuffle=True)`` draws with a
        generator seeded by ``seed`` (the same for every upsampler)."""
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(range(len(self)), batch_size=BATCH, shuffle=shuffle, generator=gen, collate_fn=self.batch)


def _normalise(images: np.ndarray, backbone: Any) -> torch.Tensor:
    """``(N, S, S, 3) uint8 -> (N, 3, S, S) float32`` normalised with the backbone's mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _upsample(up: Any, low: torch.Tensor, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``(N, C, h, w)`` low-res + ``(N, 3, S, S)`` guidance -> ``(N, C, S, S)`` float16, contiguous (the backbone's
    features come channels-last and bilinear keeps that layout: copying scenes out of it ran 4x slower)."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return torch.cat([up(low[i : i + batch], x[i : i + batch], size).half().contiguous()
                      for i in range(0, len(low), batch)])


def _train(train: _Features, k: int, protocol: str, seed: int, epochs: int, lbfgs: LBFGSConfig) -> tuple[Any, dict]:
    """Train one probe with ``protocol`` and probe ``seed``; returns it and its fit record (CPU and wall seconds,
    L-BFGS iterations / convergence)."""
    t0, c0 = time.perf_counter(), time.process_time()
    probe, info = train_protocol_probe(protocol, lambda shuffle: train.loader(shuffle, seed), k, images=len(train),
                                       cfg=ProbeConfig(epochs=epochs, seed=seed), lbfgs=lbfgs,
                                       in_channels=int(train.feats.shape[1]))
    info = {key: v for key, v in info.items() if key != "protocol"}
    return probe, {**info, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def _score(name: str, up: Any, data: dict, seeds: list[int], epochs: int, protocols: list[str],
           lbfgs: LBFGSConfig) -> dict[str, Any]:
    """One row: the upsampler's features, every protocol x seed probe trained on them, all scored in one pass over
    the test scenes (full and boundary mIoU / accuracy, percent)."""
    t0, c0 = time.perf_counter(), time.process_time()
    train = _Features(_upsample(up, data["low_train"], data["x_train"]), data["y_train"], "train")
    test = _Features(_upsample(up, data["low_test"], data["x_test"]), data["y_test"], "test")
    row: dict[str, Any] = {"name": name, "config": up.config_dict(),
                           "checkpoint_hash": getattr(up, "checkpoint_hash", None),
                           "upsample_seconds": time.perf_counter() - t0,
                           "upsample_cpu_seconds": time.process_time() - c0, "protocols": {}}
    probes, fits = {}, {}
    for proto in protocols:
        for s in seeds:
            probes[proto, s], fits[proto, s] = _train(train, data["k"], proto, s, epochs, lbfgs)
    c1 = time.process_time()
    scores = evaluate_segmentation_probes(probes, test.loader(), data["k"], boundary_px=BOUNDARY_PX)
    row["score_cpu_seconds"] = time.process_time() - c1
    for proto in protocols:
        runs = []
        for s in seeds:
            m = scores[proto, s]
            runs.append({"seed": s, "miou": 100 * m.miou, "acc": 100 * m.pixel_accuracy,
                         "bmiou": 100 * m.boundary_miou, "bacc": 100 * m.boundary_pixel_accuracy, **fits[proto, s]})
        cell: dict[str, Any] = {"seeds": runs}
        for m in METRICS:
            vals = [r[m] for r in runs]
            cell[m], cell[m + "_std"] = statistics.fmean(vals), _std(vals)
        if "converged" in runs[0]:
            cell["converged"] = all(r["converged"] for r in runs)
            cell["iterations"] = [r["iterations"] for r in runs]
        row["protocols"][proto] = cell
        print(f"  {name:<26s} {proto:<9s} mIoU {cell['miou']:5.1f} ± {cell['miou_std']:.1f}  boundary "
              f"{cell['bmiou']:5.1f}  " + (f"L-BFGS iterations {cell['iterations']} converged {cell['converged']}  "
                                          if "converged" in cell else "")
              + f"(training {sum(r['cpu_seconds'] for r in runs):.0f} s CPU)", flush=True)
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {name:<26s} upsampling {row['upsample_cpu_seconds']:.0f} s CPU, scoring {row['score_cpu_seconds']:.0f} s "
          f"CPU; row {row['cpu_seconds']:.0f} s CPU, {row['seconds']:.0f} s wall", flush=True)
    return row


def _std(vals: list[float]) -> float:
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def _add_deltas(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Per-seed differences to ``base`` (bilinear) per protocol and metric: ``d_<metric>`` (mean), ``d_<metric>_std``,
    ``d_<metric>_seeds``."""
    for row in rows:
        for proto, cell in row["protocols"].items():
            ref = base["protocols"].get(proto)
            if ref is None or len(ref["seeds"]) != len(cell["seeds"]):
                continue
            for m in METRICS:
                d = [a[m] - b[m] for a, b in zip(cell["seeds"], ref["seeds"])]
                cell["d_" + m], cell["d_" + m + "_std"], cell["d_" + m + "_seeds"] = statistics.fmean(d), _std(d), d


def _print_tables(rows: list[dict[str, Any]], protocols: list[str], seeds: list[int]) -> None:
    for proto in protocols:
        print(f"\nprotocol {proto}: {PROTOCOLS[proto].description}; probe seeds {seeds}; mean ± std over seeds; "
              f"d = minus bilinear, per seed, mean ± std; boundary = test pixels within {BOUNDARY_PX} px of a border")
        print(f"{'upsampler':<28s} {'mIoU':>11s} {'d mIoU':>11s} {'(per seed)':<20s} {'acc':>5s} {'d acc':>6s} "
              f"{'bnd mIoU':>9s} {'d bnd':>11s} {'bnd acc':>7s} {'d':>6s}")
        for row in rows:
            c = row["protocols"].get(proto)
            if c is None or "d_miou" not in c:
                continue
            per = " / ".join(f"{v:+.1f}" for v in c["d_miou_seeds"])
            print(f"{row['name']:<28s} {c['miou']:5.1f} ± {c['miou_std']:3.1f} {c['d_miou']:+5.1f} ± "
                  f"{c['d_miou_std']:3.1f} {per:<20s} {c['acc']:5.1f} {c['d_acc']:+6.1f} {c['bmiou']:9.1f} "
                  f"{c['d_bmiou']:+5.1f} ± {c['d_bmiou_std']:3.1f} {c['bacc']:7.1f} {c['d_bacc']:+6.1f}")
    print("\nsummary: full mIoU minus bilinear (boundary mIoU minus bilinear), mean over probe seeds; last column: "
          "above bilinear in full mIoU under every protocol?")
    print(f"{'upsampler':<28s} " + " ".join(f"{p:>16s}" for p in protocols) + "  above under all")
    for row in rows[1:]:
        cells, below = [], []
        for p in protocols:
            c = row["protocols"].get(p, {})
            cells.append(f"{c['d_miou']:+5.1f} ({c['d_bmiou']:+5.1f})" if "d_miou" in c else "")
            if "d_miou" in c and c["d_miou"] <= 0:
                below.append(p)
        verdict = "yes" if not below else "no (" + ", ".join(below) + ")"
        print(f"{row['name']:<28s} " + " ".join(f"{cell:>16s}" for cell in cells) + f"  {verdict}")


def _implicit_rows(ups: dict[str, Any], data: dict, backbone: Any, n: int, epochs: int,
                   preset: str = DEFAULT_IMPLICIT_PRESET) -> list[dict[str, Any]]:
    """Probe trained on bilinear features (``adamw-raw``, seed 0), scored on the first n test scenes' features of
    every method including the implicit fit with ``preset`` (fitting it on all training scenes is out of CPU
    reach)."""
    base = ups["bilinear"]
    train = _Features(_upsample(base, data["low_train"], data["x_train"]), data["y_train"], "train")
    cfg = ProbeConfig(epochs=epochs, seed=0)
    probe = train_segmentation_probe(train.loader(True, 0), data["k"], cfg=cfg)
    x, low, y = data["x_test"][:n], data["low_test"][:n], data["y_test"][:n]
    feats = {name: _upsample(up, low, x) for name, up in ups.items()}
    t0 = time.perf_counter()
    feats[f"implicit ({preset})"] = featup_ops.fit_implicit(x, backbone, cfg=preset, seed=0).half()
    fit_s = time.perf_counter() - t0
    rows = []
    for name, f in feats.items():
        m = evaluate_segmentation_probe(probe, _Features(f, y, "test").loader(), data["k"])
        rows.append({"name": name, "miou": 100 * m.miou, "acc": 100 * m.pixel_accuracy,
                     "bmiou": 100 * m.boundary_miou})
    rows.append({"name": "implicit fit seconds per scene", "seconds": fit_s / n})
    return rows


def _builtin(spec: str) -> Any | None:
    """The upsampler of a SPEC built here (bilinear, bilateral, jbu-untrained), else None."""
    if spec == "bilinear":
        return featup_ops.BilinearUpsampler()
    if spec == "bilateral":
        return featup_ops.BilateralUpsampler()
    if spec == "jbu-untrained":
        torch.manual_seed(0)
        return featup_ops.JBUUpsampler()
    return None


def _named_spec(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SPEC (e.g. shipped=featup_ops/pretrained/jbu_lite0)")
    name, spec = text.split("=", 1)
    if not name or not spec:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SPEC with a non-empty name and spec")
    return name, spec


def _default_specs(only_checkpoints: bool) -> list[tuple[str, str]]:
    """The untrained JBU (unless ``only_checkpoints``) and the JBU checkpoint shipped in the package (its folder,
    whatever the current default of EfficientNet-Lite0 is: this benchmark is what judges that default)."""
    from featup_ops.defaults import SHIPPED_JBU

    specs = [] if only_checkpoints else [("JBU untrained", "jbu-untrained")]
    return [*specs, ("trained JBU (shipped)", str(SHIPPED_JBU))]


def _load(spec: str) -> Any:
    up = _builtin(spec)
    return up if up is not None else featup_ops.load_upsampler(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-scenes", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=24)
    p.add_argument("--size", type=int, default=224, help="scene side (a multiple of 32)")
    p.add_argument("--scene-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds")
    p.add_argument("--protocol", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS),
                   help="probe protocols (default: all)")
    p.add_argument("--epochs", type=int, default=10, help="AdamW probe epochs (default 10)")
    p.add_argument("--lbfgs-pixels", type=int, default=LBFGSConfig.pixels,
                   help="L-BFGS training pixels, spread over the training scenes (default %(default)s)")
    p.add_argument("--lbfgs-l2", type=float, default=LBFGSConfig.l2, help="L-BFGS L2 weight (default %(default)s)")
    p.add_argument("--lbfgs-max-iter", type=int, default=LBFGSConfig.max_iter,
                   help="L-BFGS iteration cap (default %(default)s)")
    p.add_argument("--upsampler", "--checkpoint", dest="upsampler", action="append", default=[], type=_named_spec,
                   metavar="NAME=SPEC", help="upsampler to add (repeatable): bilinear, bilateral, jbu-untrained, or "
                   "any featup_ops.load_upsampler spec (checkpoint folder, FeatUp .ckpt); default: the untrained "
                   "JBU and the shipped one")
    p.add_argument("--only-checkpoints", action="store_true",
                   help="without --upsampler: bilinear and the shipped JBU only (no untrained-JBU control)")
    p.add_argument("--bilateral", type=float, nargs=2, default=None, metavar=("SPATIAL", "RANGE"),
                   help="also a BilateralUpsampler row with these sigmas")
    p.add_argument("--sweep-bilateral", action="store_true", help="probe every BILATERAL_GRID setting (seed 0)")
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
    protocols = list(dict.fromkeys(args.protocol))
    lbfgs = LBFGSConfig(l2=args.lbfgs_l2, max_iter=args.lbfgs_max_iter, pixels=args.lbfgs_pixels)

    t_start, c_start = time.perf_counter(), time.process_time()
    scenes = make_scenes(load_photos(), args.train_scenes, args.test_scenes, args.size, seed=args.scene_seed)
    if args.write_scenes:
        dirs = write_scene_folders(scenes, args.write_scenes)
        print(json.dumps({k: str(v) for k, v in dirs.items()}))
        return 0
    ups: dict[str, Any] = {"bilinear": featup_ops.BilinearUpsampler()}
    if args.bilateral:
        s, r = args.bilateral
        ups[f"bilateral (s={s:g}, r={r:g})"] = featup_ops.BilateralUpsampler(sigma_spatial=s, sigma_range=r)
    specs = args.upsampler or _default_specs(args.only_checkpoints)
    for name, spec in specs:
        if spec != "bilinear":  # bilinear is always the first row
            ups[name] = _load(spec)
    ups = {n: u.eval() for n, u in ups.items()}

    backbone = featup_ops.load_backbone("efficientnet_lite0").eval()
    data: dict[str, Any] = {"k": len(PROBE_PHOTOS)}
    with torch.no_grad():
        for split in ("train", "test"):
            images, labels = scenes[split]
            x = _normalise(images, backbone)
            data[f"x_{split}"] = x
            data[f"low_{split}"] = torch.cat([backbone(x[i : i + 8]) for i in range(0, len(x), 8)])
            data[f"y_{split}"] = torch.from_numpy(labels).long()
    print(f"probe: {args.train_scenes} train / {args.test_scenes} test scenes of {args.size} px (scene seed "
          f"{args.scene_seed}), {len(PROBE_PHOTOS)} classes ({', '.join(PROBE_PHOTOS)}), probe seeds {args.seeds}, "
          f"protocols {protocols}; AdamW {args.epochs} epochs; L-BFGS {lbfgs.to_dict()}; features "
          f"{tuple(data['low_test'].shape[1:])} -> {args.size}; {args.threads} torch thread(s)", flush=True)

    rows = [_score(name, up, data, args.seeds, args.epochs, protocols, lbfgs) for name, up in ups.items()]
    _add_deltas(rows, rows[0])
    _print_tables(rows, protocols, args.seeds)
    if args.sweep_bilateral:
        first = args.seeds[:1]
        print(f"\nbilateral sweep (probe seed {first[0]}):", flush=True)
        sweep = [{**_score(f"sweep bilateral s={s:g} r={r:g}",
                           featup_ops.BilateralUpsampler(sigma_spatial=s, sigma_range=r), data, first, args.epochs,
                           protocols, lbfgs), "sweep": True} for s, r in BILATERAL_GRID]
        base = {**rows[0], "protocols": {p: {**c, "seeds": c["seeds"][:1]} for p, c in rows[0]["protocols"].items()}}
        _add_deltas(sweep, base)
        _print_tables([base, *sweep], protocols, first)
        rows += sweep
    print(f"\ntotal: {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s CPU of this "
          f"process (scenes, features, upsampling, probes; {args.threads} torch thread(s))", flush=True)
    out: dict[str, Any] = {"args": {**vars(args), "upsampler": specs}, "lbfgs": lbfgs.to_dict(),
                           "boundary_px": BOUNDARY_PX, "rows": rows}
    if args.implicit_scenes:
        print(f"\nimplicit: probe trained on bilinear features (adamw-raw, seed 0), scored on {args.implicit_scenes} "
              "test scenes")
        out["implicit"] = _implicit_rows(ups, data, backbone, args.implicit_scenes, args.epochs,
                                         args.implicit_preset)
        for r in out["implicit"]:
            print("  " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{v}" for k, v in r.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
