"""Manifests from every source kind, local and s3://, and the fast failures on missing / empty / unreadable input."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputNotFoundError
from pipeline.io.sources import build_manifest, read_bytes, read_many

NAMES = ["bird_full.jpg", "cones2.jpg", "plant.jpg"]


@pytest.fixture(scope="module")
def images(samples_dir) -> dict[str, bytes]:
    return {n: (samples_dir / n).read_bytes() for n in NAMES}


def write_tar(path, images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for i, (name, data) in enumerate(images.items()):
            for member, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.json", json.dumps({"n": name}).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def write_parquet(path, images: dict[str, bytes], *, hf_struct: bool) -> None:
    blobs = list(images.values())
    if hf_struct:
        col = pa.array([{"bytes": b, "path": n} for n, b in images.items()],
                       type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": col, "image_id": [f"id{i}" for i in range(len(blobs))]})
    else:
        table = pa.table({"jpg": pa.array(blobs, type=pa.binary())})
    pq.write_table(table, path, row_group_size=2)


def test_folder_is_sorted_and_readable(tmp_path, images):
    for name, data in reversed(list(images.items())):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not listed")
    m = build_manifest(str(tmp_path))
    assert m.kind == "folder"
    assert m.image_ids == tuple(f"sub/{n}" for n in sorted(NAMES))
    assert read_bytes(m.uris[1]) == images[sorted(NAMES)[1]]
    assert build_manifest(str(tmp_path), limit=2).image_ids == m.image_ids[:2]
    assert build_manifest(str(tmp_path)).digest() == m.digest()


def test_coco_with_annotations_uses_ids_and_order(tmp_path, images):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    ids = {"bird_full.jpg": 42, "cones2.jpg": 7, "plant.jpg": 139}
    for n, data in images.items():
        (tmp_path / "val2017" / n).write_bytes(data)
    ann = {"images": [{"id": ids[n], "file_name": n} for n in NAMES], "annotations": []}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    m = build_manifest(str(tmp_path), split="val2017")
    assert m.kind == "coco"
    assert m.image_ids == ("7", "42", "139")
    assert read_bytes(m.uris[0]) == images["cones2.jpg"]


def test_coco_without_annotations_uses_file_stems(tmp_path, images):
    (tmp_path / "val2017").mkdir()
    for n, data in images.items():
        (tmp_path / "val2017" / n).write_bytes(data)
    m = build_manifest(str(tmp_path), kind="coco", split="val2017")
    assert m.image_ids == tuple(n[:-4] for n in sorted(NAMES))


def test_tar_shards_point_at_member_bytes(tmp_path, images):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "a-000.tar", dict(list(images.items())[:2]))
    write_tar(tmp_path / "shards" / "a-001.tar", dict(list(images.items())[2:]))
    m = build_manifest(str(tmp_path / "shards"))
    assert m.kind == "tar" and len(m) == 3
    assert m.image_ids == ("000000", "000001", "000000")
    got = read_many(m.uris)
    assert got == [images[n] for n in NAMES]


@pytest.mark.parametrize("hf_struct", [True, False], ids=["hf-struct", "raw-binary"])
def test_parquet_rows(tmp_path, images, hf_struct):
    write_parquet(tmp_path / "part-0.parquet", images, hf_struct=hf_struct)
    m = build_manifest(str(tmp_path))
    assert m.kind == "parquet" and len(m) == 3
    assert m.image_ids == (("id0", "id1", "id2") if hf_struct else ("part-0/0", "part-0/1", "part-0/2"))
    assert read_many(m.uris) == list(images.values())
    assert read_bytes(m.uris[2]) == images[NAMES[2]]


def test_s3_folder_tar_and_parquet(s3_bucket, tmp_path, images):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3_bucket[len("s3://"):]
    for n, data in images.items():
        fs.pipe(f"{bucket}/imgs/{n}", data)
    write_tar(tmp_path / "s.tar", images)
    fs.put(str(tmp_path / "s.tar"), f"{bucket}/tars/s-000.tar")
    write_parquet(tmp_path / "p.parquet", images, hf_struct=True)
    fs.put(str(tmp_path / "p.parquet"), f"{bucket}/pq/p.parquet")

    m = build_manifest(f"{s3_bucket}/imgs")
    assert m.kind == "folder" and m.uris[0].startswith("s3://")
    assert read_bytes(m.uris[0]) == images[NAMES[0]]
    mt = build_manifest(f"{s3_bucket}/tars")
    assert mt.kind == "tar" and read_many(mt.uris) == list(images.values())
    mp = build_manifest(f"{s3_bucket}/pq/p.parquet")
    assert mp.kind == "parquet" and read_many(mp.uris) == list(images.values())


def test_missing_empty_and_unreadable_inputs_fail_fast(tmp_path, s3_server):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        build_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputNotFoundError, match="holds no images"):
        build_manifest(str(tmp_path / "empty"))
    with pytest.raises(InputNotFoundError):
        build_manifest("s3://no-such-bucket-featup/prefix")
    with pytest.raises(FileNotFoundError):  # InputNotFoundError is also the builtin
        build_manifest(str(tmp_path / "val2017-missing"), kind="coco", split="val2017")
