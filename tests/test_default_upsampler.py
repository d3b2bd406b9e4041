"""The shipped JBU checkpoint, the per-backbone default upsampler, and the probe benchmark's scene composer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import featup_ops
from benchmarks.probe_scenes import compose_scene, make_scenes, split_halves, write_scene_folders
from featup_ops.defaults import SHIPPED_JBU, SHIPPED_JBU_HASH


def test_shipped_checkpoint_loads_with_its_config_and_hash():
    spec = featup_ops.default_upsampler_for("efficientnet_lite0")
    assert spec == "jbu:lite0"
    assert sum(f.stat().st_size for f in SHIPPED_JBU.iterdir()) < 1_000_000  # small enough to ship
    up = featup_ops.load_upsampler(spec)
    assert featup_ops.checkpoint_hash(SHIPPED_JBU) == up.checkpoint_hash == SHIPPED_JBU_HASH
    assert up.upsampler_spec == "jbu:lite0" and Path(up.weights_path) == SHIPPED_JBU
    cfg = up.config_dict()
    assert cfg["kind"] == "jbu" and cfg["dim"] is None and cfg["jbu"]["fixup"] is True
    assert up.channel_agnostic and up.checkpoint_meta["backbone"] == "efficientnet_lite0"
    feats, image = torch.randn(1, 5, 2, 2), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = up(feats, image)
    assert out.shape == (1, 5, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "backbone, spec",
    [("efficientnet_lite0", "jbu:lite0"), ("resnet50", "featup:resnet50"), ("dino_vits16", "featup:dino16"),
     ("dinov2_vits14", "uplift:dinov2-s14"), ("dinov2_vits14_reg", "anyup:multi-backbone"),
     ("clip_vitb16", "featup:clip"), ("vit_s16", "featup:vit"), ("convnext_tiny", "anyup:multi-backbone")],
)
def test_default_upsampler_per_backbone_is_a_published_one(backbone, spec):
    assert featup_ops.default_upsampler_for(backbone) == spec
    from featup_ops.upsampler_spec import parse_upsampler_spec

    parsed = parse_upsampler_spec(spec)  # every default names a registered kind and variant
    assert parsed.kind != "path" and parsed.text == spec


def _two_tone_photos(n: int, size: int) -> list[np.ndarray]:
    """Photo c: left half colour (c, 0, 0), right half colour (c, 1, 0) (landscape, so cut left/right)."""
    photos = []
    for c in range(n):
        p = np.zeros((size + 4, 2 * size + 8, 3), np.uint8)
        p[..., 0] = 10 * (c + 1)
        p[:, size + 4 :, 1] = 1
        photos.append(p)
    return photos


def test_scene_labels_name_the_photo_every_pixel_came_from():
    size = 16
    sources = [np.full((20, 24, 3), 10 * (c + 1), np.uint8) for c in range(5)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label = compose_scene(sources, size, rng)
        assert image.shape == (size, size, 3) and label.shape == (size, size) and label.dtype == np.uint8
        np.testing.assert_array_equal(image[..., 0], 10 * (label.astype(np.uint8) + 1))
        assert 2 <= len(np.unique(label)) <= 4


def test_train_and_test_scenes_come_from_different_halves(tmp_path):
    size = 16
    photos = _two_tone_photos(4, size)
    halves = split_halves(photos[0], size)
    assert all(min(h.shape[:2]) >= size for h in halves)
    scenes = make_scenes(photos, n_train=6, n_test=3, size=size, seed=1)
    (xtr, ytr), (xte, yte) = scenes["train"], scenes["test"]
    assert xtr.shape == (6, size, size, 3) and yte.shape == (3, size, size)
    assert not xtr[..., 1].any() and (xte[..., 1] == 1).all()  # first halves for training, second for testing
    np.testing.assert_array_equal(xte[..., 0], 10 * (yte + 1))
    again = make_scenes(photos, n_train=6, n_test=3, size=size, seed=1)
    np.testing.assert_array_equal(again["train"][1], ytr)
    dirs = write_scene_folders(scenes, tmp_path)
    from PIL import Image

    assert sorted(p.name for p in dirs["test"].iterdir()) == ["test_0000.png", "test_0001.png", "test_0002.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(dirs["labels"] / "train_0003.png")), ytr[3])


def test_training_folder_of_the_shipped_checkpoint_holds_no_probe_photo_and_ends_with_the_held_out_ones(tmp_path):
    from benchmarks.make_train_photos import write_train_photos
    from benchmarks.probe_scenes import PROBE_PHOTOS

    files = write_train_photos(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in files) and len(names) == 83
    assert names[-2:] == ["v_plant.jpg", "v_skate.jpg"]  # the job's --val-images 2 holds out the last rows
    assert not any(photo in name for name in names for photo in PROBE_PHOTOS)
