"""Published upsamplers through the whole pipeline (a real local Ray, real Zarr stores): the featurize job with
``KIND:VARIANT=PATH`` specs, what the store records, FeatUp's normalised low-res features stored as FeatUp hands them
out, on-read stores keeping the publisher's file and reading back equal to the materialized store, resume with
another spec refused, and the offline default refused in one line before any work."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import featup_ops
from pipeline.errors import StoreMismatchError
from pipeline.featurize import FeaturizeConfig, run_featurize
from pipeline import FeatureDataset
from pipeline.store import open_store, read_attrs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FIXTURES = Path(__file__).parent / "fixtures"
FEATUP_NORM = FIXTURES / "featup_jbu" / "dinov2_jbu_stack_norm.ckpt"
FEATUP_PLAIN = FIXTURES / "featup_jbu" / "dinov2_jbu_stack_no_norm.ckpt"
UPLIFT = FIXTURES / "uplift" / "uplift_dinov2-s14.safetensors"
SIZE = 56  # DINOv2 ViT-S/14: a 4x4 grid; FeatUp's stack gives 16x the grid = 64


def config(input: str, output: str, **kw) -> FeaturizeConfig:
    base = dict(backbone="dinov2_vits14", weights="random", input_size=SIZE, output_size=64, rows_per_shard=2,
                batch_size=2, dtype="float32", quiet=True, progress_interval_s=1)
    return FeaturizeConfig(input=input, output=output, **{**base, **kw})


@pytest.fixture(scope="module")
def photos(copy_samples, tmp_path_factory) -> Path:
    return copy_samples(tmp_path_factory.mktemp("published_in"), 3)


@pytest.fixture(scope="module")
def featup_stores(ray_local, photos, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("published")
    mat, comp = str(root / "featup_mat.zarr"), str(root / "featup_onread.zarr")
    spec = f"featup:dinov2={FEATUP_NORM}"
    run_featurize(config(str(photos), mat, upsampler=spec))
    run_featurize(config(str(photos), comp, upsampler=spec, hires="on-read"))
    return mat, comp


def test_store_records_the_spec_the_file_hash_and_normalised_lowres(featup_stores, photos):
    mat, _ = featup_stores
    attrs = read_attrs(open_store(mat))
    assert attrs["upsampler_spec"] == "featup:dinov2"
    assert attrs["upsampler_checkpoint_hash"] == hashlib.sha256(FEATUP_NORM.read_bytes()).hexdigest()
    assert attrs["lowres_normalized"] is True and attrs["upsampler"]["kind"] == "featup"
    assert attrs["upsampler_source"] == str(FEATUP_NORM)

    # what FeatUp hands its users: ChannelNorm(backbone(x)) low-res and the stack's output from it
    from pipeline.featurize.stages import featurize_pixels
    from pipeline.io.decode import decode_image

    g = open_store(mat)
    backbone = featup_ops.load_backbone("dinov2_vits14", "random").eval()
    up = featup_ops.load_upsampler(f"featup:dinov2={FEATUP_NORM}")
    uri = str(np.asarray(g["uri"][0]))
    pixels = decode_image(Path(uri).read_bytes(), size=(SIZE, SIZE), policy="crop").pixels[None]
    with torch.no_grad():
        raw = backbone(torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
                       .sub(torch.tensor(backbone.mean).view(1, 3, 1, 1)).div(torch.tensor(backbone.std).view(1, 3, 1, 1)))
    sd = torch.load(FEATUP_NORM, weights_only=True)["state_dict"]  # the file's ChannelNorm affine, read directly
    normed = torch.nn.functional.layer_norm(raw.permute(0, 2, 3, 1), (raw.shape[1],), sd["model.1.norm.weight"],
                                            sd["model.1.norm.bias"], eps=1e-5).permute(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(g["lowres"][0]), normed[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(g["lowres"][0]), raw[0].numpy(), atol=1e-2)
    low, high = featurize_pixels(pixels, backbone, up, output_size=(64, 64), batch_size=1)
    np.testing.assert_allclose(np.asarray(g["hires"][0]), high[0].numpy(), rtol=1e-5, atol=1e-5)


def test_on_read_store_keeps_the_publishers_file_and_reads_equal_to_materialized(featup_stores):
    mat, comp = featup_stores
    stored = list((Path(comp) / "upsampler").glob("*.ckpt"))
    assert [p.name for p in stored] == ["dinov2_jbu_stack_cocostuff.ckpt"]  # the publisher's file name and bytes
    assert stored[0].read_bytes() == FEATUP_NORM.read_bytes()
    a, b = FeatureDataset(mat, "hires"), FeatureDataset(comp, "hires")
    assert len(a) == len(b) == 3
    for i in range(3):
        torch.testing.assert_close(b[i]["features"], a[i]["features"], rtol=1e-4, atol=1e-4)
    other = FeatureDataset(comp, "hires", size=(72, 80))  # any size on read
    assert tuple(other[0]["features"].shape) == (384, 72, 80)


def test_resuming_with_another_spec_is_refused_naming_it(featup_stores, photos):
    mat, _ = featup_stores
    with pytest.raises(StoreMismatchError, match="upsampler_spec"):
        run_featurize(config(str(photos), mat, upsampler=f"featup:dinov2-no-norm={FEATUP_PLAIN}"))


def test_uplift_on_read_store_reads_back_at_any_size(ray_local, photos, tmp_path):
    out = str(tmp_path / "uplift.zarr")
    run_featurize(config(str(photos), out, upsampler=f"uplift:dinov2-s14={UPLIFT}", hires="on-read",
                         output_size=None))
    attrs = read_attrs(open_store(out))
    assert attrs["upsampler_spec"] == "uplift:dinov2-s14" and attrs["lowres_normalized"] is False
    ds = FeatureDataset(out, "hires", size=(40, 48))
    item = ds[1]["features"]
    assert tuple(item.shape) == (384, 40, 48) and torch.isfinite(item).all()


def test_offline_default_is_refused_in_one_line_before_any_work(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUP_PIPELINE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never.zarr"
    with pytest.raises(featup_ops.CheckpointNotFoundError, match=r"uplift:dinov2-s14=/path/to/uplift_dinov2-s14"):
        run_featurize(config(str(photos), str(out)))  # dinov2_vits14's default: uplift:dinov2-s14
    assert not out.exists()
    with pytest.raises(featup_ops.CheckpointError, match="patch-14 backbones but 'dino_vits16' has stride 16"):
        run_featurize(config(str(photos), str(out), backbone="dino_vits16", input_size=64,
                             upsampler=f"uplift:dinov2-s14={UPLIFT}"))
    assert not out.exists()


def test_the_file_is_read_once_on_the_driver_and_its_bytes_go_to_the_actors(photos, tmp_path):
    from pipeline.featurize.resolve import resolve_featurize
    from pipeline.featurize.stages import build_upsampler

    job = resolve_featurize(config(str(photos), str(tmp_path / "s.zarr"), upsampler=f"uplift:dinov2-s14={UPLIFT}"))
    assert job.model.upsampler_data == UPLIFT.read_bytes()
    import dataclasses

    # an actor on another node cannot read the driver's path, and needs not: it builds from the bytes it was sent
    spec = dataclasses.replace(job.model, upsampler=f"uplift:dinov2-s14={tmp_path / 'not-on-this-node.safetensors'}")
    up = build_upsampler(spec)
    assert up.checkpoint_hash == job.settings["upsampler_checkpoint_hash"]
