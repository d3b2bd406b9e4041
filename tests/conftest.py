"""Shared fixtures: one local Ray bound to 127.0.0.1, one real S3 server (moto) on loopback, sample photos.

The S3 endpoint and fake credentials are put in the environment at configure time, before any Ray process
starts, so Ray workers inherit them and s3fs finds the server through ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
from _local_infra import free_port

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "pipeline" / "samples"


def pytest_configure(config: pytest.Config) -> None:
    # Ray must bind loopback only (docs/design.md, "Running"); hub look-ups must fail fast, never retry for 45 s.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    os.environ["FEATUP_TEST_S3_PORT"] = str(port)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ.pop("AWS_PROFILE", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means no GPU either
        has_cuda = False
    try:
        import cupy  # noqa: F401

        has_cupy = True
    except Exception:
        has_cupy = False
    if has_cuda and has_cupy:
        return
    skip = pytest.mark.skip(reason="needs CUDA and CuPy (run infra/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (restored after): on 2 shared cores, OpenMP threads spinning
    under oversubscription make tiny-tensor tests ~20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Folder of the real photos the project ships (JPEG, <= 640 px)."""
    return SAMPLES


@pytest.fixture(scope="session")
def copy_samples(samples_dir):
    """``copy_samples(folder, n)``: copies the first ``n`` shipped photos (sorted by name) into ``folder`` (created
    if needed) and returns it: an input folder for a featurize job."""

    def copy(folder: Path, n: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for p in sorted(samples_dir.glob("*.jpg"))[:n]:
            shutil.copy(p, folder / p.name)
        return folder

    return copy


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL. Buckets are per test."""
    from moto.server import ThreadedMotoServer

    port = int(os.environ["FEATUP_TEST_S3_PORT"])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket on the loopback S3 server; yields ``s3://<name>``."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    if not fs.exists(name):
        fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(autouse=True)
def _collect_ray_garbage(request: pytest.FixtureRequest):
    """After a test that used the session's Ray, collect its garbage (datasets, actor handles, object refs) now.

    Otherwise the cyclic collector runs at an arbitrary later moment, possibly while the next test submits a task:
    seen as a deterministic hang (a worker-lease reply that never reached the driver, CoreWorker::Get waiting
    forever) in one test order, gone with a gc.collect() before the submit (see docs/infra.md)."""
    yield
    if "ray_local" in request.fixturenames:
        gc.collect()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, listening on 127.0.0.1 only; never attaches to a stray cluster."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1_000_000_000,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
