"""A write that fails mid-job (here: a file where the store needs a folder, a real OSError from the filesystem)
ends a real job process with one line naming the store, the reason and the fix, exit code 2; the same command then
resumes to the store a clean run wrote."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.featurize import run_featurize
from pipeline.store import open_store, status_counts
from test_store_format import assert_foreign_readers_agree

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--weights", "random", "--input-size", "64", "--rows-per-shard", "2", "--batch-size", "2", "--limit", "4",
        "--num-actors", "1", "--torch-threads", "1", "--quiet"]
NUMERIC = ("orig_size", "valid_size", "lowres", "hires", "status")


def _config(samples_dir: Path, out: str):
    """The FeaturizeConfig the job builds from the same flags (same fingerprint as the job process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_job_featurize", REPO / "jobs" / "featurize.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from jobs.flags import config_from
    from pipeline.featurize import FeaturizeConfig

    return config_from(FeaturizeConfig, job.build_parser().parse_args(["--input", str(samples_dir), "--output", out,
                                                                       *TINY]))


def test_a_failed_write_is_one_line_and_the_store_resumes(ray_local, samples_dir, tmp_path):
    out = tmp_path / "feats.zarr"
    cfg = _config(samples_dir, str(out))
    assert run_featurize(cfg)["complete"] == 4
    clean = {name: np.asarray(open_store(str(out))[name][:]) for name in NUMERIC}
    open_store(str(out), mode="r+")["status"][0:2] = np.zeros(2, np.uint8)  # shard 0 pending again ...
    shutil.rmtree(out / "hires" / "c" / "0")
    (out / "hires" / "c" / "0").write_text("not a folder")  # ... and its hires object cannot be written
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "featurize.py"), "--input", str(samples_dir),
                           "--output", str(out), *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"featurize: store {str(out)!r}: writing failed: Not a directory; a file stands where "
                           "the store needs a folder"), proc.stderr[-3000:]
    assert last.endswith("the store is resumable: rerun the same command (written shards are kept)")
    assert "Traceback" not in proc.stderr and "RayTaskError" not in proc.stderr, proc.stderr[-3000:]
    assert status_counts(open_store(str(out))) == {"complete": 2, "failed": 0, "pending": 2}
    (out / "hires" / "c" / "0").unlink()  # the fix; then the same job resumes
    result = run_featurize(cfg)
    assert result["resumed"] and result["units_run"] == 1 and result["pending"] == 0
    again = open_store(str(out))
    for name in NUMERIC:
        np.testing.assert_array_equal(np.asarray(again[name][:]), clean[name], err_msg=name)
    assert_foreign_readers_agree(str(out))  # a store the job wrote: tensorstore and xarray read what zarr reads
