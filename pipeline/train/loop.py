"""The per-worker training loop of Ray Train (:func:`train_loop_per_worker`) and the model it optimises."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from featup_ops import (
    BilateralUpsampler, BilinearUpsampler, JBUUpsampler, load_backbone, load_upsampler, save_upsampler,
)
from featup_ops.errors import CheckpointError
from featup_ops.multiview import MultiViewObjective, fixed_views, reconstruction_error
from pipeline.errors import InputNotFoundError
from pipeline.io.storage import filesystem, is_remote, join
from pipeline.train.config import METRIC_COLUMNS, METRICS_FILE, STATE_FILE, VAL_SEED, TrainJobConfig

if TYPE_CHECKING:
    import ray.data

__all__ = ["train_loop_per_worker", "read_metrics"]


# ----------------------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------------------


def read_metrics(cfg_or_uri: TrainJobConfig | str, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """Rows of a run's metrics CSV (numbers parsed; empty cells None).

    Args:
        cfg_or_uri: the job, or the CSV's path / URI.
        storage_options: fsspec options.
    """
    if isinstance(cfg_or_uri, TrainJobConfig):
        uri, storage_options = join(cfg_or_uri.run_uri, METRICS_FILE), cfg_or_uri.storage_options
    else:
        uri = cfg_or_uri
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for k, v in raw.items():
            if v == "" or v is None:
                row[k] = None
            elif k in ("split", "backbone"):
                row[k] = v
            elif k == "step":
                row[k] = int(v)
            else:
                row[k] = float(v)
        rows.append(row)
    return rows


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed per (job seed, rank, step): jitters differ across workers and steps, and a resumed run draws
    the same jitters at a given step as an uninterrupted one."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _MetricsLog:
    """Rank 0's metrics: console lines, the CSV beside the checkpoints, TensorBoard when installed."""

    def __init__(self, cfg: TrainJobConfig, start_step: int) -> None:
        self.uri = join(cfg.run_uri, METRICS_FILE)
        self.storage_options = cfg.storage_options
        # Rows of earlier runs up to the resumed step are kept; rows past it (work lost to a crash) are dropped.
        self.rows = [r for r in read_metrics(self.uri, cfg.storage_options) if r["step"] <= start_step]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            log_dir = cfg.run_uri if not is_remote(cfg.run_uri) else os.path.join(tempfile.gettempdir(), cfg.name)
            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except ImportError:
            pass

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row.get(k) for k in METRIC_COLUMNS})
        if self.tb is not None:
            prefix = f"{row['split']}/{row['backbone']}"
            for k in METRIC_COLUMNS[3:]:
                if row.get(k) is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", row[k], row["step"])

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS))
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_COLUMNS})
        fs, path = filesystem(self.uri, self.storage_options)
        fs.makedirs(os.path.dirname(path) if not is_remote(self.uri) else path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, buf.getvalue().encode())
        if self.tb is not None:
            self.tb.flush()


def _image_batches(shard: Any, cfg: TrainJobConfig, rank: int) -> Iterator[torch.Tensor]:
    """Endless ``(B, H, W, 3) uint8`` batches from this worker's shard, epoch after epoch.

    With ``cache_images`` the first pass streams from Ray Data and keeps the rows; later epochs reshuffle them in
    memory (seeded per rank and epoch). Every worker yields the same number of batches per epoch (the shards are
    equal-sized), which DDP needs.
    """
    epoch = 0
    cache: list[torch.Tensor] = []
    while True:
        if cfg.cache_images and epoch > 0 and cache:
            images = torch.cat(cache)
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, -1 - epoch))
            order = torch.randperm(len(images), generator=g)
            for i in range(0, len(images), cfg.batch_size):
                yield images[order[i : i + cfg.batch_size]]
        else:
            n = 0
            for batch in shard.iter_torch_batches(
                batch_size=cfg.batch_size,
                device="cpu",
                local_shuffle_buffer_size=None if cfg.cache_images else 4 * cfg.batch_size,
                local_shuffle_seed=None if cfg.cache_images else cfg.seed + 1000 * epoch + rank,
            ):
                images = batch["image"]
                if cfg.cache_images:
                    cache.append(images)
                n += len(images)
                yield images
            if n == 0:
                raise InputNotFoundError(f"worker {rank}: its training shard is empty (all images failed to decode?)")
        epoch += 1


def _val_images(cfg: TrainJobConfig) -> torch.Tensor | None:
    """All held-out images as one ``(N, H, W, 3) uint8`` tensor (rank 0 only), or None without a "val" dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    if shard is None:
        return None
    parts = [b["image"] for b in shard.iter_torch_batches(batch_size=64, device="cpu")]
    return torch.cat(parts) if parts else None


def _normalize(pixels: torch.Tensor, backbone: Any, device: torch.device) -> torch.Tensor:
    from pipeline.io.decode import normalize

    return normalize(pixels, backbone.mean, backbone.std).to(device, non_blocking=True)


def _log_validation(
    log: _MetricsLog | None, val: dict[str, dict[str, float]], step: int, elapsed: float, line: str
) -> None:
    """Add one "val" row per backbone to the log and print them after ``line``."""
    assert log is not None
    for bname, v in val.items():
        log.add({"step": step, "split": "val", "backbone": bname, "elapsed_s": elapsed, **v})
        line += (
            f" | val[{bname}] upsampler {v['val_err_upsampler']:.4f} bilinear {v['val_err_bilinear']:.4f}"
            f" bilateral {v['val_err_bilateral']:.4f} ratio {v['val_ratio']:.3f}"
        )
    print(line, flush=True)
    log.flush()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the models, resume, train ``steps`` steps, validate, checkpoint.

    Args:
        loop_config: :meth:`TrainJobConfig.to_dict` (the trainer's ``train_loop_config``).
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainJobConfig.from_dict(loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    names = cfg.backbone_names

    backbones = {n: load_backbone(n, cfg.weights, storage_options=cfg.storage_options).to(device) for n in names}
    for bb in backbones.values():
        bb.check_input(torch.zeros(1, 3, cfg.input_size, cfg.input_size))
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    model = _TrainModel(cfg, backbones).to(device)
    optimizer = torch.optim.NAdam(model.parameters(), lr=cfg.lr)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start_step = model.load_training_state(d, optimizer, device)

    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    log = _MetricsLog(cfg, start_step) if rank == 0 else None
    val_pixels = _val_images(cfg) if rank == 0 else None
    if start_step >= cfg.steps:
        if rank == 0:
            print(f"[train] {cfg.name}: already at step {start_step} >= --steps {cfg.steps}; nothing to do", flush=True)
        return
    if rank == 0:
        print(
            f"[train] {cfg.name}: backbones {list(names)}, {world} worker(s) on {device}, steps {start_step + 1}.."
            f"{cfg.steps}, batch {cfg.batch_size}/worker, "
            f"held-out images {0 if val_pixels is None else len(val_pixels)}",
            flush=True,
        )

    t_start = time.perf_counter()
    if rank == 0 and start_step == 0 and val_pixels is not None:
        # The untrained upsampler on the same views: the starting point the later ratios are read against.
        _log_validation(log, model.validate(val_pixels, device), 0, 0.0, f"[train] step 0/{cfg.steps}")
    batches = _image_batches(ray.train.get_dataset_shard("train"), cfg, rank)
    t_log = time.perf_counter()
    loss_sum, n_images = 0.0, 0
    loss_count = 0
    for step in range(start_step + 1, cfg.steps + 1):
        pixels = next(batches)
        name = names[(step - 1) % len(names)]
        image = _normalize(pixels, backbones[name], device)
        generator = torch.Generator().manual_seed(_step_seed(cfg.seed, rank, step))
        model.train()
        loss, _ = ddp(image, name, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step <= cfg.grad_clip_steps:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        optimizer.step()
        loss_sum += float(loss.detach())
        loss_count += 1
        n_images += len(pixels)

        last = step == cfg.steps
        do_log = step % cfg.log_every == 0 or last
        do_val = step % cfg.val_every == 0 or last
        do_ckpt = step % cfg.checkpoint_every == 0 or last
        if not (do_log or do_val or do_ckpt):
            continue
        stats = torch.tensor([loss_sum, float(loss_count), float(n_images)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(stats)  # sums over workers: mean loss over workers and steps, total images
        now = time.perf_counter()
        metrics: dict[str, Any] = {
            "step": step,
            "loss": float(stats[0] / stats[1]),
            "images_per_s": float(stats[2]) / max(now - t_log, 1e-9),
        }
        loss_sum, loss_count, n_images, t_log = 0.0, 0, 0, now
        if rank == 0:
            assert log is not None
            log.add({**metrics, "split": "train", "backbone": "+".join(names), "lr": cfg.lr,
                     "elapsed_s": now - t_start})  # fmt: skip
            line = f"[train] step {step}/{cfg.steps} loss {metrics['loss']:.4f} {metrics['images_per_s']:.1f} img/s"
            if do_val and val_pixels is not None:
                val = model.validate(val_pixels, device)
                _log_validation(log, val, step, now - t_start, line)
                for bname, v in val.items():
                    metrics.update(v if len(names) == 1 else {f"{k}[{bname}]": x for k, x in v.items()})
            else:
                print(line, flush=True)
            log.flush()
        if do_ckpt or do_val:
            if rank == 0 and do_ckpt:
                with tempfile.TemporaryDirectory(prefix="featup-ckpt-") as tmp:
                    model.save_training_state(tmp, optimizer, step, metrics)
                    ray.train.report(
                        metrics,
                        checkpoint=ray.train.Checkpoint.from_directory(tmp),
                        checkpoint_dir_name=f"checkpoint_{step:07d}",
                    )
            else:
                ray.train.report(metrics)


class _TrainModel(nn.Module):
    """The trainable parts in one module (so DDP sees one forward): the JBU upsampler, shared by every
    backbone, and one multi-view objective (downsampler + uncertainty head) per backbone. The frozen
    backbones are held outside the module's parameters."""

    def __init__(self, cfg: TrainJobConfig, backbones: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbones = dict(backbones)  # a plain dict: not registered, never in DDP or the optimizer
        first = backbones[cfg.backbone_names[0]]
        jbu_cfg = dataclasses.replace(cfg.jbu, final_mix=not cfg.feature_agnostic)
        self.upsampler = JBUUpsampler(None if cfg.feature_agnostic else first.dim, cfg=jbu_cfg)
        method = cfg.method_config()
        self.objectives = nn.ModuleDict(
            {_module_key(n): MultiViewObjective.from_train_config(bb.dim, bb.stride, method)
             for n, bb in backbones.items()}
        )  # fmt: skip

    def forward(
        self, image: torch.Tensor, name: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-view loss of one step on ``image (B, 3, H, W)`` (normalised for backbone ``name``)."""
        objective = self.objectives[_module_key(name)]
        return objective.loss(self.upsampler, image, self.backbones[name], generator)

    @torch.no_grad()
    def validate(self, pixels: torch.Tensor, device: torch.device) -> dict[str, dict[str, float]]:
        """Held-out multi-view reconstruction errors per backbone, upsampler and baselines on the same views.

        Args:
            pixels: ``(N, H, W, 3) uint8`` held-out images.
            device: where to compute.

        Returns:
            ``{backbone: {val_err_upsampler, val_err_bilinear, val_err_bilateral, val_ratio,
            val_ratio_bilateral, val_err_upsampler_learned_ds, val_err_bilinear_learned_ds}}``: relative
            squared errors (lower is better) with FeatUp's fixed box downsampler (the headline figures) and
            with the objective's learned downsampler; ratios = upsampler / baseline.
        """
        was_training = self.training
        self.eval()
        size = (int(pixels.shape[1]), int(pixels.shape[2]))
        views = fixed_views(self.cfg.val_views, size, self.cfg.jitter, seed=VAL_SEED)
        candidates = {"upsampler": self.upsampler, "bilinear": BilinearUpsampler(), "bilateral": BilateralUpsampler()}
        out: dict[str, dict[str, float]] = {}
        for name, bb in self.backbones.items():
            learned = self.objectives[_module_key(name)].downsampler
            sums: dict[str, float] = {}
            for i in range(0, len(pixels), self.cfg.batch_size):
                image = _normalize(pixels[i : i + self.cfg.batch_size], bb, device)
                feats = bb(image)
                for cname, up in candidates.items():
                    hr = up(feats, image)
                    err = reconstruction_error(hr, image, bb, views)
                    sums[f"val_err_{cname}"] = sums.get(f"val_err_{cname}", 0.0) + float(err.sum())
                    if cname != "bilateral":
                        err = reconstruction_error(hr, image, bb, views, learned)
                        key = f"val_err_{cname}_learned_ds"
                        sums[key] = sums.get(key, 0.0) + float(err.sum())
            v = {k: s / len(pixels) for k, s in sums.items()}
            v["val_ratio"] = v["val_err_upsampler"] / max(v["val_err_bilinear"], 1e-12)
            v["val_ratio_bilateral"] = v["val_err_upsampler"] / max(v["val_err_bilateral"], 1e-12)
            out[name] = v
        self.train(was_training)
        return out

    def save_training_state(
        self, directory: str, optimizer: torch.optim.Optimizer, step: int, metrics: dict[str, Any]
    ) -> None:
        """Write the upsampler (:func:`featup_ops.save_upsampler`, loadable on its own) and ``train_state.pt``
        (objectives, optimizer, step) into ``directory``."""
        cfg = self.cfg
        meta = {
            "step": step,
            "backbone": cfg.backbone_names[0] if len(cfg.backbone_names) == 1 else None,
            "backbones": list(cfg.backbone_names),
            "weights_hash": {n: bb.weights_hash for n, bb in self.backbones.items()},
            "input_size": cfg.input_size,
            "train": {"run": cfg.name, "workers": cfg.workers, "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "jitters": cfg.jitters, "proj_dim": cfg.proj_dim, "steps": cfg.steps},
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }  # fmt: skip
        save_upsampler(directory, self.upsampler, meta=meta)
        state = {"step": step, "objectives": self.objectives.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(state, os.path.join(directory, STATE_FILE))

    def load_training_state(self, directory: str, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
        """Restore from a checkpoint folder written by :meth:`save_training_state`; returns its step.

        Raises:
            CheckpointError: the checkpoint was made with another upsampler config or other backbones.
        """
        loaded = load_upsampler(directory, map_location=device)
        if loaded.config_dict() != self.upsampler.config_dict():
            raise CheckpointError(
                f"run {self.cfg.name!r}: its last checkpoint holds upsampler {loaded.config_dict()}, this job "
                f"builds {self.upsampler.config_dict()}; use a new --name or the original settings"
            )
        self.upsampler.load_state_dict(loaded.state_dict())
        state = torch.load(os.path.join(directory, STATE_FILE), map_location=device, weights_only=True)
        try:
            self.objectives.load_state_dict(state["objectives"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"run {self.cfg.name!r}: its last checkpoint was trained on other backbones "
                f"({sorted(state['objectives'])[:4]}...); use a new --name ({str(exc).splitlines()[0]})"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this job's lr wins over the saved one (a resume may change it)
            group["lr"] = self.cfg.lr
        return int(state["step"])



def _module_key(name: str) -> str:
    """A backbone name as an ``nn.ModuleDict`` key (no dots)."""
    return name.replace(".", "_")
