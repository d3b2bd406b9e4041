"""Store format 2: crc32c catches damaged chunks (one line naming row and shard; the dataset stops or skips),
foreign Zarr v3 readers (xarray, tensorstore, pyarrow) read what zarr-python reads, format-1 stores still read."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CorruptDataError, StoreMismatchError
from pipeline.read.dataset import FeatureDataset
from pipeline.store import FORMAT_VERSION, Status, create_or_open_store, open_store, pending_shards, write_shard
from pipeline.store.checksum import has_checksums, main as checksum_main, verify_store
from pipeline.store.foreign import DIMENSIONS, read_rows_sidecar
from test_store import SETTINGS, schema, unit

SET = {**SETTINGS, "input_size": [8, 8], "resize_policy": "crop"}


def write_store(uri: str, dtype: str = "float16", n: int = 5, s: int = 2):
    """A store written with the pipeline's writer: every row complete, distinct random values per row."""
    sch = schema(dtype=dtype, n_rows=n, rows_per_shard=s)
    g, _ = create_or_open_store(uri, sch, SET)
    rng = np.random.default_rng(0)
    for k in range(sch.num_shards):
        u = unit(sch, k, 0.0)
        for name in ("lowres", "hires"):
            vals = torch.from_numpy(rng.standard_normal(u[name].shape).astype(np.float32))
            if dtype == "bfloat16":
                u[name] = vals.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            else:
                u[name] = vals.numpy().astype(dtype)
        write_shard(g, k, u)
    return g, sch


def flip(path: Path, offset: int, n: int = 64) -> None:
    """Flip ``n`` bytes of a file in place, from ``offset``."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ checksums


def test_every_array_is_checksummed_and_named(tmp_path):
    g, _ = write_store(str(tmp_path / "f.zarr"))
    assert g.attrs["featup"]["format_version"] == FORMAT_VERSION == 2
    for name in g.array_keys():
        assert has_checksums(g[name]), name
        assert tuple(g[name].metadata.dimension_names) == DIMENSIONS[name], name


def test_flipped_bytes_in_a_hires_shard_fail_one_row_with_one_line(tmp_path):
    uri = str(tmp_path / "f.zarr")
    g, sch = write_store(uri)
    want = np.asarray(g["hires"][:])
    flip(tmp_path / "f.zarr" / "hires" / "c" / "1" / "0" / "0" / "0", offset=40)  # shard 1 = rows 2, 3; row 2 first
    g = open_store(uri)
    with pytest.raises(ValueError, match="checksum"):  # zarr itself refuses the damaged chunk ...
        g["hires"][2]
    np.testing.assert_array_equal(g["hires"][3], want[3])  # ... and reads its neighbour in the same shard
    ds = FeatureDataset(uri, "hires")
    with pytest.raises(CorruptDataError) as info:  # default: stop, one line naming the row and the shard
        ds.__getitems__([0, 1, 2, 3, 4])
    text = str(info.value)
    assert "\n" not in text and "row 2 of 'hires' is damaged (shard 1" in text and "hires/c/1/0/0/0" in text
    with pytest.raises(CorruptDataError, match="row 2 of 'hires'"):
        ds[2]
    skip = FeatureDataset(uri, "hires", on_damaged="skip")
    with pytest.warns(RuntimeWarning, match="skipped 1 damaged row"):
        batch = list(skip.loader(5, shuffle=False))  # one batch per shard: rows 0-1, then 2-3, then 4
    rows = torch.cat([b["row"] for b in batch]).tolist()
    assert rows == [0, 1, 3, 4] and skip.damaged_rows == {2}
    for b in batch:
        for r, f in zip(b["row"].tolist(), b["features"]):
            np.testing.assert_array_equal(f.numpy(), want[r].astype(np.float32))


def test_verify_lists_damage_and_reset_makes_the_shard_pending(tmp_path, capsys):
    uri = str(tmp_path / "f.zarr")
    write_store(uri)
    assert all(not v for v in verify_store(uri).values())
    flip(tmp_path / "f.zarr" / "lowres" / "c" / "2" / "0" / "0" / "0", offset=8, n=16)  # shard 2 = row 4
    assert verify_store(uri)["lowres"] == [4]
    assert checksum_main([uri, "--reset"]) == 1
    assert "lowres: 1 damaged row(s): [4]" in capsys.readouterr().out
    assert pending_shards(open_store(uri)) == [2]  # a rerun of the job rewrites that shard whole


# ------------------------------------------------------------------------------------------ foreign readers


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_xarray_opens_the_group_with_named_dimensions(tmp_path, dtype):
    xr = pytest.importorskip("xarray")
    uri = str(tmp_path / "f.zarr")
    g, sch = write_store(uri, dtype=dtype)
    ds = xr.open_zarr(uri, consolidated=False, mask_and_scale=False)
    assert dict(ds.sizes) == {"row": 5, "channel": 3, "lowres_y": 2, "lowres_x": 2, "y": 8, "x": 8, "side": 2}
    np.testing.assert_array_equal(ds["hires"].values, g["hires"][:])
    assert ds["status"].values.tolist() == [Status.COMPLETE] * 5
    assert [str(v) for v in ds["image_id"].values] == [f"img{r}" for r in range(5)]
    assert (ds["hires"].attrs.get("featup", {}).get("dtype") == "bfloat16") == (dtype == "bfloat16")


def assert_foreign_readers_agree(uri: str) -> None:
    """tensorstore's zarr3 driver reads every numeric array of the local store at ``uri`` as zarr-python does, and
    xarray opens the group with the named dimensions (each check skipped when its package is missing)."""
    g = open_store(uri)
    numeric = [n for n in g.array_keys() if g[n].dtype.kind in "biuf"]
    assert {"lowres", "hires", "orig_size", "valid_size", "status"} <= set(numeric)
    try:
        import tensorstore as ts
    except ImportError:
        ts = None
    for name in numeric if ts is not None else []:
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{uri}/{name}"}}).result()
        got = arr.read().result()
        assert got.dtype == g[name].dtype and np.array_equal(got, g[name][:]), name
        assert list(arr.domain.labels) == list(DIMENSIONS[name]), name
    try:
        import xarray as xr
    except ImportError:
        return
    ds = xr.open_zarr(uri, consolidated=False, mask_and_scale=False)
    for name in numeric:
        assert ds[name].dims == DIMENSIONS[name] and np.array_equal(ds[name].values, g[name][:]), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tensorstore_reads_every_numeric_array_identically(tmp_path, dtype):
    pytest.importorskip("tensorstore")
    uri = str(tmp_path / "f.zarr")
    write_store(uri, dtype=dtype)
    assert_foreign_readers_agree(uri)


def test_string_columns_are_in_the_parquet_copy(tmp_path):
    import pyarrow.parquet as pq

    uri = str(tmp_path / "f.zarr")
    g, _ = write_store(uri)
    table = pq.read_table(tmp_path / "f.zarr" / "rows" / "parquet").sort_by("row")  # a plain Parquet reader
    assert table.column("row").to_pylist() == list(range(5))
    assert table.column("image_id").to_pylist() == [str(v) for v in g["image_id"][:]]
    assert table.column("uri").to_pylist() == [str(v) for v in g["uri"][:]]
    assert read_rows_sidecar(uri).column("error").to_pylist() == [""] * 5
    optional = {"implicit", "implicit_error", "implicit_status", "implicit_params", "guidance"}
    assert sorted(g.array_keys()) == sorted(DIMENSIONS.keys() - optional)


def test_s3_store_is_checksummed_and_has_the_parquet_copy(s3_bucket):
    uri = f"{s3_bucket}/f.zarr"
    g, _ = write_store(uri)
    assert has_checksums(open_store(uri)["hires"])
    assert read_rows_sidecar(uri).column("image_id").to_pylist() == [f"img{r}" for r in range(5)]


# --------------------------------------------------------------------------------------------- format 1


def make_format1(root: Path) -> str:
    """A format-1 store as the previous version wrote it: no crc32c, no dimension names, no Parquet copy."""
    import zarr
    from zarr.codecs import BloscCodec

    sch = schema()
    attrs = {**sch.to_dict(), **SET, "format_version": 1, "fingerprint": "old", "code_version": "old"}
    g = zarr.open_group(str(root / "old.zarr"), mode="w", attributes={"featup": json.loads(json.dumps(attrs))})
    n, rows = sch.n_rows, sch.rows_per_shard
    for name in ("image_id", "uri", "error"):
        g.create_array(name, shape=(n,), chunks=(rows,), dtype=str, fill_value="")
    for name in ("orig_size", "valid_size"):
        g.create_array(name, shape=(n, 2), chunks=(rows, 2), dtype="int32", fill_value=0)
    for name, shape in sch.feature_arrays().items():
        g.create_array(name, shape=(n, *shape), chunks=(1, *shape), shards=(rows, *shape), dtype="float16",
                       fill_value=0, compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))
    g.create_array("status", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
    for k in range(sch.num_shards):
        a, b = sch.shard_rows(k)
        for name, v in unit(sch, k, float(k + 1)).items():
            g[name][a:b] = v
    return str(root / "old.zarr")


def test_format1_stores_still_read_and_are_not_resumed(tmp_path):
    uri = make_format1(tmp_path)
    ds = FeatureDataset(uri, "hires")
    assert len(ds) == 5 and float(ds[4]["features"].mean()) == 3.0
    assert all(not v for v in verify_store(uri).values())
    with pytest.raises(StoreMismatchError) as info:
        create_or_open_store(uri, schema(), SET)
    assert "format 1" in str(info.value) and "new --output" in str(info.value) and "\n" not in str(info.value)
