"""FeatureDataset over real Zarr stores (local and s3:// on the loopback S3 server), DataLoader workers, labels."""
from __future__ import annotations

import io
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.read.dataset import FeatureDataset
from pipeline.read.sampler import ShardBatchSampler
from pipeline.errors import ConfigError, StoreError
from pipeline.io.decode import decode_image
from pipeline.evaluate.labels import (
    COCO_STUFF_FINE_TO_COARSE,
    IGNORE_INDEX,
    LabelSource,
    align_label,
    resize_geometry,
)
from pipeline.store import FeatureStoreSchema, Status, create_or_open_store, write_shard

N, C, LOW, HIGH, S = 7, 5, 4, 16, 3
FAILED_ROW = 4
INPUT = (16, 16)


def make_store(uri: str, *, n: int = N, failed: tuple[int, ...] = (FAILED_ROW,), input_size=INPUT, policy="crop",
               orig_sizes=None, ids=None, seed: int = 0) -> dict[str, np.ndarray]:
    """A store in the documented layout, written shard by shard with pipeline.store's writer; returns the values."""
    rng = np.random.default_rng(seed)
    schema = FeatureStoreSchema(n_rows=n, channels=C, lowres_size=(LOW, LOW), output_size=(HIGH, HIGH),
                                dtype="float16", rows_per_shard=S)
    settings = {"backbone": "synthetic", "input_size": list(input_size), "resize_policy": policy}
    group, _ = create_or_open_store(uri, schema, settings)
    hires = rng.standard_normal((n, C, HIGH, HIGH)).astype(np.float16)
    lowres = rng.standard_normal((n, C, LOW, LOW)).astype(np.float16)
    status = np.full(n, Status.COMPLETE, np.uint8)
    status[list(failed)] = Status.FAILED
    hires[list(failed)] = 0
    lowres[list(failed)] = 0
    ids = np.array(ids if ids is not None else [f"img{i}" for i in range(n)])
    orig = np.array(orig_sizes if orig_sizes is not None else [(16, 16)] * n, np.int32)
    for k in range(schema.num_shards):
        a, b = schema.shard_rows(k)
        write_shard(group, k, {
            "image_id": ids[a:b], "uri": np.array([f"mem://{i}.jpg" for i in ids[a:b]]),
            "error": np.array(["bad" if s == Status.FAILED else "" for s in status[a:b]]),
            "orig_size": orig[a:b], "valid_size": orig[a:b], "lowres": lowres[a:b], "hires": hires[a:b],
            "status": status[a:b],
        })
    return {"hires": hires, "lowres": lowres, "status": status}


def _check_all_rows(ds: FeatureDataset, values: dict[str, np.ndarray], loader) -> None:
    seen = []
    for batch in loader:
        for j, row in enumerate(batch["row"].tolist()):
            np.testing.assert_array_equal(batch["features"][j].numpy(), values[ds.array][row].astype(np.float32))
            assert batch["image_id"][j] == f"img{row}"
            seen.append(row)
    assert sorted(seen) == [r for r in range(N) if r != FAILED_ROW]


def test_values_equal_written_and_failed_rows_skipped(tmp_path):
    uri = str(tmp_path / "s.zarr")
    values = make_store(uri)
    ds = FeatureDataset(uri, "hires")
    assert len(ds) == N - 1 and FAILED_ROW not in ds.rows.tolist()
    for i in range(len(ds)):
        item = ds[i]
        assert item["features"].dtype == torch.float32 and item["features"].shape == (C, HIGH, HIGH)
        np.testing.assert_array_equal(item["features"].numpy(), values["hires"][item["row"]].astype(np.float32))
    low = FeatureDataset(uri, "lowres", channels=2, crop=(1, 1, 2, 3))
    item = low[0]
    np.testing.assert_array_equal(item["features"].numpy(), values["lowres"][0, :2, 1:3, 1:4].astype(np.float32))
    # batched path: arbitrary order, runs split around the failed row, same values as item by item
    got = ds.__getitems__([5, 0, 3, 4, 1])
    assert [g["row"] for g in got] == [ds.rows[i] for i in [5, 0, 3, 4, 1]]
    for g in got:
        np.testing.assert_array_equal(g["features"].numpy(), values["hires"][g["row"]].astype(np.float32))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"array": "implicit"}, "has no 'implicit' array"),
        ({"array": "nope"}, "unknown feature array 'nope'"),
        ({"channels": (0, C + 1)}, f"out of range; the store has {C} channels"),
        ({"crop": (0, 0, HIGH + 1, 1)}, f"does not fit the hires array's {HIGH}x{HIGH} grid"),
        ({"crop": (HIGH, HIGH)}, "must be (top, left, height, width)"),
        ({"rows": [0, N + 3]}, f"rows [{N + 3}] are outside the store's {N} rows"),
    ],
)
def test_bad_dataset_arguments_fail_at_construction_with_one_line(tmp_path, kw, message):
    uri = str(tmp_path / "s.zarr")
    make_store(uri)
    with pytest.raises((ConfigError, StoreError), match=re.escape(message)) as info:
        FeatureDataset(uri, **{"array": "hires", **kw})
    assert "\n" not in str(info.value)


def test_shard_batch_sampler_batches_are_contiguous_within_shards(tmp_path):
    uri = str(tmp_path / "s.zarr")
    make_store(uri)
    ds = FeatureDataset(uri)
    sampler = ShardBatchSampler(ds, batch_size=2, shuffle=True, seed=1)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(ds)))
    for b in batches:
        rows = ds.rows[b]
        assert len(set(rows // S)) == 1 and np.all(np.diff(rows) == 1)
    sampler.set_epoch(1)
    assert sorted(i for b in sampler for i in b) == flat


def test_dataloader_two_workers_local(tmp_path):
    uri = str(tmp_path / "s.zarr")
    values = make_store(uri)
    ds = FeatureDataset(uri, "hires")
    ds[0]  # a handle opened in the parent must not leak into the workers
    assert ds._arr is not None
    state = pickle.loads(pickle.dumps(ds))
    assert state._arr is None and len(state) == len(ds)
    loader = DataLoader(ds, batch_sampler=ShardBatchSampler(ds, 2, seed=0), num_workers=2)
    _check_all_rows(ds, values, loader)
    _check_all_rows(ds, values, DataLoader(ds, batch_size=3, shuffle=True, num_workers=2))


def test_dataloader_two_workers_s3(s3_bucket):
    uri = f"{s3_bucket}/feats.zarr"
    values = make_store(uri)
    ds = FeatureDataset(uri, "hires")
    assert len(ds) == N - 1
    _check_all_rows(ds, values, DataLoader(ds, batch_sampler=ShardBatchSampler(ds, 2), num_workers=2))


# ------------------------------------------------------------------------------------------------------ labels


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _stripes(h: int, w: int, period: int) -> np.ndarray:
    """Label map of vertical stripes (class = column // period % 4) plus horizontal bands (+4 below the middle)."""
    cols = (np.arange(w) // period) % 4
    lab = np.broadcast_to(cols, (h, w)).copy()
    lab[h // 2 :] += 4
    return lab.astype(np.uint8)


def test_resize_geometry_by_hand():
    # crop: scale = max(20/30, 20/50) = 2/3 -> 50 * 2/3 = 33.3 -> 33 wide, centre window starts at (33 - 20) // 2
    g = resize_geometry((30, 50), (20, 20), "crop")
    assert (g.resized, g.offset, g.valid) == ((20, 33), (0, 6), (20, 20))
    # pad: scale = min(20/30, 20/50) = 0.4 -> 12 x 20, pasted top-left
    g = resize_geometry((30, 50), (20, 20), "pad")
    assert (g.resized, g.offset, g.valid) == ((12, 20), (0, 0), (12, 20))
    lab = np.zeros((30, 50), np.uint8)
    lab[:, 25:] = 1  # right half: source columns 25.. -> resized columns >= 16.5 -> output columns >= 11 after crop
    out = align_label(lab, (20, 20), "crop")
    assert (out[:, :10] == 0).all() and (out[:, 10:] == 1).all()
    out = align_label(lab, (20, 20), "pad")
    assert (out[:12, :10] == 0).all() and (out[:12, 10:] == 1).all() and (out[12:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("policy,orig", [("crop", (30, 50)), ("crop", (64, 40)), ("pad", (30, 50)), ("pad", (64, 40))])
def test_label_alignment_matches_decode_geometry(policy, orig, size):
    """A synthetic photo coloured by its own label map, decoded by the featurize decoder, must show the same map
    as the aligned label (away from resampling boundaries)."""
    h, w = orig
    lab = _stripes(h, w, period=max(w // 6, 3))
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                        [0, 255, 255], [255, 255, 255]], np.uint8)
    decoded = decode_image(_png(palette[lab]), size=size, policy=policy)
    aligned = align_label(lab, size, policy)
    g = resize_geometry((h, w), size, policy)
    assert g.valid == decoded.valid_size
    vh, vw = g.valid
    if policy == "pad":
        assert (aligned[vh:] == IGNORE_INDEX).all() and (aligned[:, vw:] == IGNORE_INDEX).all()
    # colour of each decoded pixel -> nearest palette entry; compare where the label is locally constant
    pix = decoded.pixels[:vh, :vw].astype(np.int32)
    back = np.abs(pix[:, :, None, :] - palette[None, None].astype(np.int32)).sum(-1).argmin(-1)
    a = aligned[:vh, :vw]
    interior = np.ones_like(a, bool)
    interior[1:-1, 1:-1] = (a[1:-1, 1:-1] == a[:-2, 1:-1]) & (a[1:-1, 1:-1] == a[2:, 1:-1]) & (
        a[1:-1, 1:-1] == a[1:-1, :-2]) & (a[1:-1, 1:-1] == a[1:-1, 2:])
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    assert interior.sum() > 20
    assert (back[interior] == a[interior]).mean() > 0.98


def test_coco_stuff_labels_through_dataset(tmp_path):
    """COCO-Stuff fine ids -> coarse classes, joined by 12-digit COCO file name, aligned and cropped."""
    uri = str(tmp_path / "s.zarr")
    ids = [str(100 + i) for i in range(N)]
    orig = (24, 32)
    make_store(uri, ids=ids, orig_sizes=[orig] * N, policy="crop")
    root = tmp_path / "stuffthingmaps"
    root.mkdir()
    fine = np.zeros(orig, np.uint8)
    fine[:, 16:] = 93  # branch -> plant (22)
    fine[:4, :] = 255  # unlabelled
    for i in ids:
        (root / f"{int(i):012d}.png").write_bytes(_png(fine))
    src = LabelSource(str(root), "coco-stuff-27")
    ds = pickle.loads(pickle.dumps(FeatureDataset(uri, "hires", labels=src)))  # what a spawned worker gets
    item = ds[0]
    expect = align_label(np.where(fine == 255, 255, np.asarray(COCO_STUFF_FINE_TO_COARSE)[np.minimum(fine, 181)]),
                         INPUT, "crop")
    assert item["label"].dtype == torch.int64 and item["label"].shape == INPUT
    np.testing.assert_array_equal(item["label"].numpy(), expect)
    assert set(np.unique(expect)) == {COCO_STUFF_FINE_TO_COARSE[0], 22, IGNORE_INDEX}
    # crop on the low-res grid maps onto the labels by the integer factor 16 / 4
    low = FeatureDataset(uri, "lowres", crop=(1, 2, 2, 2), labels=src)
    np.testing.assert_array_equal(low[0]["label"].numpy(), expect[4:12, 8:16])
    # a label of the wrong size is refused, naming the image
    (root / f"{int(ids[1]):012d}.png").write_bytes(_png(fine[:10]))
    with pytest.raises(ValueError, match="101"):
        ds[1]
    loader = DataLoader(FeatureDataset(uri, "hires", labels=src, rows=[0, 2, 3]), batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert batch["label"].shape == (3, *INPUT) and batch["features"].shape == (3, C, HIGH, HIGH)


def test_loader_batches_without_stacking_copy(tmp_path):
    """__getitems__ writes one batch tensor; collate_features hands it on as is (same memory), values intact."""
    from pipeline.read.collate import collate_features

    uri = str(tmp_path / "s.zarr")
    values = make_store(uri)
    ds = FeatureDataset(uri, "hires", channels=(1, 4), crop=(2, 3, 8, 9))
    items = ds.__getitems__([3, 0, 1])
    batch = collate_features(items)
    assert batch["features"].data_ptr() == items[0]["features"].data_ptr()
    assert batch["features"].shape == (3, 3, 8, 9) and batch["row"].tolist() == [ds.rows[3], 0, 1]
    for j, row in enumerate(batch["row"].tolist()):
        np.testing.assert_array_equal(batch["features"][j].numpy(), values["hires"][row, 1:4, 2:10, 3:12])
    _check_all_rows(FeatureDataset(uri), values, FeatureDataset(uri).loader(2, num_workers=2))


# ------------------------------------------------------------------------------ stores written by the featurize job


@pytest.fixture(scope="module")
def featurized(ray_local, samples_dir, tmp_path_factory):
    """A store written by the real featurize job: 3 photos and one corrupt file (a failed row), 2 rows per shard."""
    from pipeline.featurize import FeaturizeConfig, run_featurize

    d = tmp_path_factory.mktemp("photos")
    for name, src in (("a.jpg", "skate.jpg"), ("c.jpg", "cones2.jpg"), ("d.jpg", "plant.jpg")):
        (d / name).write_bytes((samples_dir / src).read_bytes())
    (d / "b.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path_factory.mktemp("store") / "f.zarr")
    counts = run_featurize(FeaturizeConfig(input=str(d), output=out, weights="random", input_size=64,
                                           rows_per_shard=2, batch_size=4, quiet=True))
    assert counts["complete"] == 3 and counts["failed"] == 1
    return out


def _expected(uri: str, array: str, storage_options=None) -> dict[int, np.ndarray]:
    """What the job wrote, read with plain zarr (not through pipeline.store)."""
    import zarr

    store = uri if "://" not in uri else zarr.storage.FsspecStore.from_url(uri, read_only=True,
                                                                           storage_options=storage_options or {})
    g = zarr.open_group(store, mode="r")
    status = np.asarray(g["status"][:])
    return {int(r): np.asarray(g[array][int(r)]).astype(np.float32) for r in np.flatnonzero(status == 1)}


def _check_featurized(uri: str) -> None:
    for array in ("hires", "lowres"):
        expect = _expected(uri, array, {"client_kwargs": {"endpoint_url": __import__("os").environ["AWS_ENDPOINT_URL"]}}
                           if uri.startswith("s3://") else None)
        assert sorted(expect) == [0, 2, 3]  # row 1 (b.jpg) failed and is skipped
        ds = FeatureDataset(uri, array)
        assert ds.rows.tolist() == [0, 2, 3]
        seen = set()
        for batch in ds.loader(2, num_workers=2):
            for j, row in enumerate(batch["row"].tolist()):
                np.testing.assert_array_equal(batch["features"][j].numpy(), expect[row])
                seen.add(row)
        assert seen == {0, 2, 3}
        assert [ds[i]["image_id"] for i in range(3)] == ["a.jpg", "c.jpg", "d.jpg"]


@pytest.mark.slow
def test_featurized_store_local(featurized):
    from pipeline.read.store_info import describe

    _check_featurized(featurized)
    text = describe(featurized)
    assert "hires: 3 complete rows, items (320, 64, 64) float32" in text and "1 failed" in text


@pytest.mark.slow
def test_featurized_store_s3(featurized, s3_bucket):
    import s3fs

    s3fs.S3FileSystem().put(featurized, f"{s3_bucket}/f.zarr", recursive=True)
    _check_featurized(f"{s3_bucket}/f.zarr")


@pytest.mark.slow
def test_store_rows_picture(featurized, tmp_path):
    from pipeline.evaluate.visualize import PANEL_GAP, render_store_rows

    paths = render_store_rows(featurized, [0, 3], tmp_path)
    assert [p.name for p in paths] == ["row000000_a.jpg.png", "row000003_d.jpg.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (3 * 64 + 2 * PANEL_GAP, 64)
            assert np.asarray(im)[:, :64].std() > 10  # the decoded source photo is shown, not a grey panel
    with pytest.raises(StoreError, match=r"row 1 of .* no complete 'hires' features .* complete rows: 0, 2, 3$"):
        render_store_rows(featurized, [1], tmp_path)


def test_label_kinds_folder_fine_and_depth(tmp_path):
    """VOC/ADE-style folders (raw indices, optional zero reduction and lookup), COCO-Stuff 171, 16-bit depth."""
    from pipeline.evaluate.labels import COCO_STUFF_UNUSED_FINE_IDS

    raw = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img.png").write_bytes(_png(raw))
    ade = LabelSource(str(tmp_path), "folder", num_classes=150, reduce_zero_label=True)
    np.testing.assert_array_equal(ade.read("sub/img.jpg"), [[255, 0, 1], [149, 255, 6]])  # id = relative path
    voc = LabelSource(str(tmp_path), "folder", num_classes=21)
    np.testing.assert_array_equal(voc.read("sub/img.jpg"), raw)
    table = tuple(255 if v == 255 else v // 2 for v in range(256))
    np.testing.assert_array_equal(LabelSource(str(tmp_path), "folder", lookup=table).read("sub/img.jpg"),
                                  [[0, 0, 1], [75, 255, 3]])
    fine = np.arange(182, dtype=np.uint8).reshape(14, 13)
    (tmp_path / "000000000007.png").write_bytes(_png(fine))
    f171 = LabelSource(str(tmp_path), "coco-stuff-171").read("7")
    assert f171[f171 != 255].max() == 170 and len(np.unique(f171[f171 != 255])) == 171
    assert (f171.ravel()[list(COCO_STUFF_UNUSED_FINE_IDS)] == 255).all()
    depth = np.full((30, 50), 2500, np.uint16)
    depth[:, :25] = 0
    (tmp_path / "d.png").write_bytes(_png(depth))
    src = LabelSource(str(tmp_path), "depth", depth_scale=1e-3)
    out = src.aligned("d", size=(20, 20), policy="pad", orig_size=(30, 50))
    assert out.dtype == np.float32 and out.shape == (20, 20)
    assert np.allclose(out[:12, 10:], 2.5) and (out[:12, :10] == 0).all() and (out[12:] == 0).all()
    with pytest.raises(FileNotFoundError, match="missing"):
        src.read("missing")
