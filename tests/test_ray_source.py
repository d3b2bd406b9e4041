"""The Ray Data reader over real Zarr stores (materialized and on-read) in the session's real Ray: one read task per
shard with complete rows, only complete rows, the same values as FeatureDataset, and a 2-worker Ray Train loop
(CPU, tiny) fed from it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.read.dataset import FeatureDataset
from pipeline.read.ray_source import FeatureStoreDatasource, read_feature_store
from pipeline.store import FeatureStoreSchema, Status, create_or_open_store, to_store_dtype, write_shard

pytestmark = pytest.mark.slow

N, S, C, LOW, OUT = 7, 3, 6, (4, 4), (16, 16)


def make_store(path: str, mode: str) -> str:
    """A 7-row store (shards of 3): row 1 failed, shard 2 (row 6) pending, the rest complete."""
    import featup_ops

    schema = FeatureStoreSchema(
        n_rows=N, channels=C, lowres_size=LOW, output_size=OUT, dtype="float16", rows_per_shard=S,
        hires_mode=mode, input_size=OUT if mode == "on-read" else None,
    )
    settings = {
        "backbone": "test", "upsampler": {"kind": "bilateral", "radius": 2, "sigma_spatial": 1.0, "sigma_range": 0.5},
        "upsampler_checkpoint_hash": None, "input_size": list(OUT), "resize_policy": "crop",
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    group, _ = create_or_open_store(path, schema, settings)
    gen = torch.Generator().manual_seed(0)
    up = featup_ops.BilateralUpsampler()
    for shard in range(2):
        rows = range(shard * S, shard * S + S)
        low = torch.randn(S, C, *LOW, generator=gen)
        pixels = torch.randint(0, 256, (S, *OUT, 3), generator=gen, dtype=torch.uint8)
        status = np.array([Status.FAILED if r == 1 else Status.COMPLETE for r in rows], dtype=np.uint8)
        data = {
            "image_id": np.asarray([f"img{r}" for r in rows]), "uri": np.asarray([f"/x/{r}.jpg" for r in rows]),
            "error": np.asarray(["corrupt" if r == 1 else "" for r in rows]),
            "orig_size": np.full((S, 2), 16, np.int32), "valid_size": np.full((S, 2), 16, np.int32),
            "lowres": to_store_dtype(low, "float16"), "status": status,
        }
        if mode == "on-read":
            data["guidance"] = pixels.numpy()
        else:
            from pipeline.io.decode import normalize

            x = normalize(pixels.numpy(), settings["normalization"]["mean"], settings["normalization"]["std"])
            f = torch.from_numpy(data["lowres"]).float()
            data["hires"] = to_store_dtype(up(f, x, OUT), "float16")
        write_shard(group, shard, data)
    return path


@pytest.mark.parametrize("mode", ["materialized", "on-read"])
def test_one_read_task_per_shard_complete_rows_only_same_values(ray_local, tmp_path, mode):
    store = make_store(str(tmp_path / "s.zarr"), mode)
    source = FeatureStoreDatasource(store, channels=4)
    assert len(source.get_read_tasks(parallelism=16)) == 2  # shards 0 and 1; shard 2 has no complete row
    rows = read_feature_store(store, channels=4).take_all()
    assert sorted(r["row"] for r in rows) == [0, 2, 3, 4, 5]
    ds = FeatureDataset(store, channels=4)
    for r in rows:
        item = ds[ds.index_of_row(r["row"])]
        assert r["image_id"] == item["image_id"] == f"img{r['row']}"
        np.testing.assert_array_equal(np.asarray(r["features"]), item["features"].numpy())
        assert np.asarray(r["features"]).shape == (4, *OUT)


def test_ray_train_two_workers_stream_from_a_store(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = make_store(str(tmp_path / "s.zarr"), "on-read")

    def loop(config: dict) -> None:
        import tempfile

        import ray.train
        import torch.distributed as dist
        from ray.train.torch import prepare_model

        torch.manual_seed(0)
        model = prepare_model(torch.nn.Linear(C, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = torch.zeros(1)
        loss = torch.zeros(())
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=2, dtypes=torch.float32):
            pooled = batch["features"].mean(dim=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(pooled), (batch["row"] % 2).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(pooled)
        dist.all_reduce(seen)
        metrics = {"rows_seen": int(seen.item()), "loss": float(loss)}
        with tempfile.TemporaryDirectory() as d:  # Train V2 keeps the metrics reported with a checkpoint
            ckpt = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(model.state_dict(), f"{d}/model.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="from_store", storage_path=str(tmp_path / "runs")),
        # image_id is a string column: torch batches take the numeric ones
        datasets={"train": read_feature_store(store).select_columns(["features", "row"])},
    )
    result = trainer.fit()
    # 5 complete rows; Ray Train splits "train" equally between the 2 workers (streaming_split(equal=True)), so each
    # sees 2 and the odd row is left out
    assert result.metrics["rows_seen"] == 4 and np.isfinite(result.metrics["loss"])
    assert result.checkpoint is not None


def test_dataloader_workers_produce_on_read_hires_on_cpu(tmp_path):
    from pipeline.errors import ConfigError

    store = make_store(str(tmp_path / "s.zarr"), "on-read")
    ds = FeatureDataset(store, channels=(1, 5))
    single = [b["features"] for b in ds.loader(2, shuffle=False)]
    workers = [b["features"] for b in ds.loader(2, shuffle=False, num_workers=2)]
    assert len(single) == len(workers) and sum(len(f) for f in single) == 5
    for a, b in zip(single, workers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the GPU path computes in the consuming process: a DataLoader worker asking for CUDA is refused with one line
    gpu = FeatureDataset(store, device="cuda")
    with pytest.raises(ConfigError, match="num_workers=0"):
        next(iter(gpu.loader(2, shuffle=False, num_workers=1)))
