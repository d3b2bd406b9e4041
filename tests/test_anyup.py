"""AnyUp against the upstream's golden outputs (tests/fixtures/anyup), dense and tiled; tiled == dense; strict
loading; batch independence; refusals. AnyUp by Thomas Wimmer et al., CC-BY-4.0, github.com/wimmerth/anyup."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featup_ops.anyup import (
    ANYUP_VARIANTS,
    AnyUpUpsampler,
    anyup_window_bounds,
    load_anyup,
)
from featup_ops.attention_tiles import rows_per_tile, tile_spans
from featup_ops.errors import CheckpointError, ConfigError, InputSizeError
from featup_ops.tensor_files import read_tensor_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "anyup"
WEIGHTS = FIXTURES / "anyup_paper.pth"
ATOL, RTOL = 2e-4, 1e-4  # float32 against the upstream's float32 outputs (fixture README)
F64_ATOL = 3e-5  # the upstream's own float64 run is within 1.5e-5 of its float32 outputs
TINY = 4096  # bytes: every step of the tiled path cut into many pieces at the fixtures' sizes
SMALL = 600_000  # bytes: encoder bands of a few rows, several attention tiles

#: fixture output -> (input prefix, output_size)
CASES = {
    "dinov2s_native": ("dinov2s", None),
    "generic_native": ("generic", None),
    "generic_out20x28": ("generic", (20, 28)),
    "generic_out45x105": ("generic", (45, 105)),
}


@pytest.fixture(scope="module")
def file_obj() -> dict:
    return read_tensor_file(WEIGHTS.read_bytes(), repr(str(WEIGHTS)))


@pytest.fixture(scope="module")
def model(file_obj) -> AnyUpUpsampler:
    return load_anyup(file_obj, variant="paper", name="fixture")


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "inputs.safetensors")


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs.safetensors")


def _run(model: AnyUpUpsampler, budget: int | None, *args, **kwargs) -> torch.Tensor:
    old = model.max_tile_bytes
    model.max_tile_bytes = budget
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.max_tile_bytes = old


@pytest.mark.parametrize("budget", [None, TINY], ids=["dense", "tiled"])
@pytest.mark.parametrize("key", list(CASES))
def test_matches_upstream_float32(model, inputs, outputs, key, budget) -> None:
    prefix, size = CASES[key]
    feats, image = inputs[f"{prefix}_lr_feats"], inputs[f"{prefix}_image"]
    if budget is not None:  # the tiled path really is cut up: encoder bands, feature chunks, attention tiles
        plan = AnyUpUpsampler(max_tile_bytes=budget).tile_plan(
            feats.shape[1], feats.shape[-2:], image.shape[-2:], size or image.shape[-2:]
        )
        assert plan.encoder_rows < image.shape[-2] and plan.feature_chunk < feats.shape[1]
        assert plan.tile_rows < (size or image.shape[-2:])[0]
    got = _run(model, budget, feats, image, size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, outputs[key], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("budget", [None, SMALL], ids=["dense", "tiled"])
def test_float64_matches_upstream(model, inputs, outputs, budget) -> None:
    got = _run(model, budget, inputs["generic_lr_feats"].double(), inputs["generic_image"].double(), (45, 105))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, outputs["generic_out45x105"].double(), atol=F64_ATOL, rtol=0)


def test_window_bounds_are_float32() -> None:
    # The reference computes the window in float32; exact arithmetic gives other bounds for e.g. h=10, Ho=15
    # (the generic_out45x105 case depends on the same rounding).
    n_out, n_in = 15, 10
    lo, hi = anyup_window_bounds(n_out, n_in)
    exact_lo = [max(0, (2 * i + 1) * n_in * 5 - n_out * n_in) // (10 * n_out) for i in range(n_out)]
    exact_hi = [min(n_in, -(-((2 * i + 1) * n_in * 5 + n_out * n_in) // (10 * n_out))) for i in range(n_out)]
    assert (lo.tolist(), hi.tolist()) != (exact_lo, exact_hi)
    assert all(a < b for a, b in zip(lo.tolist(), hi.tolist()))
    assert lo.tolist() == sorted(lo.tolist()) and hi.tolist() == sorted(hi.tolist())


def _random_model(seed: int) -> AnyUpUpsampler:
    """Random weights with a peaked attention (scaled in-projection) and non-trivial norms, like the fixture's."""
    gen = torch.Generator().manual_seed(seed)
    model = AnyUpUpsampler().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("in_proj_weight"):
                p.copy_(noise * 2.5 / p.shape[1] ** 0.5)
            elif p.dim() == 1:
                p.add_(noise * 0.2)
            elif p.dim() == 4 and name.endswith("weight"):
                p.copy_(noise / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
    return model


@pytest.mark.parametrize(
    ("budget", "encoders"),
    [(TINY, "bands"), (SMALL, "bands"), (5_000_000, "bands, image code kept"), (2**30, "whole")],
)
def test_tiled_equals_dense_random(budget, encoders) -> None:
    model = _random_model(0)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 24, 7, 9, generator=gen)
    image = torch.randn(1, 3, 40, 48, generator=gen)
    size = (45, 61)
    plan = AnyUpUpsampler(max_tile_bytes=budget).tile_plan(24, (7, 9), (40, 48), size)
    kind = "whole" if plan.encoder_rows >= 40 else "bands" + (", image code kept" if plan.keep_image_code else "")
    assert kind == encoders
    dense = _run(model, None, feats, image, size)
    tiled = _run(model, budget, feats, image, size)
    assert (tiled - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_output_is_convex_combination_of_features(model, inputs) -> None:
    feats = inputs["generic_lr_feats"]
    out = _run(model, TINY, feats, inputs["generic_image"], (20, 28))
    lo = feats.amin(dim=(2, 3))[..., None, None]
    hi = feats.amax(dim=(2, 3))[..., None, None]
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


@pytest.mark.parametrize("budget", [None, SMALL], ids=["dense", "tiled"])
def test_batch_rows_equal_each_alone(model, inputs, budget) -> None:
    feats, image = inputs["generic_lr_feats"], inputs["generic_image"]
    feats2 = torch.cat([feats, feats.flip(-1) * 1.5])
    image2 = torch.cat([image, image.flip(-2)])
    both = _run(model, budget, feats2, image2, (20, 28))
    for i in range(2):
        alone = _run(model, budget, feats2[i : i + 1], image2[i : i + 1], (20, 28))
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-6, rtol=1e-6)


def test_value_and_output_projections_are_loaded_but_unused(file_obj, inputs) -> None:
    model = load_anyup(file_obj, variant="multi-backbone", name="fixture")
    state = model.state_dict()
    for key in ("out_proj.weight", "out_proj.bias", "in_proj_weight"):
        key = f"cross_decode.cross_attn.attention.{key}"
        assert torch.equal(state[key], file_obj[key])
    args = (inputs["generic_lr_feats"], inputs["generic_image"], (20, 28))
    before = _run(model, None, *args)
    with torch.no_grad():
        model.cross_decode.cross_attn.attention.in_proj_weight[256:].normal_()
        model.cross_decode.cross_attn.attention.out_proj.weight.normal_()
    assert torch.equal(_run(model, None, *args), before)


def test_state_dict_is_the_published_layout(file_obj) -> None:
    assert set(AnyUpUpsampler().state_dict()) == set(file_obj) and len(file_obj) == 73
    assert set(ANYUP_VARIANTS) == {"paper", "multi-backbone"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d.pop("rope.freqs"), "missing keys: rope.freqs"),
        (lambda d: d.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys: extra.weight"),
        (lambda d: d.__setitem__("aggregation.0.weight", torch.zeros(128, 255, 3, 3)), "aggregation.0.weight"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_wrong_keys_refused(file_obj, change, named) -> None:
    bad = dict(file_obj)
    change(bad)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as err:
        load_anyup(bad, variant="paper", name="bad.pth")
    assert "\n" not in str(err.value) and "bad.pth" in str(err.value)


def test_bad_arguments_refused(model, inputs) -> None:
    with pytest.raises(ConfigError, match="variant"):
        AnyUpUpsampler("dinov2")
    with pytest.raises(ConfigError, match="max_tile_bytes"):
        AnyUpUpsampler(max_tile_bytes=0)
    with pytest.raises(InputSizeError, match="2x2"):
        model(torch.zeros(1, 8, 1, 5), torch.zeros(1, 3, 14, 70))
    with pytest.raises(InputSizeError, match="smaller than the feature grid"):
        model(inputs["generic_lr_feats"], inputs["generic_image"], (5, 28))


def test_config_dict_round_trip() -> None:
    up = AnyUpUpsampler("multi-backbone", max_tile_bytes=1 << 20)
    cfg = up.config_dict()
    assert cfg == {"kind": "anyup", "variant": "multi-backbone", "dim": None}
    again = AnyUpUpsampler.from_config_dict(cfg)
    assert again.variant == "multi-backbone" and again.dim is None and not again.lowres_normalized
    assert again.prepare_lowres(torch.ones(1, 2, 3, 3)).equal(torch.ones(1, 2, 3, 3))


def test_rows_per_tile_and_spans() -> None:
    assert rows_per_tile(100, 10, 250) == 25
    assert rows_per_tile(100, 10, 5) == 1  # at least one row
    assert rows_per_tile(100, 10, None) == 100
    assert rows_per_tile(10, 1, 10**9) == 10
    assert list(tile_spans(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ConfigError):
        rows_per_tile(10, 0, 100)
    with pytest.raises(ConfigError):
        rows_per_tile(10, 4, 0)
