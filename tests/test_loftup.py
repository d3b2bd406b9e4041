"""LoftUp: exact to the publisher's outputs (golden fixture), per image, tiled == dense, strict loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from featup_ops.errors import CheckpointError, ConfigError, InputSizeError
from featup_ops.loftup import (
    LOFTUP_VARIANTS,
    LoftUpUpsampler,
    load_loftup,
    loftup_tile_shape,
)
from featup_ops.tensor_files import read_tensor_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "loftup"
WEIGHTS = FIXTURES / "pytorch_model.bin.xz"
#: 4 MiB: tiles of 10x9 at 28x42 (3x5 tiles: interior ones, and partial ones at the bottom and right); 1 byte: 1x1.
BUDGETS = {"dense": None, "tiles-10x9": 4 * 2**20}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return dict(read_tensor_file(WEIGHTS.read_bytes(), str(WEIGHTS)))


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "inputs.safetensors")


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs.safetensors")


_MODELS: dict[tuple[int, int | None], LoftUpUpsampler] = {}


def _model(state, budget) -> LoftUpUpsampler:
    """The fixture's weights loaded once per tile budget (loading is the slow part of these small tests)."""
    key = (id(state), budget)
    if key not in _MODELS:
        _MODELS[key] = load_loftup(state, variant="dinov2s", name=str(WEIGHTS), max_tile_bytes=budget)
    return _MODELS[key]


def _shape(model: LoftUpUpsampler, batch: int, out: tuple[int, int]) -> tuple[int, int]:
    return model.tile_shape(batch=batch, out_h=out[0], out_w=out[1], dim=384, n_tokens=6, elem_bytes=4)


def test_budgets_force_the_tilings_the_tests_claim(state):
    assert _shape(_model(state, None), 1, (28, 42)) == (28, 42)
    assert _shape(_model(state, BUDGETS["tiles-10x9"]), 1, (28, 42)) == (10, 9)
    assert _shape(_model(state, BUDGETS["tiles-10x9"]), 1, (14, 21)) == (7, 7)
    assert _shape(_model(state, 1), 1, (28, 42)) == (1, 1)


def test_one_pixel_tiles_equal_dense(state, inputs):
    """The extreme tiling: every output pixel its own tile, with its 2-pixel halo (zero beyond the border)."""
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 4, 5, generator=gen)
    with torch.no_grad():
        want = _model(state, None)(inputs["batch2_lr_feats"], image)
        got = _model(state, 1)(inputs["batch2_lr_feats"], image)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("budget", BUDGETS, ids=list(BUDGETS))
def test_native_size_matches_the_publisher(state, inputs, outputs, budget):
    model = _model(state, BUDGETS[budget])
    with torch.no_grad():
        out = model(inputs["lr_feats"], inputs["image"])
    assert out.shape == (1, 384, 28, 42) and out.dtype == torch.float32
    torch.testing.assert_close(out, outputs["native"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", BUDGETS, ids=list(BUDGETS))
def test_output_size_resizes_the_guidance_like_the_publishers_example(state, inputs, outputs, budget):
    model = _model(state, BUDGETS[budget])
    with torch.no_grad():
        out = model(inputs["lr_feats"], inputs["image"], output_size=(14, 21))
        direct = model(inputs["lr_feats"], inputs["guide14x21"])
    torch.testing.assert_close(out, outputs["guide14x21"], atol=1e-4, rtol=0)
    # the module's resize of the 28x42 image is the fixture's guidance input, so both calls are the same computation
    assert torch.equal(out, direct)


def test_fixture_guidance_is_the_half_pixel_bilinear_resize(inputs):
    resized = F.interpolate(inputs["image"], size=(14, 21), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(resized, inputs["guide14x21"])


@pytest.mark.parametrize("budget", ["dense", "tiles-10x9"])
def test_a_row_does_not_depend_on_its_batch_mates(state, inputs, outputs, budget):
    """Each image is computed as the publisher computes it alone; the publisher's own batched call is not."""
    model = _model(state, BUDGETS[budget])
    with torch.no_grad():
        batch = model(inputs["batch2_lr_feats"], inputs["batch2_image"])
        first = model(inputs["lr_feats"], inputs["guide14x21"])
        second = model(inputs["second_lr_feats"], inputs["second_image"])
    torch.testing.assert_close(batch, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[:1], outputs["guide14x21"], atol=1e-4, rtol=0)
    # upstream scales colours over the whole batch: its batched rows are not the single-image results
    upstream_gap = (batch - outputs["batch2_guide14x21"]).abs().amax(dim=(1, 2, 3))
    assert (upstream_gap > 1.0).all(), upstream_gap


def test_tiled_equals_dense_at_a_larger_size(state):
    gen = torch.Generator().manual_seed(0)
    lowres, image = torch.randn(2, 384, 3, 4, generator=gen), torch.randn(2, 3, 40, 52, generator=gen)
    dense, tiled = _model(state, None), _model(state, 6 * 2**20)
    th, tw = tiled.tile_shape(batch=1, out_h=37, out_w=45, dim=384, n_tokens=12, elem_bytes=4)
    assert 37 / 4 < th < 37 / 2 and 45 / 4 < tw < 45 / 2  # 3x3 tiles or more
    with torch.no_grad():
        want = dense(lowres, image, output_size=(37, 45))
        got = tiled(lowres, image, output_size=(37, 45))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_forward_is_prepare_then_upsample(state, inputs):
    model = _model(state, BUDGETS["tiles-10x9"])
    lowres, image = inputs["lr_feats"], inputs["image"]
    with torch.no_grad():
        prepared = model.prepare_lowres(lowres)
        staged = model.upsample_prepared(prepared, image)
        whole = model(lowres, image)
    assert model.lowres_normalized
    want = F.layer_norm(lowres.permute(0, 2, 3, 1), (384,), state["channelnorm.norm.weight"],
                        state["channelnorm.norm.bias"], 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(prepared, want)
    assert torch.equal(staged, whole)


def test_float64_run_stays_near_the_float32_reference(state, inputs, outputs):
    model = load_loftup(state, variant="dinov2s", name=str(WEIGHTS), max_tile_bytes=None).double()
    with torch.no_grad():
        out = model(inputs["lr_feats"].double(), inputs["image"].double())
    assert out.dtype == torch.float64
    diff = (out - outputs["native"].double()).abs()
    assert diff.max() < 1e-2 and diff.mean() < 1e-3


@pytest.mark.parametrize("key", ["upsampler.lr_pe.biases", "channelnorm.norm.bias"])
def test_a_missing_key_is_refused_by_name(state, key):
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing keys: .*{key}"):
        load_loftup(broken, variant="dinov2s", name="f.bin")


def test_an_unexpected_key_is_refused_by_name(state):
    with pytest.raises(CheckpointError, match="unexpected keys: .*upsampler.extra.weight"):
        load_loftup({**state, "upsampler.extra.weight": torch.zeros(1)}, variant="dinov2s", name="f.bin")


def test_a_file_of_another_width_is_refused(state):
    with pytest.raises(CheckpointError, match=r"f\.bin does not fit variant 'dinov2b' \(D=768\).*D=384"):
        load_loftup(state, variant="dinov2b", name="f.bin")


def test_wrong_channel_count_is_refused(state, inputs):
    model = _model(state, None)
    with pytest.raises(InputSizeError, match="384 channels but lowres has 383"):
        model(torch.randn(1, 383, 2, 3), inputs["image"])
    with pytest.raises(InputSizeError, match="384 channels but feats have 383"):
        model.upsample_prepared(torch.randn(1, 383, 2, 3), inputs["image"])


def test_every_variant_builds_with_random_weights_and_the_published_key_layout(state):
    assert {v: LOFTUP_VARIANTS[v].dim for v in LOFTUP_VARIANTS} == {
        "dinov2s": 384, "dinov2s-reg": 384, "dinov2b": 768, "dinov2b-reg": 768, "clip": 512, "siglip": 768,
        "siglip2": 768,
    }
    small = LoftUpUpsampler(variant="dinov2s")
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    # parameter counts of the publisher's table (CLIP 512, the 768 models)
    assert sum(p.numel() for p in LoftUpUpsampler("clip").parameters()) == 7_165_462
    assert sum(p.numel() for p in LoftUpUpsampler(dim=768).parameters()) == 15_051_286
    cfg = LoftUpUpsampler("siglip2").config_dict()
    assert cfg == {"kind": "loftup", "variant": "siglip2", "dim": 768}
    assert LoftUpUpsampler.from_config_dict(cfg).dim == 768
    assert LoftUpUpsampler(dim=64).config_dict() == {"kind": "loftup", "variant": "custom", "dim": 64}


def test_random_model_runs_at_an_arbitrary_size():
    model = LoftUpUpsampler(dim=44, max_tile_bytes=2**20).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 44, 3, 3), torch.randn(2, 3, 21, 21), output_size=(30, 17))
    assert out.shape == (2, 44, 30, 17) and torch.isfinite(out).all()


def test_bad_construction_is_refused():
    with pytest.raises(ConfigError, match="unknown variant 'dinov3'"):
        LoftUpUpsampler("dinov3")
    with pytest.raises(ConfigError, match="D=384, not dim=768"):
        LoftUpUpsampler("dinov2s", dim=768)
    with pytest.raises(ConfigError, match="max_tile_bytes"):
        LoftUpUpsampler("dinov2s", max_tile_bytes=0)


def test_tile_shape_follows_the_budget():
    kw = dict(batch=1, out_h=448, out_w=448, dim=384, n_tokens=1024, elem_bytes=4)
    assert loftup_tile_shape(None, **kw) == (448, 448)
    assert loftup_tile_shape(1, **kw) == (1, 1)
    small, large = loftup_tile_shape(64 * 2**20, **kw), loftup_tile_shape(256 * 2**20, **kw)
    assert 1 < small[0] * small[1] < large[0] * large[1] < 448 * 448
    for t in large:  # evened out: the last tile is not a thin remainder
        assert 448 - (-(-448 // t) - 1) * t > t // 2
    two = loftup_tile_shape(256 * 2**20, **{**kw, "batch": 2})
    assert two[0] * two[1] < large[0] * large[1]
    # a narrow output gets full-width bands
    assert loftup_tile_shape(256 * 2**20, **{**kw, "out_w": 40})[1] == 40
