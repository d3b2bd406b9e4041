"""The feature store layout: shard rule, create/reopen/refuse, shard writes with status last, torn-shard rewrite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import StoreError, StoreMismatchError
from pipeline.store import (
    FeatureStoreSchema,
    complete_rows,
    create_or_open_store,
    open_store,
    pending_shards,
    read_attrs,
    rows_per_shard_for,
    store_summary,
    to_torch,
    write_shard,
)

SETTINGS = {"backbone": "b", "weights_hash": "random:b", "upsampler": {"kind": "bilateral"}}


def schema(**kw) -> FeatureStoreSchema:
    base = dict(n_rows=5, channels=3, lowres_size=(2, 2), output_size=(8, 8), rows_per_shard=2)
    return FeatureStoreSchema(**{**base, **kw})


def unit(s: FeatureStoreSchema, shard: int, value: float, status: int = 1) -> dict[str, np.ndarray]:
    start, stop = s.shard_rows(shard)
    n = stop - start
    dt = s.storage_dtype
    return {
        "image_id": np.array([f"img{r}" for r in range(start, stop)]),
        "uri": np.array([f"/x/{r}.jpg" for r in range(start, stop)]),
        "error": np.array(["" if status == 1 else "bad"] * n),
        "orig_size": np.full((n, 2), 10, dtype=np.int32),
        "valid_size": np.full((n, 2), 8, dtype=np.int32),
        "lowres": np.full((n, 3, 2, 2), value, dtype=dt),
        "hires": np.full((n, 3, 8, 8), value, dtype=dt),
        "status": np.full(n, status, dtype=np.uint8),
    }


def test_rows_per_shard_rule():
    assert rows_per_shard_for(384 * 224 * 224 * 2) == 1  # 38.5 MB per row -> one row per 64 MiB shard
    assert rows_per_shard_for(320 * 112 * 112 * 2) == 8
    assert rows_per_shard_for(10) == 1024
    assert rows_per_shard_for(2**30) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_shards_then_read_back(tmp_path, where, request):
    uri = str(tmp_path / "f.zarr") if where == "local" else request.getfixturevalue("s3_bucket") + "/f.zarr"
    s = schema()
    g, resumed = create_or_open_store(uri, s, SETTINGS)
    assert not resumed and pending_shards(g) == [0, 1, 2]
    write_shard(g, 2, unit(s, 2, 3.0))  # the short last shard (one row)
    write_shard(g, 0, unit(s, 0, 1.0, status=2))
    g = open_store(uri)
    np.testing.assert_array_equal(complete_rows(g), [4])
    assert pending_shards(g) == [1]
    assert g["hires"].chunks == (1, 3, 8, 8) and g["hires"].shards == (2, 3, 8, 8)
    assert g["status"].chunks == (2,)
    assert float(g["hires"][4].mean()) == 3.0 and g["image_id"][4] == "img4"
    assert list(g["error"][0:2]) == ["bad", "bad"]
    attrs = read_attrs(g)
    assert attrs["backbone"] == "b" and attrs["rows_per_shard"] == 2 and len(attrs["fingerprint"]) == 24
    text = store_summary(uri)
    assert "1 complete, 2 failed, 2 pending" in text


def test_reopen_same_settings_resumes_and_other_settings_are_refused(tmp_path):
    uri = str(tmp_path / "f.zarr")
    s = schema()
    create_or_open_store(uri, s, SETTINGS)
    _, resumed = create_or_open_store(uri, s, SETTINGS)
    assert resumed
    with pytest.raises(StoreMismatchError, match="backbone") as e:
        create_or_open_store(uri, s, {**SETTINGS, "backbone": "other"})
    assert "\n" not in str(e.value)
    with pytest.raises(StoreMismatchError, match="dtype"):
        create_or_open_store(uri, schema(dtype="float32"), SETTINGS)


def test_rewriting_a_torn_shard_replaces_it(tmp_path):
    uri = str(tmp_path / "f.zarr")
    s = schema()
    g, _ = create_or_open_store(uri, s, SETTINGS)
    write_shard(g, 1, unit(s, 1, 9.0))
    shard_file = tmp_path / "f.zarr" / "hires" / "c" / "1" / "0" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:50])  # a crash mid-write leaves a torn shard
    write_shard(g, 1, unit(s, 1, 2.0))
    assert float(g["hires"][2:4].mean()) == 2.0


def test_bfloat16_stored_as_bits(tmp_path):
    s = schema(dtype="bfloat16")
    g, _ = create_or_open_store(str(tmp_path / "f.zarr"), s, SETTINGS)
    assert g["hires"].dtype == np.uint16
    x = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    data = unit(s, 0, 0.0)
    data["hires"] = x.view(torch.int16).numpy().view(np.uint16)
    write_shard(g, 0, data)
    back = to_torch(g["hires"][0:2], "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)


def test_open_store_refuses_non_stores(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        open_store(str(tmp_path / "missing.zarr"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_creating_a_store_never_overwrites_other_files(tmp_path, where, request):
    """zarr's mode="w" clears its location: a store is created only where nothing is (an empty folder is fine)."""
    import fsspec

    if where == "local":
        uri = str(tmp_path / "photos")
        fs = fsspec.filesystem("file", auto_mkdir=True)
    else:
        uri = request.getfixturevalue("s3_bucket") + "/photos"
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe({f"{uri}/a.jpg": b"precious", f"{uri}/sub/b.jpg": b"also precious"})
    with pytest.raises(StoreError, match="already holds files that are not a feature store"):
        create_or_open_store(uri, schema(), SETTINGS)
    assert fs.cat(f"{uri}/a.jpg") == b"precious" and fs.cat(f"{uri}/sub/b.jpg") == b"also precious"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(uri, detail=False)) == ["a.jpg", "sub"]
    (tmp_path / "empty").mkdir()
    _, resumed = create_or_open_store(str(tmp_path / "empty"), schema(), SETTINGS)
    assert not resumed
