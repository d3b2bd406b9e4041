"""End to end through a real local Ray: local -> local with every bad-input kind, features equal to featup_ops run
directly, resume after a crash mid-shard (identical store), settings mismatch refused, s3:// -> s3:// with PCA."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import InputNotFoundError, StoreMismatchError
from pipeline.featurize import FeaturizeConfig, run_featurize
from pipeline.store import open_store, read_attrs, store_summary

from test_decode import corrupt_png, png_header_only

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # a multiple of efficientnet_lite0's stride 32; small keeps the test fast
ARRAYS = ("image_id", "uri", "error", "orig_size", "valid_size", "lowres", "hires", "status")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, samples_dir):
    """Real photos plus one file of every bad-input kind. Expected outcome per file name: reason or None (good)."""
    d = tmp_path_factory.mktemp("inputs")
    photo = (samples_dir / "skate.jpg").read_bytes()
    rgb = Image.open(io.BytesIO(photo)).convert("RGB").resize((80, 60))
    grey16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    files = {
        "a_photo.jpg": (photo, None),
        "b_corrupt.png": (corrupt_png(), "corrupt"),
        "c_truncated.jpg": (photo[: len(photo) // 3], "truncated"),
        "d_empty.jpg": (b"", "empty"),
        "e_text.jpg": (b"this is a text file\n", "not an image"),
        "f_cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), None),
        "g_16bit.png": (encode(grey16, "PNG"), None),
        "h_grey.png": (encode(rgb.convert("L"), "PNG"), None),
        "i_rgba.png": (encode(rgba, "PNG"), None),
        "j_tiny.png": (encode(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG"), "too small"),
        "k_huge.png": (png_header_only(30_000, 30_000), "too large"),
        "l_photo.jpg": ((samples_dir / "cones2.jpg").read_bytes(), None),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return d, {name: reason for name, (_, reason) in files.items()}


def config(input: str, output: str, **kw) -> FeaturizeConfig:
    base = dict(weights="random", input_size=SIZE, rows_per_shard=3, batch_size=4, quiet=True, progress_interval_s=1)
    return FeaturizeConfig(input=input, output=output, **{**base, **kw})


@pytest.fixture(scope="module")
def clean_run(ray_local, bad_folder, tmp_path_factory):
    folder, _ = bad_folder
    out = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    result = run_featurize(config(str(folder), out))
    return out, result


def test_bad_inputs_become_failed_rows_and_the_job_finishes(clean_run, bad_folder):
    out, result = clean_run
    _, expected = bad_folder
    n_bad = sum(r is not None for r in expected.values())
    assert result["rows"] == len(expected) and result["pending"] == 0
    assert result["failed"] == n_bad and result["complete"] == len(expected) - n_bad
    g = open_store(out)
    ids = list(g["image_id"][:])
    assert ids == sorted(expected)
    status, errors = g["status"][:], g["error"][:]
    for i, name in enumerate(ids):
        reason = expected[name]
        if reason is None:
            assert status[i] == 1 and errors[i] == "", name
            assert np.abs(g["hires"][i]).max() > 0, name
        else:
            assert status[i] == 2 and reason in errors[i], (name, errors[i])
            assert not np.any(g["hires"][i]), name
    assert "5 failed" in store_summary(out) or f"{n_bad} failed" in store_summary(out)


def test_stored_features_equal_featup_ops_run_directly(clean_run, bad_folder):
    import featup_ops

    from pipeline.io.decode import decode_image, normalize

    out, _ = clean_run
    folder, _ = bad_folder
    g = open_store(out)
    attrs = read_attrs(g)
    up = _default_upsampler()  # no --upsampler: the shipped JBU checkpoint, recorded by config and hash
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["upsampler"] == up.config_dict()
    assert attrs["upsampler_checkpoint_hash"] == up.checkpoint_hash
    backbone = featup_ops.load_backbone("efficientnet_lite0", "random")
    rows = [0, 5, 8]  # a photo, CMYK, RGBA
    px = np.stack([decode_image((folder / str(g["image_id"][r])).read_bytes(), size=(SIZE, SIZE)).pixels for r in rows])
    with torch.inference_mode():
        x = normalize(px, backbone.mean, backbone.std)
        low = backbone(x)
        high = up(low, x)
    for k, r in enumerate(rows):
        stored_low = torch.from_numpy(g["lowres"][r].astype(np.float32))
        stored_high = torch.from_numpy(g["hires"][r].astype(np.float32))
        torch.testing.assert_close(stored_low, low[k], rtol=1e-2, atol=1e-2 * float(low[k].abs().max()))
        torch.testing.assert_close(stored_high, high[k], rtol=1e-2, atol=1e-2 * float(high[k].abs().max()))


def test_s3_to_s3_resume_after_crash_mid_shard_gives_identical_store(clean_run, bad_folder, s3_bucket, tmp_path):
    import shutil

    import s3fs

    from pipeline.featurize.resolve import resolve_featurize
    from pipeline.store.sink import ZarrFeatureDatasink

    folder, _ = bad_folder
    clean, _ = clean_run
    fs = s3fs.S3FileSystem()
    fs.put(str(folder) + "/", s3_bucket[len("s3://"):] + "/in/", recursive=True)
    src, out = f"{s3_bucket}/in", f"{s3_bucket}/feats/resumed.zarr"
    # The first run is a separate job process (its own local Ray) whose write of shard 1's status really fails: the
    # store is made first (as the sink's on_write_start makes it) and the key of that status chunk is taken by a
    # folder. The features of shard 1 are written, its status is not, as a crash mid-shard leaves them.
    torn = str(tmp_path / "torn.zarr")
    job = resolve_featurize(config(src, torn))
    ZarrFeatureDatasink(torn, job.schema, job.settings, extra_attrs=job.extra_attrs).on_write_start()
    blocker = Path(torn) / "status" / "c" / "1"
    blocker.mkdir(parents=True)
    (blocker / "not-a-chunk").write_text("x")
    args = ["--input", src, "--output", torn, "--weights", "random", "--input-size", str(SIZE),
            "--rows-per-shard", "3", "--batch-size", "4", "--quiet"]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "featurize.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resumable" in proc.stderr.strip().splitlines()[-1]
    shutil.rmtree(blocker)
    g = open_store(torn)
    assert (g["status"][3:6] == 0).all()  # the torn shard is not taken as complete
    assert np.any(g["hires"][3:6])  # ... although its features were written
    fs.put(torn + "/", out[len("s3://"):] + "/", recursive=True)  # the torn store, resumed where it now lies
    result = run_featurize(config(src, out))
    assert result["resumed"] and result["pending"] == 0 and result["units_run"] >= 1
    a, b = open_store(clean), open_store(out)
    for name in ARRAYS:
        if name != "uri":  # the one column that differs: where the images came from
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert str(b["uri"][0]).startswith(f"{s3_bucket}/in/")
    assert fs.exists(f"{out[len('s3://'):]}/hires/c/0/0/0/0")
    # rerunning a finished store does nothing
    again = run_featurize(config(src, out))
    assert again["units_run"] == 0 and again["units_skipped"] == 4


def test_other_settings_into_the_same_store_are_refused(clean_run, bad_folder):
    folder, _ = bad_folder
    out, _ = clean_run
    with pytest.raises(StoreMismatchError, match="dtype"):
        run_featurize(config(str(folder), out, dtype="float32"))
    with pytest.raises(InputNotFoundError):
        run_featurize(config(str(folder / "missing"), out))


def test_bad_model_settings_fail_before_any_work(bad_folder, tmp_path):
    from featup_ops.errors import FeatupError, UnknownBackboneError, WeightsNotFoundError

    folder, _ = bad_folder
    out = str(tmp_path / "never.zarr")
    with pytest.raises(UnknownBackboneError):
        run_featurize(config(str(folder), out, backbone="no_such_backbone"))
    with pytest.raises(WeightsNotFoundError):
        run_featurize(config(str(folder), out, weights=str(tmp_path / "missing.safetensors")))
    with pytest.raises(FeatupError):
        run_featurize(config(str(folder), out, upsampler=str(tmp_path / "no_checkpoint")))
    assert not os.path.exists(out)


def test_non_square_input_and_output_sizes(ray_local, bad_folder, tmp_path):
    """--input-size H W / --output-size H W: the store, its attributes and the torch Dataset keep (H, W) apart, and
    the stored features equal featup_ops run directly on the same decoded pixels."""
    import featup_ops

    from pipeline.read.dataset import FeatureDataset
    from pipeline.io.decode import decode_image, normalize

    folder, _ = bad_folder
    out = str(tmp_path / "wide.zarr")
    result = run_featurize(config(str(folder), out, input_size=[64, 96], output_size=[32, 48], limit=1))
    assert result["complete"] == 1  # a_photo.jpg
    g = open_store(out)
    attrs = read_attrs(g)
    assert attrs["input_size"] == [64, 96] and list(attrs["output_size"]) == [32, 48]
    assert g["lowres"].shape[2:] == (2, 3) and g["hires"].shape[2:] == (32, 48)
    backbone = featup_ops.load_backbone("efficientnet_lite0", "random")
    px = decode_image((folder / str(g["image_id"][0])).read_bytes(), size=(64, 96)).pixels[None]
    with torch.inference_mode():
        x = normalize(px, backbone.mean, backbone.std)
        high = _default_upsampler()(backbone(x), x, (32, 48))[0]
    item = FeatureDataset(out, "hires")[0]
    assert item["features"].shape == (backbone.dim, 32, 48)
    torch.testing.assert_close(item["features"], high, rtol=1e-2, atol=1e-2 * float(high.abs().max()))


def test_size_settings_are_checked_with_one_line(bad_folder, tmp_path):
    from pipeline.errors import ConfigError

    folder, _ = bad_folder
    with pytest.raises(ConfigError, match=r"--input-size takes one side \(square\) or two \(H W\)"):
        config(str(folder), str(tmp_path / "n.zarr"), input_size=[64, 96, 128])
    with pytest.raises(ConfigError, match="--output-size must be >= 1, got 32 0"):
        config(str(folder), str(tmp_path / "n.zarr"), output_size=[32, 0])
    with pytest.raises(ConfigError, match="--input-size 64 100 is not a multiple of the stride 32 .* use 64 96 or 64 128"):
        run_featurize(config(str(folder), str(tmp_path / "n.zarr"), input_size=[64, 100]))
    assert not (tmp_path / "n.zarr").exists()


def _default_upsampler():
    """The upsampler a featurize job without --upsampler uses for efficientnet_lite0 (the shipped JBU)."""
    import featup_ops

    return featup_ops.load_upsampler(featup_ops.default_upsampler_for("efficientnet_lite0"))


def _unit(pixels: np.ndarray, ok: list[bool]) -> dict[str, np.ndarray]:
    """One work unit as the decode stage hands it to the Featurizer: ``pixels (S, H, W, 3)``, ``ok`` per row."""
    s = len(ok)
    return {"shard": np.array([0]), "n": np.array([s]), "pixels": pixels[None], "ok": np.array([ok]),
            "orig_size": np.zeros((1, s, 2), np.int32), "valid_size": np.zeros((1, s, 2), np.int32),
            "meta": np.array(["{}"], dtype=object)}


def test_featurizer_stage_applies_the_stored_pca_basis(bad_folder):
    """The actor class itself (no Ray): PCA from the store attributes, failed rows zero, status per row."""
    import featup_ops

    from pipeline.io.decode import decode_image, normalize
    from featup_ops.pca import apply_pca, fit_pca
    from pipeline.featurize.stages import Featurizer, ModelSpec

    folder, _ = bad_folder
    px = np.stack([decode_image((folder / n).read_bytes(), size=(SIZE, SIZE)).pixels
                   for n in ("a_photo.jpg", "l_photo.jpg")])
    backbone = featup_ops.load_backbone("efficientnet_lite0", "random")
    with torch.inference_mode():
        x = normalize(px, backbone.mean, backbone.std)
        low = backbone(x)
        high = _default_upsampler()(low, x, (32, 32))
    basis = fit_pca(low, 4)
    stage = Featurizer(ModelSpec("efficientnet_lite0", "random", None, (32, 32), "float32", 2, pca=basis.to_dict()))
    out = stage(_unit(np.stack([px[0], np.zeros_like(px[0]), px[1]]), [True, False, True]))
    assert out["hires"].shape == (1, 3, 4, 32, 32) and out["lowres"].shape == (1, 3, 4, 2, 2)
    assert list(out["status"][0]) == [1, 2, 1] and not out["hires"][0, 1].any()
    expect = apply_pca(high, basis).numpy()
    np.testing.assert_allclose(out["hires"][0, [0, 2]], expect, atol=1e-4 * np.abs(expect).max())
    np.testing.assert_allclose(out["lowres"][0, [0, 2]], apply_pca(low, basis).numpy(), atol=1e-4)


def test_pca_basis_and_projection_before_upsampling_commutes():
    """PCA fit is deterministic and exact; projecting before a channel-agnostic upsampler equals projecting after."""
    import featup_ops

    from featup_ops.pca import PCABasis, apply_pca, fit_pca

    g = torch.Generator().manual_seed(0)
    basis_dirs = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:, :3]  # 3 true directions in 16 channels
    feats = torch.einsum("ck,nkhw->nchw", basis_dirs, torch.randn(4, 3, 6, 6, generator=g)) + 5.0
    b = fit_pca(feats, 3)
    assert b.explained.sum() == pytest.approx(1.0, abs=1e-4)
    recon = torch.einsum("kc,nkhw->nchw", torch.from_numpy(b.components), apply_pca(feats, b))
    torch.testing.assert_close(recon + torch.from_numpy(b.mean).view(1, -1, 1, 1), feats, atol=1e-4, rtol=0)
    b2 = PCABasis.from_dict(fit_pca(feats, 3).to_dict())
    np.testing.assert_array_equal(b2.components, b.components)
    up = featup_ops.BilateralUpsampler()
    assert getattr(up, "channel_agnostic", False)
    image = torch.randn(4, 3, 24, 24, generator=g)
    torch.testing.assert_close(apply_pca(up(feats, image), b), up(apply_pca(feats, b), image), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_featurizer_stage_store_dtypes_equal_the_float32_output_cast(bad_folder, dtype):
    """The cast to the store dtype happens on the model's device, into the buffer that is returned as is when
    every row featurized: it must equal casting the float32 output (bfloat16 travels as its uint16 bits)."""
    from pipeline.io.decode import decode_image
    from pipeline.featurize.stages import Featurizer, ModelSpec

    folder, _ = bad_folder
    px = np.stack([decode_image((folder / n).read_bytes(), size=(SIZE, SIZE)).pixels
                   for n in ("a_photo.jpg", "l_photo.jpg")])
    batch = _unit(px, [True, True])
    want = Featurizer(ModelSpec("efficientnet_lite0", "random", None, (32, 32), "float32", 1))(batch)
    got = Featurizer(ModelSpec("efficientnet_lite0", "random", None, (32, 32), dtype, 1))(batch)
    for key in ("lowres", "hires"):
        expect = torch.from_numpy(want[key]).to(getattr(torch, dtype))
        if dtype == "bfloat16":
            assert got[key].dtype == np.uint16
            expect = expect.view(torch.int16).numpy().view(np.uint16)
        else:
            expect = expect.numpy()
        assert got[key].shape == want[key].shape and np.array_equal(got[key], expect), key
    assert got["status"].tolist() == [[1, 1]]
