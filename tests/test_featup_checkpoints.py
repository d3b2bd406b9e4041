"""FeatUp's published JBU checkpoint files (Lightning ``.ckpt``) by path: variants, presets, strictness, hashes, S3.

The numerics (FeatUp's own outputs) are tested in test_featup_hub.py against golden files; the files here are built
by the test in FeatUp's key layout (names and shapes as FeatUp's Lightning module saves them).
"""
from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch

import featup_ops
from featup_ops.checkpoint import checkpoint_hash, load_upsampler
from featup_ops.errors import CheckpointError, CheckpointNotFoundError
from featup_ops.featup_checkpoints import (
    FEATUP_CHECKPOINTS,
    FEATUP_JBU_CONFIG,
    load_featup_checkpoint,
    to_featup_state_dict,
)
from featup_ops.featup_hub import FeatUpUpsampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PUBLISHED = {"dino16": 384, "dinov2": 384, "clip": 512, "vit": 384, "resnet50": 2048}


# --- FeatUp's layout ------------------------------------------------------------------------------------------------


def featup_layer_shapes() -> dict[str, tuple[int, ...]]:
    """One ``JBULearnedRange(3, C, 32, radius=3)``: range MLP 3->32->32, fix-up MLP 52->49->49, two scalars."""
    return {
        "range_temp": (),
        "range_proj.0.weight": (32, 3, 1, 1),
        "range_proj.0.bias": (32,),
        "range_proj.3.weight": (32, 32, 1, 1),
        "range_proj.3.bias": (32,),
        "fixup_proj.0.weight": (49, 52, 1, 1),
        "fixup_proj.0.bias": (49,),
        "fixup_proj.3.weight": (49, 49, 1, 1),
        "fixup_proj.3.bias": (49,),
        "sigma_spatial": (),
    }


def featup_stack(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under FeatUp's ``upsampler.`` keys (4 layers + the final ``fixup_proj`` = Dropout, Conv1x1)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(1, 5):
        for name, shape in featup_layer_shapes().items():
            if name == "range_temp":
                t = 0.5 * torch.randn((), generator=g)
            elif name == "sigma_spatial":
                t = 0.6 + torch.rand((), generator=g)
            else:
                t = 0.3 * torch.randn(shape, generator=g)
            sd[f"upsampler.up{i}.{name}"] = t
    sd["upsampler.fixup_proj.1.weight"] = torch.randn(dim, dim, 1, 1, generator=g) / dim**0.5
    sd["upsampler.fixup_proj.1.bias"] = 0.1 * torch.randn(dim, generator=g)
    return sd


def lightning_file(path: Path, stack: dict[str, torch.Tensor], *, norm: bool = True, **extra) -> Path:
    """Wrap as Lightning saves FeatUp's module: backbone, ChannelNorm (or not), downsampler, scale_net, loops."""
    dim = stack["upsampler.fixup_proj.1.bias"].shape[0] if "upsampler.fixup_proj.1.bias" in stack else 8
    backbone = "model.0.model." if norm else "model.model."  # FeatUp's use_norm=False layout has no Sequential
    state = {
        backbone + "patch_embed.proj.weight": torch.randn(dim, 3, 2, 2),  # stand-in for the frozen backbone
        backbone + "pos_embed": torch.randn(1, 5, dim),
        **({"model.1.norm.weight": torch.ones(dim), "model.1.norm.bias": torch.zeros(dim)} if norm else {}),
        **stack,
        "downsampler.w": torch.ones(16, 16),
        "downsampler.b": torch.zeros(16, 16),
        "downsampler.attention_net.1.weight": torch.randn(1, dim),
        "downsampler.attention_net.1.bias": torch.zeros(1),
        "scale_net.net.weight": torch.randn(1, dim, 1, 1),
        "scale_net.net.bias": torch.zeros(1),
    }
    ckpt = {
        "epoch": 0,
        "global_step": 2000,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
        "lr_schedulers": [],
        **extra,
    }
    torch.save(ckpt, path)
    return path


# --- tests -------------------------------------------------------------------------------------------------------


def test_layout_matches_featup_parameter_counts_and_addresses() -> None:
    # method notes: 6,233 parameters per layer, 172,772 for C = 384; the project's stack has the same tensors.
    assert sum(torch.Size(s).numel() for s in featup_layer_shapes().values()) == 6233
    sd = featup_stack(384)
    assert sum(v.numel() for v in sd.values()) == 172_772
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    project = featup_ops.JBUUpsampler(384, cfg=FEATUP_JBU_CONFIG)
    assert {k: tuple(v.shape) for k, v in to_featup_state_dict(project).items()} == shapes
    with_norm = {**shapes, "model.1.norm.weight": (384,), "model.1.norm.bias": (384,)}
    assert {k: tuple(v.shape) for k, v in to_featup_state_dict(FeatUpUpsampler("dinov2")).items()} == with_norm
    base = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
    assert FEATUP_CHECKPOINTS["dinov2"].url == base + "dinov2_jbu_stack_cocostuff.ckpt"
    assert FEATUP_CHECKPOINTS["dinov2"].no_norm_url == base + "no_norm/dinov2_jbu_stack_cocostuff.ckpt"
    assert FEATUP_CHECKPOINTS["maskclip"].url == base + "no_norm/maskclip_jbu_stack_cocostuff.ckpt"


def test_load_upsampler_reads_a_ckpt_with_hash_and_meta(tmp_path: Path) -> None:
    sd = featup_stack(384, seed=1)
    path = lightning_file(tmp_path / "dinov2_jbu_stack_cocostuff.ckpt", sd)
    up = load_upsampler(str(path))  # the featurize job's path: load_upsampler dispatches on the .ckpt suffix
    assert isinstance(up, FeatUpUpsampler) and not up.training and up.variant == "dinov2" and up.lowres_normalized
    params = up.state_dict()  # one-to-one: every FeatUp tensor is the module's tensor of the mapped name
    for i in range(4):
        assert torch.equal(params[f"jbu.layers.{i}.log_temperature"], sd[f"upsampler.up{i + 1}.range_temp"])
        assert torch.equal(params[f"jbu.layers.{i}.sigma"], sd[f"upsampler.up{i + 1}.sigma_spatial"])
        assert torch.equal(params[f"jbu.layers.{i}.fixup.3.weight"], sd[f"upsampler.up{i + 1}.fixup_proj.3.weight"])
    assert torch.equal(params["jbu.final_conv.weight"], sd["upsampler.fixup_proj.1.weight"])
    assert torch.equal(params["norm.weight"], torch.ones(384))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert up.checkpoint_hash == digest == checkpoint_hash(path)
    assert up.checkpoint_meta == {
        "format": "featup-lightning-ckpt", "featup_name": "dinov2", "variant": "dinov2", "backbone": "dinov2_vits14",
        "dim": 384, "channel_norm": True, "epoch": 0, "global_step": 2000, "file": "dinov2_jbu_stack_cocostuff.ckpt",
    }
    with torch.no_grad():
        assert up(torch.randn(1, 384, 2, 3), torch.randn(1, 3, 32, 48)).shape == (1, 384, 32, 48)


def test_export_round_trip_keeps_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    up = FeatUpUpsampler("vit-no-norm")
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    up.eval()
    path = lightning_file(tmp_path / "vit_jbu_stack_export.ckpt", to_featup_state_dict(up), norm=False)
    loaded = load_featup_checkpoint(path)
    assert loaded.variant == "vit-no-norm" and loaded.checkpoint_meta["channel_norm"] is False
    feats, image = torch.randn(1, 384, 2, 3), torch.randn(1, 3, 40, 30)  # a 20x-tall output: 5 stages
    with torch.no_grad():
        assert torch.equal(loaded(feats, image), up(feats, image))
    with pytest.raises(CheckpointError, match="only a FeatUpUpsampler or a JBUUpsampler"):
        to_featup_state_dict(featup_ops.JBUUpsampler())  # the feature-agnostic default has no FeatUp layout
    # a bare JBUStack state dict (no Lightning wrapper, no prefix) loads too
    bare = tmp_path / "vit_jbu_stack_bare.ckpt"
    torch.save(to_featup_state_dict(up, prefix=""), bare)
    with torch.no_grad():
        assert torch.equal(load_featup_checkpoint(bare)(feats, image), up(feats, image))


@pytest.mark.parametrize("hub_name", sorted(PUBLISHED))
def test_published_checkpoints_belong_to_their_preset(tmp_path: Path, hub_name: str) -> None:
    from featup_ops.backbones import PRESETS

    entry = FEATUP_CHECKPOINTS[hub_name]
    assert entry.dim == PUBLISHED[hub_name] == PRESETS[entry.preset].dim
    path = lightning_file(tmp_path / f"{hub_name}_jbu_stack_cocostuff.ckpt", featup_stack(entry.dim))
    up = load_featup_checkpoint(path, entry.preset)
    assert up.dim == entry.dim and up.variant == hub_name
    assert up.checkpoint_meta["featup_name"] == hub_name and up.checkpoint_meta["backbone"] == entry.preset
    assert load_featup_checkpoint(path, hub_name).checkpoint_meta["backbone"] == entry.preset  # hub name alias
    for other in (c for c in FEATUP_CHECKPOINTS.values() if c.preset and c.preset != entry.preset):
        with pytest.raises(CheckpointError) as err:
            load_featup_checkpoint(path, other.preset)
        msg = str(err.value)
        assert "\n" not in msg and other.preset in msg
        assert (f"has {other.dim}" in msg) if other.dim != entry.dim else (repr(hub_name) in msg)
    if hub_name == "dino16":
        with pytest.raises(CheckpointError, match="backbone 'clip_vitb16' has 512"):
            load_upsampler(path, backbone="clip_vitb16")  # the featurize job's entry point checks too


def test_unnamed_files_and_maskclip(tmp_path: Path) -> None:
    path = lightning_file(tmp_path / "renamed.ckpt", featup_stack(384))
    with pytest.raises(CheckpointError, match="rename it or pass backbone="):
        load_featup_checkpoint(path)  # 384 channels: dino16, dinov2 or vit; nothing says which
    up = load_featup_checkpoint(path, "dinov2_vits14")
    assert up.variant == "dinov2" and up.checkpoint_meta["backbone"] == "dinov2_vits14"
    with pytest.raises(CheckpointError, match="upsamples 384-channel features but backbone 'efficientnet_lite0'"):
        load_featup_checkpoint(path, "efficientnet_lite0")
    with pytest.raises(CheckpointError, match="published no JBU checkpoint for backbone 'dinov2_vits14_reg'"):
        load_featup_checkpoint(path, "dinov2_vits14_reg")
    with pytest.raises(CheckpointError, match="unknown backbone 'nope'"):
        load_featup_checkpoint(path, "nope")
    small = lightning_file(tmp_path / "dinov2_jbu_stack_small.ckpt", featup_stack(8))
    with pytest.raises(CheckpointError, match="upsamples 8-channel features but variant 'dinov2' is FeatUp's 384"):
        load_featup_checkpoint(small)
    # a MaskCLIP file is not CLIP's, though both have 512 channels; FeatUp publishes it without norm only
    mask = lightning_file(tmp_path / "maskclip_jbu_stack_cocostuff.ckpt", featup_stack(512), norm=False)
    with pytest.raises(CheckpointError, match="FeatUp's 'maskclip'"):
        load_featup_checkpoint(mask, "clip_vitb16")
    assert load_featup_checkpoint(mask).variant == "maskclip-no-norm"
    assert load_featup_checkpoint(mask, "maskclip").checkpoint_meta["backbone"] is None
    normed = lightning_file(tmp_path / "maskclip_jbu_stack_normed.ckpt", featup_stack(512))
    with pytest.raises(CheckpointError, match="has none .published only as 'maskclip-no-norm'"):
        load_featup_checkpoint(normed)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda sd: sd.__setitem__("upsampler.up5.range_temp", torch.tensor(0.0)), "unexpected keys: upsampler.up5"),
        (lambda sd: sd.pop("upsampler.up4.fixup_proj.3.bias"), "missing keys: upsampler.up4.fixup_proj.3.bias"),
        (lambda sd: sd.__setitem__("head.weight", torch.zeros(2)), "unexpected keys: head.weight"),
        (lambda sd: sd.__setitem__("model.1.extra", torch.zeros(2)), "unexpected keys: model.1.extra"),
        (lambda sd: sd.__setitem__("upsampler.up1.range_proj.0.weight", torch.zeros(32, 4, 1, 1)),
         "upsampler.up1.range_proj.0.weight (32, 4, 1, 1) vs (32, 3, 1, 1)"),
    ],
)
def test_strict_keys_one_line(tmp_path: Path, change, named: str) -> None:
    sd = featup_stack(384)
    change(sd)
    path = lightning_file(tmp_path / "vit_jbu_stack_bad.ckpt", sd)
    with pytest.raises(CheckpointError) as err:
        load_featup_checkpoint(path)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_not_a_jbu_stack_and_missing_file(tmp_path: Path) -> None:
    sd = featup_stack(384)
    sd.pop("upsampler.fixup_proj.1.weight")
    with pytest.raises(CheckpointError, match="final 1x1 channel mix"):
        load_featup_checkpoint(lightning_file(tmp_path / "vit_jbu_stack_nofinal.ckpt", sd))
    with pytest.raises(CheckpointNotFoundError):
        load_featup_checkpoint(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="neither safetensors nor a torch file"):
        load_featup_checkpoint(tmp_path / "junk.ckpt")
    good = lightning_file(tmp_path / "cut.ckpt", featup_stack(8)).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_featup_checkpoint(tmp_path / "cut.ckpt")


def test_lightning_attribute_dict_is_read_as_a_plain_dict(tmp_path: Path, monkeypatch) -> None:
    # Lightning stores hyper_parameters as its AttributeDict (a dict subclass); that one type is allowed.
    class AttributeDict(dict):
        pass

    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    AttributeDict.__module__, AttributeDict.__qualname__ = "pytorch_lightning.utilities.parsing", "AttributeDict"
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
    hp = AttributeDict(model_type="dino16", upsampler="jbu_stack")
    path = lightning_file(tmp_path / "run7.ckpt", featup_stack(384), hparams_name="kwargs", hyper_parameters=hp)
    monkeypatch.undo()  # Lightning is not importable while loading
    up = load_featup_checkpoint(path, "dino_vits16")
    assert up.checkpoint_meta["featup_name"] == "dino16"  # identified from hyper_parameters, not the file name
    with pytest.raises(CheckpointError, match="FeatUp's 'dino16'"):
        load_featup_checkpoint(path, "vit_s16")


def test_s3(tmp_path: Path, s3_bucket: str) -> None:
    import fsspec

    local = lightning_file(tmp_path / "dino16_jbu_stack_cocostuff.ckpt", featup_stack(384, seed=2), norm=False)
    uri = f"{s3_bucket}/featup/no_norm/dino16_jbu_stack_cocostuff.ckpt"
    fs, root = fsspec.core.url_to_fs(uri)
    fs.pipe_file(root, local.read_bytes())
    up = load_upsampler(uri)
    assert up.variant == "dino16-no-norm"
    assert up.checkpoint_hash == checkpoint_hash(uri) == hashlib.sha256(local.read_bytes()).hexdigest()
    feats, image = torch.randn(1, 384, 2, 3), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(up(feats, image), load_featup_checkpoint(local)(feats, image))
    with pytest.raises(CheckpointNotFoundError):
        load_featup_checkpoint(f"{s3_bucket}/featup/none.ckpt")
