"""Upsampler checkpoints: round trips (local, s3), hashes, and every way a checkpoint can be wrong."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from featup_ops.checkpoint import (
    CONFIG_NAME,
    UPSAMPLER_KINDS,
    WEIGHTS_NAME,
    checkpoint_hash,
    load_upsampler,
    read_checkpoint_config,
    register_upsampler,
    save_upsampler,
)
from featup_ops.errors import CheckpointError, CheckpointNotFoundError, FeatupError


@register_upsampler("test-tiny")
class TinyUpsampler(nn.Module):
    """Stand-in upsampler: a 1x1 conv on the features plus a guidance-weighted term; any output size."""

    def __init__(self, channels: int = 4, extra: bool = False) -> None:
        super().__init__()
        self.channels, self.extra = channels, extra
        self.mix = nn.Conv2d(channels, channels, 1)
        self.register_buffer("gain", torch.ones(channels))
        if extra:
            self.more = nn.Parameter(torch.zeros(1))

    def forward(self, feats: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None):
        size = output_size or tuple(image.shape[-2:])
        up = nn.functional.interpolate(self.mix(feats), size=size, mode="bilinear", align_corners=False)
        guide = nn.functional.interpolate(image.mean(1, keepdim=True), size=size, mode="bilinear")
        return up * self.gain[None, :, None, None] + guide

    def config_dict(self) -> dict[str, Any]:
        return {"kind": "test-tiny", "channels": self.channels, "extra": self.extra}


def _trained(channels: int = 4, seed: int = 0) -> TinyUpsampler:
    torch.manual_seed(seed)
    up = TinyUpsampler(channels)
    with torch.no_grad():
        up.gain.uniform_(0.5, 1.5)
    return up


def test_round_trip_local(tmp_path: Path) -> None:
    up = _trained()
    feats, image = torch.randn(2, 4, 5, 7), torch.randn(2, 3, 20, 28)
    digest = save_upsampler(tmp_path / "ck", up, meta={"backbone": "efficientnet_lite0", "step": 12})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    loaded = load_upsampler(tmp_path / "ck")
    assert isinstance(loaded, TinyUpsampler) and not loaded.training
    assert loaded.checkpoint_meta == {"backbone": "efficientnet_lite0", "step": 12}
    assert loaded.checkpoint_hash == digest == checkpoint_hash(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(feats, image, (9, 11)), up(feats, image, (9, 11)))
    doc = read_checkpoint_config(tmp_path / "ck")
    assert doc["config"] == up.config_dict() and doc["tensors"]["gain"] == ["float32", [4]]


def test_hash_ignores_meta_and_follows_weights(tmp_path: Path) -> None:
    a = save_upsampler(tmp_path / "a", _trained(seed=0), meta={"step": 1})
    b = save_upsampler(tmp_path / "b", _trained(seed=0), meta={"step": 2})
    c = save_upsampler(tmp_path / "c", _trained(seed=1))
    d = save_upsampler(tmp_path / "d", _trained(channels=3, seed=0))
    assert a == b and len({a, c, d}) == 3


def test_round_trip_s3(s3_bucket: str) -> None:
    up = _trained()
    uri = f"{s3_bucket}/runs/r1/step_000100"
    digest = save_upsampler(uri, up, meta={"step": 100})
    loaded = load_upsampler(uri)
    assert checkpoint_hash(uri) == digest == loaded.checkpoint_hash
    feats, image = torch.randn(1, 4, 3, 3), torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(feats, image), up(feats, image))
    with pytest.raises(CheckpointNotFoundError):
        load_upsampler(f"{s3_bucket}/runs/none")


def test_real_upsamplers_round_trip(tmp_path: Path) -> None:
    from featup_ops.baselines import BilateralUpsampler, BilinearUpsampler
    from featup_ops.jbu import JBUUpsampler

    feats, image = torch.randn(1, 6, 4, 5), torch.randn(1, 3, 16, 20)
    for i, up in enumerate([JBUUpsampler(), JBUUpsampler(6), BilateralUpsampler(radius=1), BilinearUpsampler()]):
        with torch.no_grad():  # move every parameter off its initial value, as training would
            for p in up.parameters():
                p.add_(0.01 * torch.randn_like(p))
        up.eval()
        save_upsampler(tmp_path / str(i), up)
        loaded = load_upsampler(tmp_path / str(i))
        assert type(loaded) is type(up) and loaded.config_dict() == up.config_dict()
        with torch.no_grad():
            torch.testing.assert_close(loaded(feats, image), up(feats, image), rtol=0, atol=0)


def test_corrupted_weights_are_caught(tmp_path: Path) -> None:
    save_upsampler(tmp_path / "ck", _trained())
    weights = tmp_path / "ck" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_upsampler(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_upsampler(tmp_path / "ck")


def _edit_config(path: Path, **changes: Any) -> None:
    doc = json.loads((path / CONFIG_NAME).read_text())
    doc["config"].update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(doc))


def test_mismatched_checkpoint_names_keys(tmp_path: Path) -> None:
    save_upsampler(tmp_path / "ck", _trained(channels=4))
    _edit_config(tmp_path / "ck", channels=8, extra=True)
    with pytest.raises(CheckpointError) as err:
        load_upsampler(tmp_path / "ck")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FeatupError)
    assert "missing keys: more" in msg
    assert "mix.weight (4, 4, 1, 1) vs (8, 8, 1, 1)" in msg and "gain (4,) vs (8,)" in msg

    save_upsampler(tmp_path / "ck2", TinyUpsampler(4, extra=True))
    _edit_config(tmp_path / "ck2", extra=False)
    with pytest.raises(CheckpointError, match="unexpected keys: more"):
        load_upsampler(tmp_path / "ck2")


def test_unknown_kind_missing_dir_and_unsavable(tmp_path: Path) -> None:
    save_upsampler(tmp_path / "ck", _trained())
    _edit_config(tmp_path / "ck", kind="nope")
    with pytest.raises(CheckpointError, match=r"unknown upsampler kind 'nope'; known kinds: .*bilateral.*jbu"):
        load_upsampler(tmp_path / "ck")
    with pytest.raises(CheckpointNotFoundError) as err:
        load_upsampler(tmp_path / "missing")
    assert isinstance(err.value, FileNotFoundError) and "upsampler.json" in str(err.value)
    with pytest.raises(CheckpointError, match="no config_dict"):
        save_upsampler(tmp_path / "x", nn.Linear(2, 2))
    assert {"jbu", "bilateral", "bilinear", "test-tiny"} <= set(UPSAMPLER_KINDS)
