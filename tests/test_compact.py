"""Compact (``--hires on-read``) stores through a real local Ray, real Zarr and a real S3 server (moto): the dataset
yields the same batches from an on-read store as from a materialized store made with the same settings (fp16, bf16
+ PCA to s3://, a trained JBU checkpoint), failed rows and resume work as in materialized mode, other settings are
refused, and a missing, corrupt or foreign upsampler inside the store is refused on open with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from pipeline.featurize import FeaturizeConfig, run_featurize
from pipeline.read.dataset import FeatureDataset
from pipeline.store import FeatureStoreSchema, open_store, read_attrs

from test_decode import corrupt_png

pytestmark = pytest.mark.slow

SIZE = 64  # a multiple of efficientnet_lite0's stride 32
#: Relative rounding of one value in each store dtype (half an ulp of the largest magnitude, two roundings).
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 1e-5}
CASES = {
    "fp16": dict(dtype="float16"),
    "bf16_pca_s3": dict(dtype="bfloat16", pca=8),
    "jbu_fp16": dict(dtype="float16", output_size=96),
}


def config(input: str, output: str, **kw) -> FeaturizeConfig:
    base = dict(weights="random", input_size=SIZE, rows_per_shard=3, batch_size=4, quiet=True, progress_interval_s=5)
    return FeaturizeConfig(input=input, output=output, **{**base, **kw})


def trained_jbu(seed: int) -> torch.nn.Module:
    """A JBU upsampler with non-default (seeded, perturbed) parameters, as training leaves them."""
    import featup_ops

    torch.manual_seed(seed)
    up = featup_ops.JBUUpsampler()
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return up


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, copy_samples) -> Path:
    d = copy_samples(tmp_path_factory.mktemp("inputs"), 5)
    (d / "c_corrupt.png").write_bytes(corrupt_png())  # a failed row in both modes
    return d


@pytest.fixture(scope="module")
def jbu_checkpoint(tmp_path_factory) -> str:
    import featup_ops

    path = tmp_path_factory.mktemp("ckpt") / "jbu"
    featup_ops.save_upsampler(path, trained_jbu(0), meta={"step": 7})
    return str(path)


@pytest.fixture(scope="module")
def stores(ray_local, s3_server, inputs, jbu_checkpoint, tmp_path_factory) -> dict[str, tuple[str, str, dict]]:
    """case -> (materialized store, on-read store, settings): one featurize run of each mode per case."""
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists("compact-stores"):
        fs.mkdir("compact-stores")
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, kw in CASES.items():
        if name.startswith("jbu"):
            kw = {**kw, "upsampler": jbu_checkpoint}
        mat = str(root / f"{name}_mat.zarr")
        comp = "s3://compact-stores/on_read.zarr" if name.endswith("s3") else str(root / f"{name}_onread.zarr")
        run_featurize(config(str(inputs), mat, **kw))
        res = run_featurize(config(str(inputs), comp, hires="on-read", **kw))
        assert res["complete"] == 5 and res["failed"] == 1 and res["pending"] == 0
        out[name] = (mat, comp, kw)
    yield out
    fs.rm("compact-stores", recursive=True)


def all_items(ds: FeatureDataset) -> dict:
    batch = ds.loader(4, shuffle=False)
    feats, rows, ids = [], [], []
    for b in batch:
        feats.append(b["features"])
        rows += b["row"].tolist()
        ids += list(b["image_id"])
    return {"features": torch.cat(feats), "row": rows, "image_id": ids}


@pytest.mark.parametrize("case", list(CASES))
def test_on_read_batches_equal_the_materialized_store(stores, case):
    mat, comp, kw = stores[case]
    a, b = FeatureDataset(mat, "hires"), FeatureDataset(comp, "hires")
    assert len(a) == len(b) == 5 and a.item_shape == b.item_shape
    x, y = all_items(a), all_items(b)
    assert x["row"] == y["row"] and x["image_id"] == y["image_id"]
    fa, fb = x["features"], y["features"]
    scale = float(fa.abs().max())
    torch.testing.assert_close(fb, fa, rtol=0, atol=2 * EPS[kw["dtype"]] * scale)
    # the compact arrays: lowres identical, guidance is the decoded image, failed rows recorded alike
    ga, gb = open_store(mat), open_store(comp)
    for name in ("lowres", "status", "error", "image_id", "valid_size", "orig_size"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert "hires" not in gb and "hires" in ga and gb["guidance"].dtype == np.uint8
    attrs = read_attrs(gb)
    assert attrs["hires_mode"] == "on-read" and "hires_mode" not in read_attrs(ga)
    assert (attrs["pca"] is not None) == ("pca" in kw)
    schema = FeatureStoreSchema.from_dict(attrs)
    assert schema.row_bytes < FeatureStoreSchema.from_dict(read_attrs(ga)).row_bytes


def test_hires_on_read_at_any_size_is_the_upsampler_on_the_stored_arrays(stores):
    import featup_ops

    from pipeline.io.decode import normalize

    _, comp, _ = stores["jbu_fp16"]
    ds = FeatureDataset(comp, "hires", size=(80, 112), channels=(3, 19), crop=(4, 8, 60, 90))
    assert ds.item_shape == (16, 60, 90)
    item = ds[1]
    g = open_store(comp)
    row = item["row"]
    up = featup_ops.load_upsampler(comp + "/upsampler")
    backbone_norm = read_attrs(g)["normalization"]
    x = normalize(np.asarray(g["guidance"][row : row + 1]), backbone_norm["mean"], backbone_norm["std"])
    low = torch.from_numpy(np.asarray(g["lowres"][row : row + 1]).astype(np.float32))
    with torch.inference_mode():
        want = up(low, x, (80, 112)).to(torch.float16).float()[0, 3:19, 4:64, 8:98]
    torch.testing.assert_close(item["features"], want, rtol=0, atol=1e-3 * float(want.abs().max()))
    with pytest.raises(ConfigError, match="on-read"):
        FeatureDataset(stores["jbu_fp16"][0], "hires", size=(80, 112))


def test_resume_of_a_torn_shard_and_other_settings_refused(stores, inputs):
    mat, comp, kw = stores["fp16"]
    g = open_store(comp, mode="r+")
    before = {k: np.asarray(g[k][:]) for k in ("lowres", "guidance", "status")}
    g["status"][3:6] = 0  # a crash after the features, before the status
    g["guidance"][3:6] = 0
    res = run_featurize(config(str(inputs), comp, hires="on-read", **kw))
    assert res["resumed"] and res["units_run"] == 1 and res["pending"] == 0
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(open_store(comp)[k][:]), v, err_msg=k)
    with pytest.raises(StoreMismatchError, match="hires_mode"):
        run_featurize(config(str(inputs), comp, **kw))  # materialized settings into the on-read store
    with pytest.raises(StoreMismatchError, match="hires_mode"):
        run_featurize(config(str(inputs), mat, hires="on-read", **kw))


def test_stored_upsampler_missing_corrupt_or_foreign_is_refused_on_open(stores, tmp_path):
    import featup_ops

    _, comp, _ = stores["jbu_fp16"]
    FeatureDataset(comp, "hires")  # the intact store opens

    def broken(name: str) -> str:
        dst = tmp_path / name
        shutil.copytree(comp, dst)
        return str(dst)

    missing = broken("missing.zarr")
    (Path(missing) / "upsampler" / "upsampler.json").unlink()
    corrupt = broken("corrupt.zarr")
    w = Path(corrupt) / "upsampler" / "upsampler.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    foreign = broken("foreign.zarr")
    featup_ops.save_upsampler(Path(foreign) / "upsampler", trained_jbu(1))
    for store, what in ((missing, "is missing"), (corrupt, "is corrupt"), (foreign, "is not the one")):
        with pytest.raises(StoreError, match=what) as e:
            FeatureDataset(store, "hires")
        assert "\n" not in str(e.value) and "upsampler" in str(e.value)
    # lowres of such a store is still readable: the upsampler is only needed for hires
    assert len(FeatureDataset(missing, "lowres")) == 5
    doc = json.loads((Path(comp) / "upsampler" / "upsampler.json").read_text())
    assert doc["format"] == "featup-upsampler"  # the checkpoint files as save_upsampler writes them


def test_pca_with_a_channel_mixing_upsampler_is_refused(inputs, tmp_path):
    import featup_ops
    from featup_ops.config import JBUConfig

    ck = tmp_path / "mix"
    featup_ops.save_upsampler(ck, featup_ops.JBUUpsampler(320, cfg=JBUConfig(final_mix=True)))
    with pytest.raises(ConfigError, match="channel-agnostic"):
        run_featurize(config(str(inputs), str(tmp_path / "s.zarr"), hires="on-read", pca=8, upsampler=str(ck)))


def test_size_line_states_both_modes():
    from pipeline.featurize import plan_sizes

    s = FeatureStoreSchema(n_rows=1000, channels=384, lowres_size=(14, 14), output_size=(224, 224),
                           hires_mode="on-read", input_size=(224, 224))
    line = plan_sizes(s, "blosc-zstd", (224, 224))
    assert "guidance 224x224x3 uint8" in line
    assert "materialized 38.7 MB/image (38.7 GB) vs on-read 301.1 KB/image (301.1 MB, 128x smaller)" in line


@pytest.mark.parametrize("case", ["fp16", "bf16_pca_s3"])
def test_materialize_job_writes_the_materialized_store_and_resumes(stores, case, tmp_path):
    import s3fs
    import zarr

    from pipeline.featurize.materialize import MaterializeConfig, run_materialize

    mat, comp, kw = stores[case]
    out = str(tmp_path / "m.zarr") if case == "fp16" else "s3://compact-stores/materialized.zarr"
    res = run_materialize(MaterializeConfig(comp, out, rows_per_shard=3, quiet=True))  # the S the featurize runs used
    assert (res["complete"], res["failed"], res["pending"]) == (5, 1, 0)
    a, b = open_store(mat), open_store(out)
    assert read_attrs(a)["fingerprint"] == read_attrs(b)["fingerprint"]  # as if featurized materialized
    for name in ("lowres", "status", "error", "image_id"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    if case == "fp16":  # a foreign reader: plain zarr, no project code
        ha = np.asarray(zarr.open_group(mat, mode="r")["hires"][:]).astype(np.float32)
        hb = np.asarray(zarr.open_group(out, mode="r")["hires"][:]).astype(np.float32)
        np.testing.assert_allclose(hb, ha, rtol=0, atol=2 * EPS[kw["dtype"]] * np.abs(ha).max())
    x, y = all_items(FeatureDataset(mat)), all_items(FeatureDataset(out))
    torch.testing.assert_close(y["features"], x["features"], rtol=0,
                               atol=2 * EPS[kw["dtype"]] * float(x["features"].abs().max()))
    g = open_store(out, mode="r+")
    g["status"][0:2] = 0  # a torn first shard
    again = run_materialize(MaterializeConfig(comp, out, rows_per_shard=3, quiet=True))
    assert again["resumed"] and again["units_run"] == 1 and again["pending"] == 0
    with pytest.raises(ConfigError, match="already materialized"):
        run_materialize(MaterializeConfig(mat, str(tmp_path / "x.zarr"), quiet=True))
    if case != "fp16":
        s3fs.S3FileSystem().rm(out[len("s3://"):], recursive=True)
