"""FeatUp's published JBU checkpoints computed as FeatUp computes them: the ``featup`` kind against FeatUp's outputs.

The golden data (tests/fixtures/featup_jbu/, see its README) are FeatUp's own float32 and float64 outputs of three
Lightning checkpoints on random weights: (a) DINOv2 layout with ChannelNorm, (b) the same without it, (c) ResNet-50
(C=2048) with ChannelNorm, stored at 4 channels on a lattice of every third pixel, with per-channel and per-pixel sums
of the full outputs. Every output of every case is checked here in float32, case a's also in float64; each is
computed once.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from featup_ops.errors import CheckpointError, ConfigError, InputSizeError
from featup_ops.featup_checkpoints import load_featup_checkpoint
from featup_ops.featup_hub import FEATUP_VARIANTS, FeatUpUpsampler, load_featup, to_featup_state_dict
from featup_ops.tensor_files import read_tensor_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIX = Path(__file__).parent / "fixtures" / "featup_jbu"
#: case stem -> (checkpoint file, variant, the outputs it holds)
CASES = {
    "dinov2_jbu_stack_norm": (
        "dinov2_jbu_stack_norm.ckpt", "dinov2",
        ("lowres_normed", "hires_256x256", "hires_224x224", "hires_224x160", "hires_112x224"),
    ),
    "dinov2_jbu_stack_no_norm": ("dinov2_jbu_stack_no_norm.ckpt", "dinov2-no-norm", ("hires_256x256", "hires_224x224")),
    "resnet50_jbu_stack_norm": ("resnet50_jbu_stack_norm.ckpt.xz", "resnet50", ("lowres_normed", "hires_112x112")),
}
OUTPUTS = [(stem, out) for stem, (_, _, outs) in CASES.items() for out in outs]
#: bounds on the points and the per-pixel channel sums (x the output's max |value|), and on the per-channel pixel sums
#: (x max |value| x H x W), float32 and float64 (README: FeatUp's own float32 run is within 7.4e-4 / 22.5 = 3.3e-5 of
#: its float64 one; an exact float64 re-implementation lands near 1e-14).
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-10)}
#: relative bound on the channel sums of squares (FeatUp's own float32 run: up to 1.1e-4 in case c)
SUMSQ_RTOL = {torch.float32: 1e-3, torch.float64: 1e-10}


@functools.cache
def reference(stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a case's safetensors file."""
    path = FIX / f"{stem}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fixture"])
    return load_file(str(path)), meta


@functools.cache
def upsampler(stem: str, dtype: torch.dtype) -> FeatUpUpsampler:
    file, variant, _ = CASES[stem]
    return load_featup(read_tensor_file((FIX / file).read_bytes(), file), variant=variant, name=file).to(dtype)


def _crop(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"lowres_raw\[:, :, 0:(\d+), 0:(\d+)\]", spec)
    assert m, spec
    return int(m.group(1)), int(m.group(2))


@functools.cache
def computed(stem: str, output: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's output reduced as the fixture stores it (points, sums; float64), computed once."""
    ref, meta = reference(stem)
    info = meta["outputs"][output]
    up = upsampler(stem, dtype)
    raw = ref["lowres_raw"].to(dtype)
    with torch.no_grad():
        if output == "lowres_normed":
            out = up.prepare_lowres(raw)
        else:
            h, w = _crop(info["input"])
            out = up(raw[:, :, :h, :w], ref["image"].to(dtype), tuple(info["full_shape"][2:]))
    assert tuple(out.shape) == tuple(info["full_shape"]) and out.dtype == dtype
    out = out.double()
    ch = ref["channels"]
    rows = ref.get(f"{output}.rows", torch.arange(out.shape[2]))
    cols = ref.get(f"{output}.cols", torch.arange(out.shape[3]))
    return {
        "points": out[:, ch][:, :, rows][:, :, :, cols],
        "pixel_sum": out.sum(1, keepdim=True)[:, :, rows][:, :, :, cols],
        "channel_sum": out.sum((0, 2, 3)),
        "channel_sumsq": out.square().sum((0, 2, 3)),
    }


def test_fixture_holds_the_outputs_tested() -> None:
    for stem, (_, variant, outs) in CASES.items():
        ref, meta = reference(stem)
        assert tuple(meta["outputs"]) == outs
        assert meta["use_norm"] == (not variant.endswith("-no-norm"))
        assert torch.equal(ref["channels"], torch.tensor(meta["channels"]))


#: every output in float32; float64 (the slow pure-torch path) on case a's outputs, which cover every stage plan,
#: the uneven pooling windows and the ChannelNorm (cases b and c add no float64-specific path; suite time matters)
RUNS = [(s, o, torch.float32) for s, o in OUTPUTS] + [
    (s, o, torch.float64) for s, o in OUTPUTS if s == "dinov2_jbu_stack_norm"
]


@pytest.mark.parametrize(("stem", "output", "dtype"), RUNS,
                         ids=[f"{s.removesuffix('.ckpt')}-{o}-{str(d).removeprefix('torch.')}" for s, o, d in RUNS])
def test_matches_featup(stem: str, output: str, dtype: torch.dtype) -> None:
    ref, meta = reference(stem)
    info = meta["outputs"][output]
    got = computed(stem, output, dtype)
    point_tol, sum_tol = TOL[dtype]
    big = info["max_abs"]
    h, w = info["full_shape"][2:]
    assert (got["points"] - ref[output]).abs().max().item() <= point_tol * big
    assert (got["channel_sum"] - ref[f"{output}.channel_sum"]).abs().max().item() <= sum_tol * big * h * w
    sumsq = ref[f"{output}.channel_sumsq"]
    assert ((got["channel_sumsq"] - sumsq).abs() / sumsq).max().item() <= SUMSQ_RTOL[dtype]
    if f"{output}.pixel_sum" in ref:
        assert (got["pixel_sum"] - ref[f"{output}.pixel_sum"]).abs().max().item() <= point_tol * big


def test_path_form_infers_the_variant_and_hashes_the_file(tmp_path: Path) -> None:
    import lzma

    xz = FIX / "resnet50_jbu_stack_norm.ckpt.xz"
    unpacked = tmp_path / "resnet50_jbu_stack_norm.ckpt"
    unpacked.write_bytes(lzma.decompress(xz.read_bytes()))
    for stem, path in (("dinov2_jbu_stack_norm", FIX / "dinov2_jbu_stack_norm.ckpt"),
                       ("dinov2_jbu_stack_no_norm", FIX / "dinov2_jbu_stack_no_norm.ckpt"),
                       ("resnet50_jbu_stack_norm", unpacked)):
        _, meta = reference(stem)
        up = load_featup_checkpoint(path)
        assert isinstance(up, FeatUpUpsampler) and not up.training
        assert up.variant == CASES[stem][1] == up.checkpoint_meta["variant"]
        assert up.lowres_normalized is meta["use_norm"] is up.checkpoint_meta["channel_norm"]
        assert up.checkpoint_hash == meta["ckpt_sha256"]
        assert up.config_dict() == {"kind": "featup", "variant": up.variant, "dim": meta["dim"]}
        same = upsampler(stem, torch.float32).state_dict()
        assert up.state_dict().keys() == same.keys()
        assert all(torch.equal(v, same[k]) for k, v in up.state_dict().items())


def test_forward_is_prepare_then_upsample() -> None:
    up = upsampler("dinov2_jbu_stack_norm", torch.float32)
    ref, _ = reference("dinov2_jbu_stack_norm")
    x = ref["lowres_raw"][:, :, :3, :2].repeat(2, 1, 1, 1)
    x[1] = -x[1]  # two different rows: a row's output must not depend on its batch-mate
    image = torch.nn.functional.avg_pool2d(ref["image"], 4).repeat(2, 1, 1, 1)[:, :, :48, :32]
    with torch.no_grad():
        prepared = up.prepare_lowres(x)
        out = up(x, image)
        assert torch.equal(out, up.upsample_prepared(prepared, image))
        assert out.shape == (2, 384, 48, 32)
        assert torch.equal(out[1:], up(x[1:], image[1:]))
    # ChannelNorm: zero mean over C at every pixel before the file's affine; the no-norm variant is the identity
    assert not torch.allclose(prepared, x)
    assert upsampler("dinov2_jbu_stack_no_norm", torch.float32).prepare_lowres(x) is x
    with pytest.raises(InputSizeError, match=r"lowres must be \(B, 384, h, w\)"):
        up.prepare_lowres(torch.zeros(1, 383, 2, 2))


def test_negative_files(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(CheckpointError) as err:
        load_featup_checkpoint(FIX / "dinov2_jbu_stack_missing_key.ckpt")
    assert "missing keys: upsampler.up3.sigma_spatial" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.chdir(tmp_path)
    payload = FIX / "payload_jbu_stack.ckpt"
    for load in (lambda: load_featup_checkpoint(payload, "dinov2_vits14"),
                 lambda: load_featup(read_tensor_file(payload.read_bytes(), "p"), variant="dinov2", name="p")):
        with pytest.raises(CheckpointError, match=r"holds a exec object") as err:
            load()
        assert "not loaded" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "PAYLOAD_RAN").exists() and list(tmp_path.iterdir()) == []


def test_variant_refusals() -> None:
    norm = read_tensor_file((FIX / "dinov2_jbu_stack_norm.ckpt").read_bytes(), "n.ckpt")
    no_norm = read_tensor_file((FIX / "dinov2_jbu_stack_no_norm.ckpt").read_bytes(), "nn.ckpt")
    cases = [
        (norm, "dinov2-no-norm", CheckpointError, "holds FeatUp's ChannelNorm .* use variant 'dinov2'"),
        (no_norm, "dinov2", CheckpointError, "has no ChannelNorm .* use variant 'dinov2-no-norm'"),
        (norm, "clip", CheckpointError, "upsamples 384-channel features but variant 'clip' is FeatUp's 512-channel"),
        (no_norm, "maskclip", ConfigError, "use variant 'maskclip-no-norm'"),
        (norm, "dinov3", ConfigError, "unknown variant 'dinov3'"),
    ]
    for obj, variant, error, message in cases:
        with pytest.raises(error, match=message) as err:
            load_featup(obj, variant=variant, name="f")
        assert "\n" not in str(err.value)
    # the dino16 and vit stacks have dinov2's shapes: the variant names the file, the tensors fit
    assert load_featup(no_norm, variant="vit-no-norm", name="f").config_dict()["variant"] == "vit-no-norm"


def test_variants_config_and_round_trip() -> None:
    assert "maskclip" not in FEATUP_VARIANTS and "maskclip-no-norm" in FEATUP_VARIANTS and len(FEATUP_VARIANTS) == 11
    up = upsampler("dinov2_jbu_stack_norm", torch.float32)
    rebuilt = FeatUpUpsampler.from_config_dict(up.config_dict())
    assert rebuilt.variant == "dinov2" and rebuilt.lowres_normalized and rebuilt.dim == 384
    with pytest.raises(ConfigError, match="has 384 channels"):
        FeatUpUpsampler.from_config_dict({"kind": "featup", "variant": "vit", "dim": 512})
    # FeatUp's layout written back loads to the same module (norm keys included), a bare state dict too
    exported = to_featup_state_dict(up)
    assert {"model.1.norm.weight", "upsampler.up4.sigma_spatial"} <= exported.keys() and len(exported) == 44
    again = load_featup(exported, variant="dinov2", name="exported")
    assert all(torch.equal(v, up.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_module(dtype: torch.dtype) -> None:
    # a module converted with .to(half) runs (the fix-up MLP in its own dtype) and stays near the float32 result
    up = load_featup(to_featup_state_dict(upsampler("dinov2_jbu_stack_norm", torch.float32)), variant="dinov2",
                     name="f")
    ref, _ = reference("dinov2_jbu_stack_norm")
    x, image = ref["lowres_raw"][:, :, :2, :3], torch.nn.functional.avg_pool2d(ref["image"], 7)[:, :, :32, :32]
    with torch.no_grad():
        full = up(x, image, (32, 48))
        half = up.to(dtype)(x.to(dtype), image.to(dtype), (32, 48))
    assert half.dtype == dtype and half.shape == full.shape
    assert (half.float() - full).abs().max().item() <= 0.05 * full.abs().max().item()
