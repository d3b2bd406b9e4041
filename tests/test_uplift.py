"""UPLiFT against the upstream's golden outputs (tests/fixtures/uplift), its output-size rule, and its refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featup_ops.errors import CheckpointError, ConfigError, InputSizeError
from featup_ops.tensor_files import read_tensor_file
from featup_ops.uplift import UPLIFT_VARIANTS, UpliftUpsampler, load_uplift, uplift_steps_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "uplift"
WEIGHTS = FIXTURES / "uplift_dinov2-s14.safetensors"
ATOL = RTOL = 1e-4  # float32 against the upstream's float32 outputs
F64_ATOL = 4e-6  # the upstream's own float64 run is within 3.7e-6 of its float32 outputs
PREFIX = {"dinov2-s14": "p14", "dinov3-splus16": "p16"}

#: (variant, steps, output_size, fixture output): every output of the fixture.
CASES = [
    ("dinov2-s14", 1, None, "p14_step1"),
    ("dinov2-s14", 2, None, "p14_step2"),
    ("dinov2-s14", 3, None, "p14_step3"),
    ("dinov2-s14", 4, None, "p14_step4"),
    ("dinov2-s14", 3, (14, 21), "p14_iters3_outsize_14x21"),
    ("dinov3-splus16", 1, None, "p16_step1"),
    ("dinov3-splus16", 2, None, "p16_step2"),
]


@pytest.fixture(scope="module")
def file_obj() -> dict:
    return read_tensor_file(WEIGHTS.read_bytes(), repr(str(WEIGHTS)))


@pytest.fixture(scope="module")
def ups(file_obj) -> dict[str, UpliftUpsampler]:
    return {v: load_uplift(file_obj, variant=v, name="fixture") for v in UPLIFT_VARIANTS}


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "inputs.safetensors")


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs.safetensors")


def _args(inputs: dict, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = PREFIX[variant]
    return inputs[f"{p}_lr_feats"], inputs[f"{p}_image"]


@pytest.mark.parametrize(("variant", "steps", "size", "key"), CASES, ids=[c[3] for c in CASES])
def test_matches_upstream_float32(ups, inputs, outputs, variant, steps, size, key) -> None:
    feats, image = _args(inputs, variant)
    with torch.no_grad():
        out = ups[variant](feats, image, size, steps=steps)
    assert out.dtype == torch.float32 and out.shape == outputs[key].shape
    torch.testing.assert_close(out, outputs[key], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("variant", "size", "key"),
    [
        ("dinov2-s14", (4, 6), "p14_step1"),
        ("dinov2-s14", (32, 48), "p14_step4"),
        ("dinov2-s14", (14, 21), "p14_iters3_outsize_14x21"),  # 3 steps reach 16x24 >= 14x21, then the resize
        ("dinov3-splus16", (8, 12), "p16_step2"),
    ],
)
def test_output_size_runs_the_fewest_steps(ups, inputs, outputs, variant, size, key) -> None:
    feats, image = _args(inputs, variant)
    with torch.no_grad():
        out = ups[variant](feats, image, size)
    torch.testing.assert_close(out, outputs[key], atol=ATOL, rtol=RTOL)


def test_steps_for() -> None:
    assert uplift_steps_for((2, 3), (2, 3)) == 0
    assert uplift_steps_for((2, 3), (4, 6)) == 1
    assert uplift_steps_for((2, 3), (4, 7)) == 2  # the wider axis decides
    assert uplift_steps_for((2, 3), (28, 42)) == 4
    assert uplift_steps_for((2, 3), (33, 3)) == 5


def test_default_size_is_the_image_after_the_final_resize(ups, inputs) -> None:
    feats, image = _args(inputs, "dinov2-s14")  # image 28x42: 4 steps reach 32x48, then resized to 28x42
    with torch.no_grad():
        out = ups["dinov2-s14"](feats, image)
        explicit = ups["dinov2-s14"](feats, image, (28, 42), steps=4)
        step4 = ups["dinov2-s14"](feats, image, steps=4)
    assert out.shape == (1, 384, 28, 42) and step4.shape == (1, 384, 32, 48)
    assert torch.equal(out, explicit)
    assert (out - torch.nn.functional.interpolate(step4, size=(28, 42), mode="bilinear")).abs().max() > 1e-3


@pytest.mark.parametrize(("variant", "steps", "size", "key"), CASES, ids=[c[3] for c in CASES])
def test_float64_agrees_with_float32_fixture(file_obj, inputs, outputs, variant, steps, size, key) -> None:
    up = load_uplift(file_obj, variant=variant, name="fixture").double()
    feats, image = _args(inputs, variant)
    with torch.no_grad():
        out = up(feats.double(), image.double(), size, steps=steps)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, outputs[key].double(), atol=F64_ATOL, rtol=0)


def test_each_output_is_a_convex_combination_of_the_features(ups, inputs) -> None:
    feats, image = _args(inputs, "dinov3-splus16")
    with torch.no_grad():
        out = ups["dinov3-splus16"](feats, image, steps=2)
    lo, hi = feats.amin(dim=(2, 3), keepdim=True), feats.amax(dim=(2, 3), keepdim=True)
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_batch_rows_equal_each_image_alone_and_train_mode_changes_nothing(ups, inputs) -> None:
    up = ups["dinov3-splus16"]
    feats, image = _args(inputs, "dinov3-splus16")
    feats2 = torch.cat([feats, 0.5 * feats.flip(-1)])
    image2 = torch.cat([image, image.flip(-1)])
    with torch.no_grad():
        both = up(feats2, image2, (20, 30))
        alone = torch.cat([up(feats2[i : i + 1], image2[i : i + 1], (20, 30)) for i in range(2)])
        up.train()
        try:
            trained = up(feats2, image2, (20, 30))  # BatchNorm keeps its running statistics
        finally:
            up.eval()
    assert both.shape == (2, 384, 20, 30)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)  # float32 conv order noise (measured 3.6e-6)
    assert torch.equal(trained, both)
    assert (both[0] - both[1]).abs().max() > 0.1


def test_forward_is_upsample_prepared_of_prepare_lowres(ups, inputs) -> None:
    up = ups["dinov2-s14"]
    feats, image = _args(inputs, "dinov2-s14")
    assert up.prepare_lowres(feats) is feats
    with torch.no_grad():
        assert torch.equal(up(feats, image, (16, 24)), up.upsample_prepared(up.prepare_lowres(feats), image, (16, 24)))


def test_returns_lowres_dtype_and_zero_steps_is_identity(ups, inputs) -> None:
    up = ups["dinov3-splus16"]
    feats, image = _args(inputs, "dinov3-splus16")
    with torch.no_grad():
        half = up(feats.half(), image, (8, 12))
        same = up(feats, image, (2, 3))
    assert half.dtype == torch.float16 and half.shape == (1, 384, 8, 12)
    assert torch.equal(same, feats)


def test_bfloat16_module_runs_both_resizes(file_obj, inputs, outputs) -> None:
    up = load_uplift(file_obj, variant="dinov2-s14", name="fixture").to(torch.bfloat16)
    feats, image = _args(inputs, "dinov2-s14")  # pre-scale and final resize: antialias kernels lack bf16 on CPU
    with torch.no_grad():
        out = up(feats.bfloat16(), image.bfloat16(), (14, 21))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), outputs["p14_iters3_outsize_14x21"], atol=0.1, rtol=0.05)


def test_protocol_attributes_and_config_round_trip(ups) -> None:
    for variant, up in ups.items():
        assert up.kind == "uplift" and up.dim == 384 and up.lowres_normalized is False and not up.training
        assert up.patch_size == UPLIFT_VARIANTS[variant]
        cfg = up.config_dict()
        assert cfg == {"kind": "uplift", "variant": variant, "dim": 384}
        rebuilt = UpliftUpsampler(**{k: v for k, v in cfg.items() if k != "kind"})
        assert rebuilt.config_dict() == cfg
        assert list(rebuilt.state_dict()) == list(up.state_dict())
    assert len(ups["dinov2-s14"].state_dict()) == 72
    assert sum(p.numel() for p in ups["dinov2-s14"].parameters()) == 789_521


def test_file_layout_loads_strictly(file_obj) -> None:
    assert len(file_obj) == 72
    assert file_obj["encoder.block_0.blocks.0.conv.1.num_batches_tracked"].dtype == torch.float32
    up = load_uplift(file_obj, variant="dinov2-s14", name="fixture")
    for key, value in up.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, file_obj[key]), key


@pytest.mark.parametrize(
    ("edit", "key", "what"),
    [
        ("drop", "decoder.up_1.up.bias", "missing keys"),
        ("add", "decoder.up_2.up.weight", "unexpected keys"),
        ("reshape", "attender.conv1.weight", "shape mismatches"),
    ],
)
def test_wrong_keys_refused_in_one_line(file_obj, edit, key, what) -> None:
    obj = dict(file_obj)
    if edit == "drop":
        del obj[key]
    elif edit == "add":
        obj[key] = torch.zeros(64, 64, 2, 2)
    else:
        obj[key] = torch.zeros(16, 64, 1, 1)
    with pytest.raises(CheckpointError) as err:
        load_uplift(obj, variant="dinov3-splus16", name="'bad.safetensors'")
    msg = str(err.value)
    assert "\n" not in msg and key in msg and what in msg and "'bad.safetensors'" in msg


def test_non_tensor_value_and_bad_variant_refused(file_obj) -> None:
    with pytest.raises(CheckpointError, match="attender.conv1.bias"):
        load_uplift({**file_obj, "attender.conv1.bias": [0.0] * 17}, variant="dinov2-s14", name="f")
    with pytest.raises(ConfigError, match="dinov2-s14, dinov3-splus16"):
        load_uplift(file_obj, variant="dinov2-b14", name="f")
    with pytest.raises(ConfigError, match="dim=384"):
        UpliftUpsampler("dinov2-s14", dim=768)


def test_wrong_channels_and_sizes_refused_in_one_line(ups, inputs) -> None:
    feats, image = _args(inputs, "dinov2-s14")
    up = ups["dinov2-s14"]
    with pytest.raises(InputSizeError) as err:
        up(feats[:, :383], image)
    assert "384" in str(err.value) and "383" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputSizeError) as err:  # the patch-16 image given to the patch-14 variant
        up(feats, _args(inputs, "dinov3-splus16")[1])
    msg = str(err.value)
    assert "32x48" in msg and "2x3" in msg and "28x42" in msg and "\n" not in msg
    with pytest.raises(InputSizeError, match="smaller than the feature grid"):
        up(feats, image, (1, 3))
    with pytest.raises(ConfigError, match="steps"):
        up(feats, image, steps=-1)
