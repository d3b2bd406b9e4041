"""Two drivers, one output: the store's lock lets one featurize job write it; a second job started on the same
output is refused with one line (exit 2), local and s3://. Real job processes (jobs/featurize.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreBusyError
from pipeline.store import open_store, status_counts
from pipeline.store.checksum import verify_store
from pipeline.store.foreign import read_rows_sidecar
from pipeline.store.lock import lock_uri, store_lock

REPO = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(REPO / "jobs" / "featurize.py")]
#: A tiny job: 4 sample photos, random EfficientNet-Lite0 weights, 64 px, two shards of two rows.
TINY = ["--weights", "random", "--input-size", "64", "--rows-per-shard", "2", "--batch-size", "2", "--limit", "4",
        "--num-actors", "1", "--torch-threads", "1", "--quiet"]


def _output(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if where == "local":
        return str(tmp_path / "feats.zarr")
    return request.getfixturevalue("s3_bucket") + "/feats/feats.zarr"


def _exists(uri: str) -> bool:
    from pipeline.io.storage import filesystem

    fs, path = filesystem(uri)
    fs.invalidate_cache()
    return fs.exists(path)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_a_locked_output_is_refused_with_one_line(where, tmp_path, request, samples_dir):
    out = _output(where, tmp_path, request)
    with store_lock(out, job="featurize"):  # this test process is the first, still running driver
        proc = subprocess.run([*JOB, "--input", str(samples_dir), "--output", out, *TINY],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = proc.stderr.strip()
        assert "\n" not in err, err
        assert err.startswith(f"featurize: store {out!r} is being written by featurize job pid {os.getpid()} on "
                              f"{socket.gethostname()}") and f"delete {lock_uri(out)!r}" in err
        assert not _exists(out)  # the refused job wrote nothing
    assert not _exists(lock_uri(out))  # released when the holder's block ended


def test_a_lock_left_by_a_dead_job_on_this_host_is_taken_over(tmp_path):
    out = str(tmp_path / "f.zarr")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path(lock_uri(out)).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
    with store_lock(out):
        held = json.loads(Path(lock_uri(out)).read_text())
        assert held["pid"] == os.getpid()
    Path(lock_uri(out)).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    with pytest.raises(StoreBusyError, match="pid 1 on elsewhere"):
        with store_lock(out):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_started_at_once_never_interleave(where, tmp_path, request, samples_dir):
    """Both start together: one writes the store, the other is refused with one line (or, had the first finished
    before the second looked, resumes a complete store and changes nothing); the store is one clean run's."""
    out = _output(where, tmp_path, request)
    procs = [subprocess.Popen([*JOB, "--input", str(samples_dir), "--output", out, *TINY],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes in ([0, 0], [0, 2]), [(rc, err[-1500:]) for rc, _, err in results]
    for rc, _, err in results:
        if rc == 2:
            assert "\n" not in err.strip() and "is being written by featurize job pid" in err, err
    g = open_store(out)
    assert status_counts(g) == {"complete": 4, "failed": 0, "pending": 0}
    assert all(not rows for rows in verify_store(out).values())  # every chunk intact: no torn, mixed shards
    rows = read_rows_sidecar(out)
    assert rows.column("row").to_pylist() == [0, 1, 2, 3]
    assert rows.column("image_id").to_pylist() == [str(v) for v in np.asarray(g["image_id"][:])]
    assert not _exists(lock_uri(out))


def test_fit_implicit_on_a_locked_store_is_refused_with_one_line(tmp_path):
    out = str(tmp_path / "feats.zarr")
    with store_lock(out, job="featurize"):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "fit_implicit.py"), "--store", out],
                              capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith(f"fit_implicit: store {out!r} is being written by featurize job pid {os.getpid()}")
