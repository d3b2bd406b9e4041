"""FeatUp's published JBU checkpoints (Lightning ``.ckpt``): key layout, numerics, strictness, safety, presets.

No real published file is reachable offline, so every file here is built by the test with FeatUp's key layout, written
down from the method description (names, shapes, parameter counts), and its outputs are checked against an
independent functional re-implementation of FeatUp's ``JBULearnedRange`` / ``JBUStack`` forward (unfold + einsum).
"""
from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import featup_ops
from featup_ops.checkpoint import checkpoint_hash, load_upsampler
from featup_ops.errors import CheckpointError, CheckpointNotFoundError
from featup_ops.featup_checkpoints import (
    FEATUP_CHECKPOINTS,
    FEATUP_JBU_CONFIG,
    load_featup_checkpoint,
    to_featup_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PUBLISHED = {"dino16": 384, "dinov2": 384, "clip": 512, "vit": 384, "resnet50": 2048}


# --- FeatUp's layout, written from the method description ----------------------------------------------------------


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
    """Wrap as PyTorch Lightning saves a checkpoint: backbone, ChannelNorm, downsampler, scale_net, loop states."""
    dim = stack["upsampler.fixup_proj.1.bias"].shape[0] if "upsampler.fixup_proj.1.bias" in stack else 8
    state = {
        "model.0.model.patch_embed.proj.weight": torch.randn(dim, 3, 2, 2),  # stand-in for the frozen backbone
        "model.0.model.pos_embed": torch.randn(1, 5, dim),
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
        "callbacks": {
            "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0}": {
                "monitor": None, "best_model_score": None, "best_model_path": "", "dirpath": "../checkpoints/x",
                "kth_value": torch.tensor(float("inf")), "best_k_models": {}, "last_model_path": "",
            }
        },
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(2000.0), "exp_avg": torch.zeros(3)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}]}
        ],
        "lr_schedulers": [],
        **extra,
    }
    torch.save(ckpt, path)
    return path


# --- FeatUp's forward, re-implemented from the method description -------------------------------------------------


def ref_jbu_layer(p: dict[str, torch.Tensor], source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """FeatUp's JBULearnedRange (eval): unfold-based, 7x7 window, fix-up 0.1, bicubic source, reflect pads."""
    b, _, h, w = guidance.shape
    c, r, d = source.shape[1], 3, 7
    keys = F.conv2d(F.gelu(F.conv2d(guidance, p["range_proj.0.weight"], p["range_proj.0.bias"])),
                    p["range_proj.3.weight"], p["range_proj.3.bias"])
    neigh = F.unfold(F.pad(keys, [r] * 4, mode="reflect"), d).reshape(b, keys.shape[1], d * d, h, w)
    tau = p["range_temp"].exp().clamp(1e-4, 1e4)
    range_k = torch.softmax(tau * torch.einsum("bcphw,bchw->bphw", neigh, keys), dim=1)
    lin = torch.linspace(-1, 1, d)
    dy, dx = torch.meshgrid(lin, lin, indexing="ij")
    spatial = torch.exp(-(dy**2 + dx**2) / (2 * p["sigma_spatial"] ** 2)).reshape(1, d * d, 1, 1)
    k = range_k * spatial
    k = k / k.sum(1, keepdim=True).clamp_min(1e-7)
    fix = F.conv2d(F.gelu(F.conv2d(torch.cat([k, guidance], 1), p["fixup_proj.0.weight"], p["fixup_proj.0.bias"])),
                   p["fixup_proj.3.weight"], p["fixup_proj.3.bias"])
    k = k + 0.1 * fix
    src = F.interpolate(source, (h, w), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(src, [r] * 4, mode="reflect"), d).reshape(b, c, d * d, h, w)
    return torch.einsum("bcphw,bphw->bchw", patches, k)


def ref_jbu_stack(sd: dict[str, torch.Tensor], feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """FeatUp's JBUStack (eval): 4 layers of 2x, guidance area-pooled to each output, then x + 0.1 * Conv1x1(x)."""
    x = feats
    for i in range(1, 5):
        p = {k[len(f"upsampler.up{i}."):]: v for k, v in sd.items() if k.startswith(f"upsampler.up{i}.")}
        x = ref_jbu_layer(p, x, F.adaptive_avg_pool2d(image, (2 * x.shape[-2], 2 * x.shape[-1])))
    return x + 0.1 * F.conv2d(x, sd["upsampler.fixup_proj.1.weight"], sd["upsampler.fixup_proj.1.bias"])


# --- tests -------------------------------------------------------------------------------------------------------


def test_layout_matches_featup_parameter_counts() -> None:
    # method notes: 6,233 parameters per layer, 172,772 for C = 384; the project's stack has the same tensors.
    assert sum(torch.Size(s).numel() for s in featup_layer_shapes().values()) == 6233
    sd = featup_stack(384)
    assert sum(v.numel() for v in sd.values()) == 172_772
    up = featup_ops.JBUUpsampler(384, cfg=FEATUP_JBU_CONFIG)
    assert {k: tuple(v.shape) for k, v in to_featup_state_dict(up).items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }


def test_loads_and_matches_featup_forward(tmp_path: Path) -> None:
    dim = 8
    sd = featup_stack(dim, seed=1)
    path = lightning_file(tmp_path / "mine.ckpt", sd)
    up = load_featup_checkpoint(path)
    assert isinstance(up, featup_ops.JBUUpsampler) and not up.training and up.dim == dim
    # one-to-one: every FeatUp tensor is the project's tensor of the mapped name
    params = dict(up.state_dict())
    for i in range(4):
        assert torch.equal(params[f"layers.{i}.log_temperature"], sd[f"upsampler.up{i + 1}.range_temp"])
        assert torch.equal(params[f"layers.{i}.sigma"], sd[f"upsampler.up{i + 1}.sigma_spatial"])
        assert torch.equal(params[f"layers.{i}.fixup.3.weight"], sd[f"upsampler.up{i + 1}.fixup_proj.3.weight"])
    assert torch.equal(params["final_conv.weight"], sd["upsampler.fixup_proj.1.weight"])
    torch.manual_seed(0)
    feats, image = torch.randn(2, dim, 3, 4), torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = up(feats, image, (48, 64))  # 16x the grid: FeatUp's output size
        ref = ref_jbu_stack(sd, feats, image)
    assert out.shape == (2, dim, 48, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # recorded facts and the hash the stores record
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert up.checkpoint_hash == digest == checkpoint_hash(path)
    assert up.checkpoint_meta == {
        "format": "featup-lightning-ckpt", "featup_name": None, "backbone": None, "dim": dim, "channel_norm": True,
        "epoch": 0, "global_step": 2000, "file": "mine.ckpt",
    }
    # the featurize job's path: load_upsampler dispatches on the .ckpt suffix
    via_job = load_upsampler(str(path))
    with torch.no_grad():
        assert torch.equal(via_job(feats, image, (48, 64)), out)
    assert via_job.config_dict()["jbu"]["fixup"] and via_job.config_dict()["jbu"]["final_mix"]


def test_export_round_trip_keeps_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    up = featup_ops.JBUUpsampler(6, cfg=FEATUP_JBU_CONFIG)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    up.eval()
    path = lightning_file(tmp_path / "export.ckpt", to_featup_state_dict(up), norm=False)
    loaded = load_featup_checkpoint(path)
    assert loaded.checkpoint_meta["channel_norm"] is False
    feats, image = torch.randn(1, 6, 5, 4), torch.randn(1, 3, 40, 30)
    with torch.no_grad():
        assert torch.equal(loaded(feats, image), up(feats, image))
    with pytest.raises(CheckpointError, match="only a JBUUpsampler"):
        to_featup_state_dict(featup_ops.JBUUpsampler())  # the feature-agnostic default has no FeatUp layout
    # a bare JBUStack state dict (no Lightning wrapper, no prefix) loads too
    bare = tmp_path / "bare.ckpt"
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
    assert up.dim == entry.dim
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
        with torch.no_grad():  # full-size channels run (a tiny grid)
            assert up(torch.randn(1, 384, 2, 2), torch.randn(1, 3, 32, 32)).shape == (1, 384, 32, 32)


def test_unnamed_file_checks_channels_and_refuses_unpublished_backbones(tmp_path: Path) -> None:
    path = lightning_file(tmp_path / "renamed.ckpt", featup_stack(384))
    assert load_featup_checkpoint(path, "dinov2_vits14").checkpoint_meta["backbone"] == "dinov2_vits14"
    with pytest.raises(CheckpointError, match="upsamples 384-channel features but backbone 'efficientnet_lite0'"):
        load_featup_checkpoint(path, "efficientnet_lite0")
    with pytest.raises(CheckpointError, match="published no JBU checkpoint for backbone 'dinov2_vits14_reg'"):
        load_featup_checkpoint(path, "dinov2_vits14_reg")
    with pytest.raises(CheckpointError, match="unknown backbone 'nope'"):
        load_featup_checkpoint(path, "nope")
    # a MaskCLIP file is not CLIP's, though both have 512 channels
    mask = lightning_file(tmp_path / "maskclip_jbu_stack_cocostuff.ckpt", featup_stack(512), norm=False)
    with pytest.raises(CheckpointError, match="FeatUp's 'maskclip'"):
        load_featup_checkpoint(mask, "clip_vitb16")
    with pytest.raises(CheckpointError, match="has no preset here"):
        load_featup_checkpoint(mask, "maskclip")
    assert load_featup_checkpoint(mask).checkpoint_meta["featup_name"] == "maskclip"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda sd: sd.__setitem__("upsampler.up5.range_temp", torch.tensor(0.0)), "unexpected keys: upsampler.up5"),
        (lambda sd: sd.pop("upsampler.up2.sigma_spatial"), "missing keys: upsampler.up2.sigma_spatial"),
        (lambda sd: sd.pop("upsampler.up4.fixup_proj.3.bias"), "missing keys: upsampler.up4.fixup_proj.3.bias"),
        (lambda sd: sd.__setitem__("head.weight", torch.zeros(2)), "unexpected keys: head.weight"),
        (lambda sd: sd.__setitem__("upsampler.up1.range_proj.0.weight", torch.zeros(32, 4, 1, 1)),
         "upsampler.up1.range_proj.0.weight (32, 4, 1, 1) vs (32, 3, 1, 1)"),
    ],
)
def test_strict_keys_one_line(tmp_path: Path, change, named: str) -> None:
    sd = featup_stack(8)
    change(sd)
    path = lightning_file(tmp_path / "bad.ckpt", sd)
    with pytest.raises(CheckpointError) as err:
        load_featup_checkpoint(path)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_not_a_jbu_stack_and_missing_file(tmp_path: Path) -> None:
    sd = featup_stack(8)
    sd.pop("upsampler.fixup_proj.1.weight")
    with pytest.raises(CheckpointError, match="final 1x1 channel mix"):
        load_featup_checkpoint(lightning_file(tmp_path / "nofinal.ckpt", sd))
    with pytest.raises(CheckpointNotFoundError):
        load_featup_checkpoint(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a torch file"):
        load_featup_checkpoint(tmp_path / "junk.ckpt")
    good = lightning_file(tmp_path / "cut.ckpt", featup_stack(8)).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_featup_checkpoint(tmp_path / "cut.ckpt")


_RAN: list[str] = []


def _side_effect(tag: str) -> str:
    _RAN.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_side_effect, ("executed",))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    path = lightning_file(tmp_path / "evil.ckpt", featup_stack(8), hyper_parameters={"x": _Payload()})
    _RAN.clear()
    with pytest.raises(CheckpointError) as err:
        load_featup_checkpoint(path)
    assert _RAN == []
    msg = str(err.value)
    assert "_side_effect" in msg and "not loaded" in msg and "\n" not in msg


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

    sd = featup_stack(8, seed=2)
    local = lightning_file(tmp_path / "dino16_jbu_stack_cocostuff.ckpt", sd)
    uri = f"{s3_bucket}/featup/x.ckpt"
    fs, root = fsspec.core.url_to_fs(uri)
    fs.pipe_file(root, local.read_bytes())
    up = load_upsampler(uri)
    assert up.checkpoint_hash == checkpoint_hash(uri) == hashlib.sha256(local.read_bytes()).hexdigest()
    feats, image = torch.randn(1, 8, 2, 3), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(up(feats, image, (32, 48)), ref_jbu_stack(sd, feats, image), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointNotFoundError):
        load_featup_checkpoint(f"{s3_bucket}/featup/none.ckpt")
