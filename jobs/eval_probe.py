"""Linear-probe evaluation of feature stores: the protocol the recent upsampler papers share (frozen features,
1x1 conv probe, AdamW, cosine schedule stepped per optimizer step, mIoU and pixel accuracy; depth: RMSE, delta1).

    # bilinear vs JBU vs implicit on the same images (split by image id, identical for every store)
    python jobs/eval_probe.py --store bilinear=out/bilinear.zarr --store jbu=out/jbu.zarr \
        --store implicit=out/jbu.zarr:implicit --labels /data/cocostuff/stuffthingmaps/val2017 \
        --label-kind coco-stuff-27 --epochs 5 --seeds 0 1 2 --out results.json
    # feature preservation: train on low-res features, score the same probe on the upsampled ones
    python jobs/eval_probe.py --store jbu=out/jbu.zarr --labels ... --preservation
    # separate train and val stores, probes as Ray tasks (one GPU each when the cluster has GPUs)
    python jobs/eval_probe.py --store jbu=s3://b/train.zarr --val-store jbu=s3://b/val.zarr --labels ... --ray

A store is ``NAME=URI`` or ``NAME=URI:ARRAY`` (array ``hires`` by default, ``implicit`` for implicit features).
Stores are compared on the image ids complete in all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python jobs/eval_probe.py` without installing the package
    sys.path.insert(0, str(REPO))

from pipeline.cli import init_ray, json_object, run_job  # noqa: E402
from pipeline.evaluate.labels import LabelSource  # noqa: E402
from pipeline.evaluate.probe import ProbeConfig, ProbeRun, run_probe, split_ids, summarize  # noqa: E402


def _store_arg(text: str) -> tuple[str, str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--store {text!r}: expected NAME=URI or NAME=URI:ARRAY")
    name, uri = text.split("=", 1)
    array = "hires"
    head, _, tail = uri.rpartition(":")
    if head and tail in ("hires", "lowres", "implicit"):
        uri, array = head, tail
    return name, uri, array


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ProbeConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=_store_arg, action="append", required=True, help="NAME=URI[:ARRAY], repeatable")
    p.add_argument("--val-store", type=_store_arg, action="append", default=[],
                   help="NAME=URI[:ARRAY] scored instead of a split of --store (same NAMEs)")
    p.add_argument("--val-fraction", type=float, default=0.3, help="share of image ids held out when no --val-store")
    p.add_argument("--labels", required=True, help="folder or s3:// prefix of label PNGs (or depth PNGs)")
    p.add_argument("--label-kind", default="coco-stuff-27", choices=["coco-stuff-27", "coco-stuff-171", "folder",
                                                                      "depth"])
    p.add_argument("--label-suffix", default=".png", help="file name ending after the image id's stem")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a 'folder' label set (VOC 21, ADE 151)")
    p.add_argument("--reduce-zero-label", action="store_true", help="ADE20K 150-class convention (0 -> ignore)")
    p.add_argument("--depth-scale", type=float, default=1e-3, help="depth units per PNG integer (depth kind)")
    p.add_argument("--preservation", action="store_true",
                   help="also train on each store's lowres and score on its array (feature-preservation test)")
    p.add_argument("--channels", type=int, default=None, help="use the first k channels (e.g. of a PCA store)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per probe")
    p.add_argument("--ray", action="store_true", help="run each probe as a Ray task (num_gpus=1 when GPUs exist)")
    p.add_argument("--out", default=None, help="write all results and the summary as JSON here")
    p.add_argument("--storage-options", type=json_object, default=None,
                   help='fsspec options as JSON for the stores and labels, e.g. \'{"anon": true}\'')
    args = p.parse_args(argv)
    if args.label_kind == "folder" and not args.num_classes:
        p.error("--label-kind folder needs --num-classes (e.g. 21 for VOC, 151 for ADE20K)")
    return args


def build_runs(args: argparse.Namespace) -> list[ProbeRun]:
    """One ProbeRun per (store, seed[, preservation]) on the image ids complete in every store."""
    from pipeline.read.dataset import complete_image_ids

    labels = LabelSource(args.labels, args.label_kind, suffix=args.label_suffix, num_classes=args.num_classes,
                         reduce_zero_label=args.reduce_zero_label, depth_scale=args.depth_scale,
                         storage_options=args.storage_options)
    task = "depth" if args.label_kind == "depth" else "segmentation"
    val_by_name = {name: (uri, array) for name, uri, array in args.val_store}
    missing = [n for n, _, _ in args.store if args.val_store and n not in val_by_name]
    if missing:
        raise SystemExit(f"--val-store missing for {', '.join(missing)}; give one per --store name")

    def common(pairs: list[tuple[str, str]]) -> set[str]:
        so = args.storage_options
        sets = [set(complete_image_ids(uri, array, storage_options=so)) for uri, array in pairs]
        if args.preservation:
            sets += [set(complete_image_ids(uri, "lowres", storage_options=so)) for uri, _ in pairs]
        return set.intersection(*sets)

    train_common = common([(u, a) for _, u, a in args.store])
    if args.val_store:
        train_ids, val_ids = sorted(train_common), sorted(common(list(val_by_name.values())))
    else:
        train_ids, val_ids = split_ids(train_common, args.val_fraction)
    runs = []
    for name, uri, array in args.store:
        val_uri, val_array = val_by_name.get(name, (uri, array))
        modes = [None, "lowres"] if args.preservation else [None]
        for train_array in modes:
            for seed in args.seeds:
                cfg = ProbeConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=seed)
                runs.append(ProbeRun(name=name, train_store=uri, val_store=val_uri, train_ids=tuple(train_ids),
                                     val_ids=tuple(val_ids), labels=labels, array=val_array, train_array=train_array,
                                     task=task, cfg=cfg, batch_size=args.batch_size, num_workers=args.workers,
                                     channels=args.channels, storage_options=args.storage_options))
    return runs


def execute(runs: list[ProbeRun], use_ray: bool) -> list[dict]:
    if not use_ray:
        return [run_probe(r) for r in runs]
    import ray

    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(run_probe)
    return ray.get([task.remote(r) for r in runs])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any Ray process starts
    args = parse_args(argv)
    return run_job("eval_probe", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    runs = build_runs(args)
    print(f"{len(runs)} probe runs; {len(runs[0].train_ids)} train / {len(runs[0].val_ids)} val images", flush=True)
    results = execute(runs, args.ray)
    for r in results:
        print(json.dumps(r), flush=True)
    summary = summarize(results)
    print("\nname            trained on -> scored on   " + ("mIoU     pixel acc" if runs[0].task != "depth"
                                                          else "RMSE     delta1"))
    for s in summary:
        a, b = ("miou", "pixel_accuracy") if "miou" in s else ("rmse", "delta1")
        print(f"{s['name']:<15s} {s['train_array']:>10s} -> {s['array']:<9s} "
              f"{s[a]:.4f}±{s[a + '_std']:.4f}  {s[b]:.4f}±{s[b + '_std']:.4f}  ({s['seeds']} seeds)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
