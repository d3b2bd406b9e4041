"""Backbones: presets against their timm models, input-size and name errors, every weights source, offline speed."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup_ops.backbones import PRESETS, Backbone, list_backbones, load_backbone, nearest_valid_sizes
from featup_ops.errors import (
    FeatupError,
    InputSizeError,
    UnknownBackboneError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from featup_ops.weights import PACKAGED_WEIGHTS, load_packaged_state_dict, map_in_order

REPO = Path(__file__).resolve().parents[1]
#: ImageNet-1k class indices that are birds (cock..ostrich..; grouse..; hornbill..; goose..; herons..penguins).
BIRD_CLASSES = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


@pytest.fixture(scope="module")
def lite0_random() -> Backbone:
    return load_backbone("efficientnet_lite0", "random")


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet_lite0")  # default: the packaged ImageNet weights


def _photo(path: Path, size: int, bb: Backbone) -> torch.Tensor:
    """Center-square crop, resize, normalise with the backbone's mean/std: (1, 3, size, size) float32."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(bb.mean)[:, None, None], torch.tensor(bb.std)[:, None, None]
    return ((x - mean) / std)[None]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_stride_dim_match_the_model(name: str) -> None:
    bb = load_backbone(name, "random")
    cfg = bb.cfg
    info = bb.model.feature_info[cfg.feature_index]
    assert bb.stride == cfg.stride == info["reduction"]
    expected_dim = bb.model.get_classifier().out_features if cfg.head_projection else info["num_chs"]
    assert bb.dim == cfg.dim == expected_dim
    assert cfg.num_prefix_tokens == int(getattr(bb.model, "num_prefix_tokens", 0) or 0)
    assert cfg.input_size[0] % bb.stride == 0 and cfg.input_size[1] % bb.stride == 0
    # non-square, not 224: a 2x3 grid
    x = torch.randn(1, 3, 2 * bb.stride, 3 * bb.stride)
    with torch.no_grad():
        y = bb(x)
    assert y.shape == (1, bb.dim, 2, 3) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not bb.training and not bb.model.training
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.weights_hash == f"random:{name}"
    assert len(bb.mean) == 3 and len(bb.std) == 3


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "name,model_name",
    [
        ("dinov3_vits16plus", "vit_small_plus_patch16_dinov3.lvd1689m"),
        ("dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m"),
    ],
)
def test_dinov3_presets_give_normed_patch_tokens(name: str, model_name: str) -> None:
    """The features UPLiFT's DINOv3 variant takes: last block -> final norm -> patch tokens (CLS and the 4
    registers dropped), (B, 384, H/16, W/16), for non-square grids both ways (DINOv3 uses RoPE)."""
    import timm
    from timm.models import get_pretrained_cfg

    bb = load_backbone(name, "random")
    pcfg = get_pretrained_cfg(model_name)
    assert bb.cfg.model_name == model_name and (bb.stride, bb.dim) == (16, 384)
    assert bb.mean == tuple(pcfg.mean) == (0.485, 0.456, 0.406) and bb.std == tuple(pcfg.std) == (0.229, 0.224, 0.225)
    # a separate timm model with the preset's weights; its forward_features ends with model.norm on all tokens
    ref = timm.create_model(model_name.split(".")[0], pretrained=False, dynamic_img_size=True).eval()
    ref.load_state_dict(bb.model.state_dict())
    assert ref.cls_token.shape[1] == 1 and ref.reg_token.shape[1] == 4 and ref.num_prefix_tokens == 5
    gen = torch.Generator().manual_seed(0)
    for h, w in ((2, 3), (3, 2)):
        x = torch.randn(2, 3, 16 * h, 16 * w, generator=gen)
        with torch.no_grad():
            got = bb(x)
            tokens = ref.forward_features(x)
        assert tokens.shape == (2, 5 + h * w, 384)
        want = tokens[:, 5:].reshape(2, h, w, 384).permute(0, 3, 1, 2)
        assert got.shape == (2, 384, h, w)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.std() > 0.1 and (got[0] - got[1]).abs().max() > 0.1


def test_backbone_stays_frozen_in_eval_inside_train_mode(lite0_random: Backbone) -> None:
    parent = torch.nn.Sequential(lite0_random)
    parent.train()
    assert not lite0_random.training and not any(m.training for m in lite0_random.modules())
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    lite0_random(x).sum().backward()  # gradients reach the input, never the frozen weights
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0_random.parameters())


@pytest.mark.parametrize("name,stride,dim", [("vit_tiny_patch16_224", 16, 192), ("resnet18", 32, 512)])
def test_any_timm_model_with_dense_features(name: str, stride: int, dim: int) -> None:
    bb = load_backbone(name, "random")
    assert (bb.stride, bb.dim) == (stride, dim)
    with torch.no_grad():
        y = bb(torch.randn(1, 3, 3 * stride, 5 * stride))
    assert y.shape == (1, dim, 3, 5)


def test_input_size_error_names_size_and_nearest_valid(lite0_random: Backbone) -> None:
    with pytest.raises(InputSizeError, match=r"230x100.*stride 32.*224x96 or 256x128") as err:
        lite0_random(torch.randn(1, 3, 230, 100))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(InputSizeError, match=r"\(B, 3, H, W\)"):
        lite0_random(torch.randn(1, 4, 64, 64))
    assert nearest_valid_sizes(20, 14) == (14, 28) and nearest_valid_sizes(5, 16) == (16, 16)


def test_unknown_backbone_lists_presets_and_suggests() -> None:
    with pytest.raises(UnknownBackboneError) as err:
        load_backbone("dinov2_vits16", "random")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FeatupError)
    assert "'dinov2_vits14'" in msg.split("did you mean")[1]  # ('dinov3_vits16' is suggested too)
    assert all(name in msg for name in list_backbones())


def _digest(bb: Backbone) -> str:
    h = hashlib.sha256()
    for key, value in bb.model.state_dict().items():
        h.update(key.encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()


def test_random_weights_deterministic_across_builds(lite0_random: Backbone) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = load_backbone("efficientnet_lite0", "random")
    assert torch.equal(torch.get_rng_state(), state), "building must not consume the caller's RNG"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(lite0_random(x), again(x))
    # same architecture, other name -> other weights (another process: see the fresh-process test below)
    other = load_backbone("tf_efficientnet_lite0", "random")
    assert not torch.equal(lite0_random.model.conv_stem.weight, other.model.conv_stem.weight)


def test_timm_weights_offline_fail_fast_with_one_line() -> None:
    import timm  # noqa: F401  (the clock times the look-up, not the import of timm)

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone("dino_vits16")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
    assert "model.safetensors" in msg and "timm/vit_small_patch16_224.dino" in msg and "--weights" in msg


def test_fresh_process_hf_cache_unreachable_hub_and_random(tmp_path: Path, lite0_random: Backbone) -> None:
    """In a fresh process with HF_HUB_OFFLINE unset and the Hub pointed at a closed loopback port: a cached file
    loads through timm; an uncached one fails within seconds naming the file; "random" weights equal this process's."""
    script = textwrap.dedent(
        """
        import json, time, torch, timm
        from pathlib import Path
        from safetensors.torch import save_file
        from featup_ops.backbones import load_backbone
        from featup_ops.errors import WeightsNotFoundError
        cache = Path(__import__("os").environ["HF_HUB_CACHE"])
        snap = cache / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots" / "0123abcd"
        snap.mkdir(parents=True)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("0123abcd")
        torch.manual_seed(7)
        ref = timm.create_model("tf_efficientnet_lite0").eval()
        save_file(ref.state_dict(), str(snap / "model.safetensors"))
        bb = load_backbone("efficientnet_lite0", "timm")
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            want = ref.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
            same = bool(torch.allclose(bb(x), want, atol=1e-6))
        start = time.monotonic()
        try:
            load_backbone("resnet50")
            msg = "no error"
        except WeightsNotFoundError as e:
            msg = str(e)
        secs = time.monotonic() - start
        rnd, h = load_backbone("efficientnet_lite0", "random"), __import__("hashlib").sha256()
        for k, v in rnd.model.state_dict().items():
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
        print(json.dumps({"hash": bb.weights_hash, "same": same, "msg": msg, "secs": secs, "random": h.hexdigest()}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HOME")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["hash"] == "timm:tf_efficientnet_lite0.in1k" and res["same"]
    assert "unreachable" in res["msg"] and "timm/resnet50.tv_in1k" in res["msg"] and "\n" not in res["msg"]
    assert res["secs"] < 10
    assert res["random"] == _digest(lite0_random)  # two processes build the same "random" backbone


def test_packaged_efficientnet_lite0_weights(lite0: Backbone, samples_dir: Path) -> None:
    import timm

    state_dict, sha, spec = load_packaged_state_dict("efficientnet_lite0")
    assert lite0.weights_hash == f"sha256:{sha}" and spec is PACKAGED_WEIGHTS["efficientnet_lite0"]
    full = timm.create_model("tf_efficientnet_lite0").eval()
    mapped = map_in_order(state_dict, full.state_dict(), what="packaged", owner="tf_efficientnet_lite0")
    assert len(mapped) == len(state_dict) == len(full.state_dict())  # every tensor mapped, shapes checked pairwise
    full.load_state_dict(mapped, strict=True)

    bird = _photo(samples_dir / "bird_full.jpg", 224, lite0)
    cones = _photo(samples_dir / "cones2.jpg", 224, lite0)
    with torch.no_grad():
        f_bird, f_cones, f_bird2 = lite0(bird), lite0(cones), lite0(bird.clone())
        logits = full(bird)
        f_full = full.forward_intermediates(bird, indices=[-1], intermediates_only=True)[0]
    assert f_bird.shape == (1, 320, 7, 7)
    assert torch.equal(f_bird, f_bird2)  # deterministic
    assert torch.allclose(f_bird, f_full, atol=1e-5)  # the pruned backbone is the classifier's trunk
    rel = (f_bird - f_cones).norm() / f_bird.norm()
    assert rel > 0.5, f"features of two different photos differ by only {rel:.2f}"
    assert int(logits.argmax()) in BIRD_CLASSES  # the real weights recognise the bird


def test_weights_file_round_trip_local_and_s3(lite0_random: Backbone, tmp_path: Path, s3_bucket: str) -> None:
    import s3fs
    from safetensors.torch import save_file

    sd = lite0_random.model.state_dict()
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(sd, str(st))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, pth)  # a typical training checkpoint
    s3_uri = f"{s3_bucket}/weights/w.safetensors"
    s3fs.S3FileSystem().put_file(str(st), s3_uri)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        want = lite0_random(x)
    for source in (st, pth, s3_uri):
        bb = load_backbone("efficientnet_lite0", source)
        data = st.read_bytes() if source != pth else pth.read_bytes()
        assert bb.weights_hash == f"sha256:{hashlib.sha256(data).hexdigest()}"
        with torch.no_grad():
            assert torch.equal(bb(x), want), source


def test_weights_file_errors(lite0_random: Backbone, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(WeightsNotFoundError, match="does not exist") as err:
        load_backbone("efficientnet_lite0", tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError)

    sd = dict(lite0_random.model.state_dict())
    del sd["blocks.0.0.conv_dw.weight"]
    sd["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone("efficientnet_lite0", bad)
    msg = str(err.value)
    assert "missing keys: blocks.0.0.conv_dw.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "conv_stem.weight (8, 3, 3, 3) vs (32, 3, 3, 3)" in msg

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not weights" * 10)
    with pytest.raises(WeightsMismatchError, match="neither safetensors nor a torch file"):
        load_backbone("efficientnet_lite0", junk)
    with pytest.raises(WeightsNotFoundError, match="no packaged weights"):
        load_backbone("resnet50", "packaged")
