"""The probe job's settings (:class:`EvalProbeConfig`, whose fields are ``jobs/eval_probe.py``'s flags) and the runs
they make: one :class:`pipeline.evaluate.probe.ProbeRun` per (store, protocol, seed[, preservation]) on the image ids
complete in every store."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pipeline.cli import flag
from pipeline.errors import ConfigError
from pipeline.evaluate.probe import DEFAULT_PROTOCOL, PROTOCOLS, LBFGSConfig, ProbeConfig

_RECIPE = ProbeConfig()
_LBFGS = LBFGSConfig()

__all__ = ["EvalProbeConfig", "StoreRef", "store_ref", "build_runs", "execute"]

#: feature arrays a probe can read
PROBE_ARRAYS = ("hires", "lowres", "implicit")


class StoreRef(NamedTuple):
    """``NAME=URI[:ARRAY]``: the features of one store under a name (``array`` ``hires`` by default)."""

    name: str
    uri: str
    array: str = "hires"


def store_ref(text: str) -> StoreRef:
    """Parse ``NAME=URI`` or ``NAME=URI:ARRAY`` (``s3://`` URIs keep their colon)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--store {text!r}: expected NAME=URI or NAME=URI:ARRAY")
    name, uri = text.split("=", 1)
    head, _, tail = uri.rpartition(":")
    if head and tail in PROBE_ARRAYS:
        return StoreRef(name, head, tail)
    return StoreRef(name, uri)


@dataclass(frozen=True)
class EvalProbeConfig:
    """Settings of one probe evaluation; its fields are ``jobs/eval_probe.py``'s flags."""

    store: tuple[StoreRef, ...] = flag(help="NAME=URI[:ARRAY], repeatable", type=store_ref, repeat=True, path="input")
    labels: str = flag(help="folder or s3:// prefix of label PNGs (or depth PNGs)", path="input")
    val_store: tuple[StoreRef, ...] = flag(
        (), "NAME=URI[:ARRAY] scored instead of a split of --store (same NAMEs), repeatable", type=store_ref,
        repeat=True, path="input")
    val_fraction: float = flag(0.3, "share of image ids held out when no --val-store")
    label_kind: Literal["coco-stuff-27", "coco-stuff-171", "folder", "depth"] = flag("coco-stuff-27", "label set")
    label_suffix: str = flag(".png", "file name ending after the image id's stem")
    num_classes: int | None = flag(None, "classes of a 'folder' label set (VOC 21, ADE 151)")
    reduce_zero_label: bool = flag(False, "ADE20K 150-class convention (0 -> ignore)")
    depth_scale: float = flag(1e-3, "depth units per PNG integer (depth kind)")
    preservation: bool = flag(False, "also train on each store's lowres and score on its array "
                                     "(feature-preservation test)")
    channels: int | None = flag(None, "use the first k channels (e.g. of a PCA store)")
    epochs: int = flag(_RECIPE.epochs, "probe training epochs")
    lr: float = flag(_RECIPE.lr, "AdamW learning rate")
    weight_decay: float = flag(_RECIPE.weight_decay, "AdamW weight decay")
    batch_size: int = flag(4, "images per probe step")
    seeds: tuple[int, ...] = flag((0,), "probe seeds; each store is probed once per seed")
    protocol: tuple[str, ...] = flag(
        (DEFAULT_PROTOCOL,), "probe protocols, one or more (or 'all'): adamw-raw = the papers' AdamW probe, adamw-std "
        "= the same on features standardised with training statistics, lbfgs-std / lbfgs-raw = full-batch L-BFGS "
        "to convergence with L2 on the weights (docs/downstream.md)", choices=(*PROTOCOLS, "all"))
    lbfgs_l2: float = flag(_LBFGS.l2, "L-BFGS protocols: L2 weight on the probe weights (loss + l2/2 ||W||^2)")
    lbfgs_max_iter: int = flag(_LBFGS.max_iter, "L-BFGS protocols: iteration cap")
    lbfgs_pixels: int = flag(_LBFGS.pixels, "L-BFGS protocols: training pixels sampled, spread over the images")
    workers: int = flag(0, "DataLoader workers per probe")
    ray: bool = flag(False, "run each probe as a Ray task (num_gpus=1 when GPUs exist)")
    out: str | None = flag(None, "write all results and the summary as JSON here", path="output")
    storage_options: dict[str, Any] | None = flag(
        None, 'fsspec options as JSON for the stores and labels, e.g. \'{"anon": true}\'', compare=False)

    def __post_init__(self) -> None:
        for name in ("store", "val_store", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        protocols = tuple(self.protocol or ())
        if "all" in protocols:
            protocols = tuple(PROTOCOLS)
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise ConfigError(f"--protocol {' '.join(unknown) or '(none)'}: use one or more of "
                              f"{', '.join(PROTOCOLS)} or all")
        object.__setattr__(self, "protocol", tuple(dict.fromkeys(protocols)))
        if self.task == "depth" and any(PROTOCOLS[p].optimizer != "adamw" for p in self.protocol):
            raise ConfigError("--protocol lbfgs-* is for segmentation; depth probes take adamw-raw or adamw-std")
        if not self.store:
            raise ConfigError("give at least one --store NAME=URI[:ARRAY]")
        if self.label_kind == "folder" and not self.num_classes:
            raise ConfigError("--label-kind folder needs --num-classes (e.g. 21 for VOC, 151 for ADE20K)")
        names = {ref.name for ref in self.val_store}
        missing = [ref.name for ref in self.store if self.val_store and ref.name not in names]
        if missing:
            raise ConfigError(f"--val-store missing for {', '.join(missing)}; give one per --store name")
        if not 0 < self.val_fraction < 1 and not self.val_store:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")

    @property
    def task(self) -> str:
        """``depth`` for depth labels, else ``segmentation``."""
        return "depth" if self.label_kind == "depth" else "segmentation"

    @property
    def lbfgs(self) -> LBFGSConfig:
        """The L-BFGS protocols' settings from the ``lbfgs_*`` flags."""
        return LBFGSConfig(l2=self.lbfgs_l2, max_iter=self.lbfgs_max_iter, pixels=self.lbfgs_pixels)


def build_runs(cfg: EvalProbeConfig) -> list[Any]:
    """One :class:`ProbeRun` per (store, protocol, seed[, preservation]) on the image ids complete in every store
    (the split into train and val ids is the same for every store)."""
    from pipeline.evaluate.labels import LabelSource
    from pipeline.evaluate.probe import ProbeRun, split_ids
    from pipeline.read.store_info import complete_image_ids

    labels = LabelSource(cfg.labels, cfg.label_kind, suffix=cfg.label_suffix, num_classes=cfg.num_classes,
                         reduce_zero_label=cfg.reduce_zero_label, depth_scale=cfg.depth_scale,
                         storage_options=cfg.storage_options)
    val_by_name = {ref.name: ref for ref in cfg.val_store}

    def common(refs: list[StoreRef]) -> set[str]:
        so = cfg.storage_options
        sets = [set(complete_image_ids(ref.uri, ref.array, storage_options=so)) for ref in refs]
        if cfg.preservation:
            sets += [set(complete_image_ids(ref.uri, "lowres", storage_options=so)) for ref in refs]
        return set.intersection(*sets)

    train_common = common(list(cfg.store))
    if cfg.val_store:
        train_ids, val_ids = sorted(train_common), sorted(common(list(val_by_name.values())))
    else:
        train_ids, val_ids = split_ids(train_common, cfg.val_fraction)
    runs = []
    lbfgs = cfg.lbfgs
    for ref in cfg.store:
        val = val_by_name.get(ref.name, ref)
        for train_array in ([None, "lowres"] if cfg.preservation else [None]):
            for proto in cfg.protocol:
                for seed in cfg.seeds:
                    recipe = ProbeConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed)
                    runs.append(ProbeRun(
                        name=ref.name, train_store=ref.uri, val_store=val.uri, train_ids=tuple(train_ids),
                        val_ids=tuple(val_ids), labels=labels, array=val.array, train_array=train_array,
                        task=cfg.task, cfg=recipe, batch_size=cfg.batch_size, num_workers=cfg.workers,
                        channels=cfg.channels, storage_options=cfg.storage_options, protocol=proto, lbfgs=lbfgs,
                    ))
    return runs


def execute(runs: list[Any], use_ray: bool) -> list[dict[str, Any]]:
    """Run the probes here, one after the other, or as Ray tasks (one GPU each when the cluster has GPUs)."""
    from pipeline.evaluate.probe import run_probe

    if not use_ray:
        return [run_probe(r) for r in runs]
    import ray

    from pipeline.cli import init_ray

    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(run_probe)
    return ray.get([task.remote(r) for r in runs])
