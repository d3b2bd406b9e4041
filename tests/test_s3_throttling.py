"""An object store that throttles: through a fault-injecting proxy on loopback (tests/_fault_proxy.py) in front of
the real S3 server, 10% of requests answered ``503 SlowDown`` and 2% of connections reset (half before the request
reaches the server, half after it was applied), a featurize job and a ``FeatureDataset`` read finish with exactly
the store and items of a clean run, with the project's default retry settings (pipeline/io/storage.py). The retry
settings are reached through ``--storage-options`` and a store that never stops throttling fails in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _fault_proxy import FaultProxy

from jobs.flags import config_from, parser_for
from pipeline.errors import StorageAccessError
from pipeline.featurize import FeaturizeConfig, run_featurize
from pipeline.io.storage import DEFAULT_S3_RETRIES, check_writable, resolve_storage_options
from pipeline.read.dataset import FeatureDataset
from pipeline.store import open_store
from pipeline.store.foreign import read_rows_sidecar

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BUCKET = "t-throttling"
#: The flags of both runs (as test_featurize.py: a random-weights stride-32 backbone on 64 px inputs), 2 shards.
FLAGS = ["--weights", "random", "--input-size", "64", "--rows-per-shard", "2", "--batch-size", "4", "--quiet",
         "--progress-interval-s", "1"]


def _config(src: str, out: str, storage_options: dict | None = None) -> FeaturizeConfig:
    """The job's config parsed from its command line, as `jobs/featurize.py` parses it."""
    argv = ["--input", src, "--output", out, *FLAGS]
    if storage_options is not None:
        argv += ["--storage-options", json.dumps(storage_options)]
    return config_from(FeaturizeConfig, parser_for(FeaturizeConfig).parse_args(argv))


@pytest.fixture(scope="module")
def source(s3_server, copy_samples, tmp_path_factory):
    """``s3://t-throttling/in`` holding 4 of the shipped photos (uploaded straight to the server)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    folder = copy_samples(tmp_path_factory.mktemp("photos"), 4)
    fs.put(str(folder) + "/", f"{BUCKET}/in/", recursive=True)
    yield f"s3://{BUCKET}/in"
    fs.rm(BUCKET, recursive=True)


@pytest.fixture(scope="module")
def proxy(s3_server):
    """One throttling proxy for the module: 10% ``503 SlowDown``, 2% connection resets, seed 3."""
    with FaultProxy(s3_server, slowdown=0.10, reset=0.02, seed=3) as p:
        yield p


@pytest.fixture(scope="module")
def clean(ray_local, source):
    """The reference: the same job straight to the S3 server."""
    out = f"s3://{BUCKET}/clean.zarr"
    result = run_featurize(_config(source, out))
    assert result["complete"] == 4 and result["pending"] == 0
    return out


@pytest.fixture(scope="module")
def throttled(clean, source, proxy):
    """The job through the proxy, input and output alike, with the default retry settings."""
    out = f"s3://{BUCKET}/throttled.zarr"
    before = proxy.counts.copy()
    result = run_featurize(_config(source, out, {"client_kwargs": {"endpoint_url": proxy.url}}))
    return out, result, proxy.counts - before


def test_featurize_through_a_throttling_store_equals_a_clean_run(clean, throttled):
    out, result, seen = throttled
    assert result["complete"] == 4 and result["pending"] == 0 and result["failed"] == 0
    # the faults really happened, to reads and writes, of every kind
    assert seen["slowdown GET"] > 0 and seen["slowdown PUT"] > 0, seen
    assert seen["reset_before"] > 0 and seen["reset_after"] > 0, seen
    a, b = open_store(clean), open_store(out)
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert read_rows_sidecar(clean).equals(read_rows_sidecar(out))


def test_feature_dataset_reads_through_a_throttling_store(clean, throttled, proxy):
    """The DataLoader path (``__getitems__``): every item equal to the clean store's, none lost to a fault."""
    out, _, _ = throttled
    before = proxy.faults
    ds = FeatureDataset(out, "hires", storage_options={"client_kwargs": {"endpoint_url": proxy.url}})
    got = ds.__getitems__(list(range(len(ds))))
    assert proxy.faults > before
    want = FeatureDataset(clean, "hires")
    assert len(got) == len(want) == 4
    for item, ref in zip(got, (want[i] for i in range(len(want)))):
        assert item["image_id"] == ref["image_id"] and item["row"] == ref["row"]
        torch.testing.assert_close(item["features"], ref["features"], rtol=0, atol=0)


def test_default_retries_apply_unless_options_or_environment_say_otherwise(monkeypatch):
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_storage_options("s3://b/k")["config_kwargs"]["retries"] == DEFAULT_S3_RETRIES
    mine = {"config_kwargs": {"retries": {"max_attempts": 2}, "read_timeout": 30}}
    got = resolve_storage_options("s3://b/k", mine)["config_kwargs"]
    assert got == mine["config_kwargs"] and got["retries"] is not mine["config_kwargs"]["retries"]  # botocore edits it
    assert "config_kwargs" not in resolve_storage_options("/local/path", {})
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert "retries" not in resolve_storage_options("s3://b/k").get("config_kwargs", {})


@pytest.mark.parametrize("retries, tries", [({"mode": "standard", "total_max_attempts": 3}, 3),
                                            ({"mode": "adaptive", "total_max_attempts": 2}, 2),
                                            ({"max_attempts": 1}, 2)],
                         ids=["standard", "adaptive", "max_attempts"])
def test_retry_settings_are_reached_through_storage_options(s3_server, source, retries, tries):
    """A store that answers every request 503: the HEAD of the bucket is tried exactly as often as the options say
    (``max_attempts`` counts retries, ``total_max_attempts`` all tries), then fails in one line naming the fix."""
    with FaultProxy(s3_server, slowdown=1.0, reset=0.0) as always:
        so = {"skip_instance_cache": True, "client_kwargs": {"endpoint_url": always.url},
              "config_kwargs": {"retries": retries}}
        cfg = _config(source, f"s3://{BUCKET}/never.zarr", so)
        with pytest.raises(StorageAccessError) as info:
            check_writable(cfg.output, cfg.storage_options)
        assert always.methods == {"HEAD": tries}
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"--output 's3://{BUCKET}/never.zarr': the object store kept "
                                                "answering 'slow down'"), text
    assert '"total_max_attempts": 20' in text


def test_a_lost_answer_to_the_lock_put_does_not_refuse_the_job(s3_server, source):
    """The conditional put of the store's lock is applied, then its answer is lost (reset after forwarding): the
    retry finds the object there (412). The lock holds this job's token, so the job owns it."""
    from pipeline.store.lock import store_lock

    def lose_first_lock_answer(method: str, target: str, n: int) -> str | None:
        return "reset_after" if method == "PUT" and target.endswith(".lock") and n == 0 else None

    with FaultProxy(s3_server, slowdown=0.0, reset=0.0, rule=lose_first_lock_answer) as p:
        with store_lock(f"s3://{BUCKET}/locked.zarr", {"client_kwargs": {"endpoint_url": p.url}}):
            pass
        assert p.counts["reset_after PUT"] == 1


def test_an_input_read_still_throttled_after_the_retries_leaves_the_unit_pending_not_a_failed_row(s3_server, source):
    """Throttling is the store's fault, not the image's: the read raises (the unit fails, stays pending, and a rerun
    retries it) instead of recording a failed row no rerun would retry; a missing image is still a failed row."""
    from pipeline.io.decode import read_and_decode

    with FaultProxy(s3_server, slowdown=1.0, reset=0.0) as always:
        so = {"skip_instance_cache": True, "client_kwargs": {"endpoint_url": always.url},
              "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}}}
        uri = f"{source}/bird_full.jpg"
        with pytest.raises(StorageAccessError, match="stays pending") as info:
            list(read_and_decode([uri], so, size=(32, 32), policy="crop"))
        assert "\n" not in str(info.value) and uri in str(info.value)
    direct = {"skip_instance_cache": True, "client_kwargs": {"endpoint_url": s3_server}}
    rows = list(read_and_decode([f"{source}/no_such_photo.jpg"], direct, size=(32, 32), policy="crop"))
    assert rows[0][1] is None and rows[0][2].startswith("read failed (FileNotFoundError")
