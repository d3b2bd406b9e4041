"""Distributed JBU training through a real local Ray (Train V2, 2 CPU workers, gloo) and a real S3 server.

Tiny settings keep it fast: 64 px crops with the real EfficientNet-Lite0 (2x2 feature grid), batch 2 per worker,
a handful of steps. The runs are module-scoped and shared: one from s3:// (then resumed), one from a local folder
(whose exported upsampler goes through the featurize job).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from featup_ops import load_upsampler
from featup_ops.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.train import EXPORT_DIR, STATE_FILE, TrainJobConfig, read_metrics, run_training, split_rows

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
BASE = dict(
    backbone="efficientnet_lite0", input_size=SIZE, batch_size=2, workers=2, cpus_per_worker=0.5, log_every=1,
    val_images=2, jitters=2,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- unit


def test_defaults_are_the_methods():
    cfg = TrainJobConfig(input="x", output="y")
    m = TrainConfig()
    assert (cfg.batch_size, cfg.lr, cfg.jitters, cfg.proj_dim, cfg.steps) == (
        m.batch_size, m.lr, m.n_jitters, m.projection_dim, m.steps
    )  # fmt: skip
    assert (cfg.input_size, cfg.checkpoint_every, cfg.val_every) == (m.image_size, m.ckpt_every, m.val_every)
    assert cfg.method_config() == m


def test_config_round_trips_through_the_loop_dict():
    cfg = TrainJobConfig(input="s3://b/in", output="s3://b/runs", backbones=("vit_s16", "dino_vits16"), steps=7)
    again = TrainJobConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.backbone_names == ("vit_s16", "dino_vits16")
    assert cfg.export_uri == f"s3://b/runs/jbu/{EXPORT_DIR}"


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"steps": 0}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0.0}, "--lr"),
        ({"val_images": -1}, "--val-images"),
        ({"name": "a/b"}, "--name"),
        ({"backbones": ("vit_s16", "dino_vits16"), "feature_agnostic": False}, "feature-agnostic"),
    ],
)
def test_bad_settings_fail_with_one_line_naming_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag) as info:
        TrainJobConfig(input="x", output="y", **kw)
    assert "\n" not in str(info.value)


def test_held_out_rows_are_the_last_and_every_worker_gets_one():
    assert split_rows(8, 2, 2) == ([0, 1, 2, 3, 4, 5], [6, 7])
    with pytest.raises(ConfigError, match="fewer than 4 workers"):
        split_rows(5, 2, 4)


def _job():
    spec = importlib.util.spec_from_file_location("train_upsampler_job", REPO / "jobs" / "train_upsampler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_flags_map_onto_config_fields():
    build_parser, config_from_args = _job().build_parser, _job().config_from_args

    args = build_parser().parse_args(
        ["--input", "in", "--output", "out", "--steps", "5", "--workers", "2", "--no-feature-agnostic",
         "--batch-size", "3", "--proj-dim", "16", "--jitters", "2", "--val-images", "1", "--use-gpu"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.workers, cfg.feature_agnostic, cfg.batch_size, cfg.proj_dim, cfg.jitters) == (
        5, 2, False, 3, 16, 2
    )  # fmt: skip
    assert cfg.use_gpu and cfg.val_images == 1
    defaults = config_from_args(build_parser().parse_args(["--input", "in", "--output", "out"]))
    assert defaults == TrainJobConfig(input="in", output="out")
    assert defaults.jbu.fixup and defaults.jbu.fixup_zero_init  # FeatUp's code trains with the kernel fix-up
    plain = config_from_args(build_parser().parse_args(["--input", "in", "--output", "out", "--no-fixup"]))
    assert not plain.jbu.fixup and plain.jbu == dataclasses.replace(defaults.jbu, fixup=False)


# ---------------------------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def s3_photos(s3_server, samples_dir):
    """The sample photos uploaded to a bucket on the loopback S3 server; yields the bucket URI."""
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = "train-module"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for p in sorted(samples_dir.glob("*.jpg")):
        fs.put_file(str(p), f"{bucket}/photos/{p.name}")
    yield f"s3://{bucket}"
    fs.rm(bucket, recursive=True)


@pytest.fixture(scope="module")
def runs(ray_local, s3_photos, samples_dir):
    """Two fits of one run stored on s3://: 3 steps reading a local folder, then the same run name with --steps 6
    reading the same photos from s3:// (a resume: it must continue at step 4)."""
    cfg = TrainJobConfig(
        input=str(samples_dir), output=f"{s3_photos}/runs", name="r", steps=3, checkpoint_every=1, val_every=3,
        lr=3e-3, grad_clip_steps=0, **BASE,
    )  # fmt: skip
    first = run_training(cfg)
    first_rows = read_metrics(cfg)
    resumed_cfg = dataclasses.replace(cfg, input=f"{s3_photos}/photos", steps=6, checkpoint_every=3, val_every=6)
    second = run_training(resumed_cfg)
    return resumed_cfg, first, first_rows, second


def test_two_workers_train_from_a_local_folder_with_checkpoints_on_s3(runs, s3_photos):
    import s3fs

    cfg, first, first_rows, _ = runs
    assert first["step"] == 3
    assert [r["step"] for r in first_rows if r["split"] == "train"] == [1, 2, 3]
    fs = s3fs.S3FileSystem()
    run = f"{s3_photos[5:]}/runs/r"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"checkpoint_0000003", "checkpoint_0000006", "metrics.csv", EXPORT_DIR} <= names
    assert "checkpoint_0000001" not in names  # keep_checkpoints=3 dropped the oldest
    ckpt_files = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoint_0000003")}
    assert {"upsampler.safetensors", "upsampler.json", STATE_FILE} <= ckpt_files
    val = [r for r in first_rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 3]  # the untrained upsampler first, then after training
    for r in val:
        for key in ("val_err_upsampler", "val_err_bilinear", "val_err_bilateral"):
            assert 0 < r[key] < 10
        assert r["val_ratio"] == pytest.approx(r["val_err_upsampler"] / r["val_err_bilinear"])


def test_a_rerun_with_the_same_name_reads_s3_and_continues_from_the_saved_step(runs):
    cfg, first, first_rows, second = runs
    assert second["step"] == 6
    rows = read_metrics(cfg)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # no restart at 1
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 3, 6]
    assert rows[: len(first_rows)] == first_rows
    up = load_upsampler(cfg.export_uri)
    assert up.checkpoint_meta["step"] == 6
    assert up.checkpoint_meta["backbone"] == "efficientnet_lite0"
    assert up.checkpoint_meta["metrics"]["val_ratio"] == pytest.approx(second["metrics"]["val_ratio"])


def test_loss_falls_over_the_short_run(runs):
    cfg = runs[0]
    losses = [r["loss"] for r in read_metrics(cfg) if r["split"] == "train"]
    assert sum(losses[-2:]) / 2 < losses[0]


def test_exported_upsampler_round_trips_into_load_upsampler_and_featurize(runs, tmp_path, samples_dir):
    from featup_ops import load_backbone
    from featup_ops.checkpoint import checkpoint_hash
    from pipeline.featurize import FeaturizeConfig, run_featurize
    from pipeline.store import open_store, read_attrs

    cfg, _, _, result = runs
    up = load_upsampler(result["upsampler"])
    ckpt = load_upsampler(result["checkpoint"])  # the Ray checkpoint folder itself loads too
    for a, b in zip(up.state_dict().values(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bb = load_backbone("efficientnet_lite0")
    img = torch.randn(1, 3, SIZE, SIZE)
    assert up(bb(img), img).shape == (1, 320, SIZE, SIZE)

    out = str(tmp_path / "feats.zarr")
    counts = run_featurize(
        FeaturizeConfig(input=str(samples_dir), output=out, limit=2, input_size=SIZE, upsampler=result["upsampler"],
                        batch_size=2, quiet=True)
    )  # fmt: skip
    assert counts["complete"] == 2
    attrs = read_attrs(open_store(out))
    assert attrs["upsampler_checkpoint_hash"] == checkpoint_hash(result["upsampler"])


# ------------------------------------------------------------------------------------- the model, in-process


def _in_process_model(names, **kw):
    from featup_ops import load_backbone
    from pipeline.train.loop import _TrainModel

    weights = {"efficientnet_lite0": None, "vit_s16": "random"}
    backbones = {n: load_backbone(n, weights[n]) for n in names}
    cfg = TrainJobConfig(input="x", output="y", input_size=SIZE, backbones=tuple(names), jitters=1, proj_dim=8, **kw)
    torch.manual_seed(0)
    return cfg, _TrainModel(cfg, backbones)


def test_multi_backbone_training_shares_one_upsampler_and_keeps_a_head_per_backbone():
    from pipeline.train.loop import _normalize

    cfg, model = _in_process_model(["efficientnet_lite0", "vit_s16"], val_views=2)
    assert model.upsampler.dim is None  # feature-agnostic
    assert set(model.objectives) == {"efficientnet_lite0", "vit_s16"}
    pixels = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    for name in ("efficientnet_lite0", "vit_s16"):
        model.zero_grad(set_to_none=True)
        loss, _ = model(_normalize(pixels, model.backbones[name], torch.device("cpu")), name, torch.Generator())
        loss.backward()
        assert all(p.grad is not None for p in model.upsampler.parameters() if p.requires_grad)
        other = "vit_s16" if name == "efficientnet_lite0" else "efficientnet_lite0"
        assert all(p.grad is None for p in model.objectives[other].parameters())
    val = model.validate(pixels, torch.device("cpu"))
    assert set(val) == {"efficientnet_lite0", "vit_s16"}


def test_training_state_round_trips_and_another_setup_is_refused(tmp_path):
    from featup_ops.errors import CheckpointError

    cfg, model = _in_process_model(["efficientnet_lite0"])
    opt = torch.optim.NAdam(model.parameters(), lr=cfg.lr)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_training_state(str(tmp_path), opt, 7, {"loss": 1.5})
    _, fresh = _in_process_model(["efficientnet_lite0"], lr=5e-4)
    opt2 = torch.optim.NAdam(fresh.parameters(), lr=5e-4)
    assert fresh.load_training_state(str(tmp_path), opt2, torch.device("cpu")) == 7
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt2.param_groups[0]["lr"] == 5e-4  # this job's lr, not the saved one
    _, mixing = _in_process_model(["efficientnet_lite0"], feature_agnostic=False)
    with pytest.raises(CheckpointError, match="new --name"):
        mixing.load_training_state(str(tmp_path), torch.optim.NAdam(mixing.parameters()), torch.device("cpu"))
