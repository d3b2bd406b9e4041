"""A two-node Ray cluster on one machine, through the project's own scripts and `ray job submit`.

The head (infra/start_ray_head.sh, no GPU) and a stand-in "GPU node" (infra/start_ray_worker.sh --num-gpus 1) are
separate `ray start` processes on 127.0.0.1 with their own temp dir, ports and auth token, so they never meet the
session Ray of other tests. Featurizer actors ask for one GPU each, so Ray must place them on the GPU node, while
decode/write tasks run on the head. The featurize job is submitted to the head's job API; mid-run the GPU node is
killed (SIGKILL to every process of that node) and a replacement node joins, as an autoscaler would provide. The job
must still finish with every row complete exactly once, and the store must equal a single-node run of the same job.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _local_infra import free_port, script_env, session_pids

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY = REPO / ".venv" / "bin" / "ray"

#: Images in the test split: enough shards (one image each) that the kill lands mid-run.
N_IMAGES = 16
#: The job's settings, shared by the cluster run and the single-node reference run.
JOB_ARGS = ["--input-size", "64", "--rows-per-shard", "1", "--batch-size", "1", "--decode-cpus", "0.25"]


class LocalCluster:
    """Head + worker nodes started by infra/ scripts in a private state dir; everything is stopped by :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = script_env(root)
        self.token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text()
        self.env.update(
            HF_HUB_OFFLINE="1",
            RAY_DEDUP_LOGS="0",
            # Notice a dead node in ~3 s instead of Ray's default ~15-30 s.
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        self.dashboard = f"http://127.0.0.1:{self.env['FEATUP_DASHBOARD_PORT']}"

    def _run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
        r = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{argv[0]} failed:\n{r.stderr[-4000:]}"
        return r.stdout

    def start_head(self, *args: str) -> None:
        self._run([str(INFRA / "start_ray_head.sh"), *args])

    def add_node(self, name: str, *args: str) -> int:
        env = dict(self.env, FEATUP_WORKER_NAME=name, FEATUP_DASHBOARD_AGENT_PORT=str(free_port()))
        self._run([str(INFRA / "start_ray_worker.sh"), *args], env=env)
        return int((self.root / "ray" / f"worker-{name}.pid").read_text())

    def kill_node(self, name: str) -> None:
        """Crash a node: SIGKILL every process of its session (raylet, workers, agents) at once."""
        pidfile = self.root / "ray" / f"worker-{name}.pid"
        sid = int(pidfile.read_text())
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile.unlink()

    def stop(self) -> None:
        subprocess.run([str(INFRA / "stop_ray.sh")], env=self.env, capture_output=True, timeout=120)

    def api(self, path: str) -> Any:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        env = dict(self.env, RAY_AUTH_MODE="token", RAY_API_SERVER_ADDRESS=self.dashboard)
        self._run([str(RAY), "job", "submit", "--no-wait", "--submission-id", submission_id,
                   "--working-dir", str(REPO), "--", *entrypoint], env=env)

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        except (urllib.error.URLError, KeyError):  # pragma: no cover - diagnostics only
            return "<no logs>"

    def wait_job(self, submission_id: str, timeout_s: float) -> tuple[str, str]:
        """Poll until the job leaves PENDING/RUNNING (failing the test after ``timeout_s``); returns (status, logs)."""
        deadline = time.monotonic() + timeout_s
        while (job := self.job_status(submission_id)) in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job still {job}:\n{self.job_logs(submission_id)[-4000:]}"
            time.sleep(1)
        return job, self.job_logs(submission_id)

    def state(self, resource: str) -> list[dict[str, Any]]:
        """Ray's state API (``ray list tasks/actors/nodes``) over the dashboard."""
        data = self.api(f"/api/v0/{resource}?limit=10000&detail=1")
        return data["data"]["result"]["result"]


@pytest.fixture()
def cluster_root():
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _coco_split(root: Path, samples_dir: Path) -> Path:
    """A COCO-layout root with N_IMAGES photos in val2017/ (the shipped samples, repeated)."""
    split = root / "coco" / "val2017"
    split.mkdir(parents=True)
    photos = sorted(samples_dir.glob("*.jpg"))
    for i in range(N_IMAGES):
        shutil.copy(photos[i % len(photos)], split / f"{i + 1:012d}.jpg")
    return root / "coco"


def _status(store: Path) -> np.ndarray | None:
    import zarr

    try:
        return zarr.open_group(str(store), mode="r")["status"][:]
    except Exception:  # not created yet
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_featurize_job_on_two_nodes_survives_losing_the_gpu_node(
    cluster_root: Path, samples_dir: Path, ray_local
) -> None:
    import zarr

    from pipeline.featurize import FeaturizeConfig, run_featurize

    coco = _coco_split(cluster_root, samples_dir)
    store = cluster_root / "multinode.zarr"
    cluster = LocalCluster(cluster_root)
    sid = "featurize-multinode"
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"[multinode] {time.monotonic() - t0:6.1f}s {what}", flush=True)

    # The single-node run: the same job on the session's local Ray (CPU actors), first.
    reference = cluster_root / "single.zarr"
    cfg = FeaturizeConfig(input=str(coco), output=str(reference), kind="coco", split="val2017", num_gpus=0,
                          input_size=64, rows_per_shard=1, batch_size=1, quiet=True)
    assert run_featurize(cfg)["complete"] == N_IMAGES
    mark("single-node reference done")

    try:
        cluster.start_head("--num-cpus=1", "--object-store-memory=100000000")
        cluster.add_node("gpu1", "--num-cpus=1", "--num-gpus=1", "--object-store-memory=100000000")
        mark("head + gpu1 up")
        cluster.submit(sid, ["python", "jobs/featurize_coco.py", "--input", str(coco), "--split", "val2017",
                             "--output", str(store), "--num-gpus", "1", "--progress-interval-s", "2", *JOB_ARGS])

        mark("submitted")
        # Kill the GPU node as soon as it has featurized a row, well before the end.
        deadline = time.monotonic() + 150
        while True:
            status = _status(store)
            done = 0 if status is None else int((status != 0).sum())
            if done >= 1:
                break
            job = cluster.job_status(sid)
            assert job in ("PENDING", "RUNNING"), f"job {job} before the kill:\n{cluster.job_logs(sid)[-4000:]}"
            assert time.monotonic() < deadline, f"no rows after 150 s:\n{cluster.job_logs(sid)[-4000:]}"
            time.sleep(0.1)
        assert done <= N_IMAGES - 4, f"the job finished {done} rows before the node could be killed"
        gpu1 = {n["node_id"] for n in cluster.state("nodes") if n["resources_total"].get("GPU")}
        cluster.kill_node("gpu1")
        killed_at = done
        mark(f"killed gpu1 after {done} rows")
        # A replacement GPU node joins (what the autoscaler does on a real cluster).
        cluster.add_node("gpu2", "--num-cpus=1", "--num-gpus=1", "--object-store-memory=100000000")

        mark("gpu2 up")
        job, logs = cluster.wait_job(sid, 150)
        mark(f"job {job}")
        assert job == "SUCCEEDED", logs[-4000:]
        counts = json.loads([line for line in logs.splitlines() if line.startswith('{"rows"')][-1])
        assert (counts["rows"], counts["complete"], counts["failed"], counts["pending"]) == (N_IMAGES, N_IMAGES, 0, 0)

        # Where the work ran: featurizer actors only on GPU nodes (both the killed one and its replacement), decode
        # tasks on the head.
        nodes = cluster.state("nodes")
        head = {n["node_id"] for n in nodes if n["is_head_node"]}
        gpu_nodes = {n["node_id"] for n in nodes if n["resources_total"].get("GPU")}
        assert len(gpu1) == 1 and gpu1 < gpu_nodes and len(gpu_nodes) == 2
        actors = [a for a in cluster.state("actors") if "Featurizer" in a["class_name"]]
        actor_nodes = {a["node_id"] for a in actors}
        assert actor_nodes and actor_nodes <= gpu_nodes, (actor_nodes, gpu_nodes)
        # Rows were done before the kill, when gpu1 was the only node able to host the featurizer; after it, the actor
        # was restarted on the replacement (the state API reports an actor's latest node).
        assert (gpu_nodes - gpu1) & actor_nodes, "the featurizer was not restarted on the replacement node"
        decode_nodes = {t["node_id"] for t in cluster.state("tasks") if "decode_units" in t["name"] and t["node_id"]}
        assert head & decode_nodes, f"no decode task ran on the head ({decode_nodes})"
    finally:
        cluster.stop()
        mark("cluster stopped")
    assert not any(p.suffix == ".pid" for p in (cluster_root / "ray").iterdir()), "a node survived stop_ray.sh"

    # Every row complete exactly once, and the store equals the single-node run of the same job.
    assert killed_at < N_IMAGES
    got, want = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    assert (got["status"][:] == 1).all(), got["status"][:]
    for name in ("image_id", "uri", "orig_size", "valid_size", "error"):
        np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)
    for name in ("lowres", "hires"):
        a, b = got[name][:].astype(np.float32), want[name][:].astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2, err_msg=name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_worker_training_across_two_nodes_survives_losing_one(cluster_root: Path, samples_dir: Path) -> None:
    """Ray Train, 2 workers (gloo) forced onto the two nodes; one node dies after a checkpoint; training resumes."""
    import glob

    from featup_ops import load_upsampler

    runs = cluster_root / "runs"  # both nodes share this machine's disk: a valid shared storage_path
    cluster = LocalCluster(cluster_root)
    sid = "train-multinode"
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"[multinode-train] {time.monotonic() - t0:6.1f}s {what}", flush=True)

    try:
        # 2 CPUs per node and 1.5 per Train worker: one worker fits per node, 0.5 CPU is left for decode tasks.
        cluster.start_head("--num-cpus=2", "--object-store-memory=100000000")
        cluster.add_node("w1", "--num-cpus=2", "--object-store-memory=100000000")
        mark("head + w1 up")
        cluster.submit(sid, ["python", "jobs/train_upsampler.py", "--input", str(samples_dir), "--output", str(runs),
                             "--name", "mn", "--steps", "6", "--batch-size", "1", "--input-size", "64",
                             "--jitters", "2", "--val-images", "2", "--val-every", "6", "--checkpoint-every", "2",
                             "--log-every", "1", "--workers", "2", "--cpus-per-worker", "1.5", "--max-failures", "2"])
        mark("submitted")
        deadline = time.monotonic() + 300
        while not glob.glob(str(runs / "mn" / "checkpoint_*")):
            job = cluster.job_status(sid)
            assert job in ("PENDING", "RUNNING"), f"job {job} before a checkpoint:\n{cluster.job_logs(sid)[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{cluster.job_logs(sid)[-4000:]}"
            time.sleep(0.2)
        workers = [a for a in cluster.state("actors") if "TrainWorker" in a["class_name"] and a["state"] == "ALIVE"]
        head = {n["node_id"] for n in cluster.state("nodes") if n["is_head_node"]}
        assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers
        assert head & {w["node_id"] for w in workers}
        assert cluster.job_status(sid) == "RUNNING"
        cluster.kill_node("w1")
        mark("first checkpoint; killed w1")
        cluster.add_node("w2", "--num-cpus=2", "--object-store-memory=100000000")
        mark("w2 up")
        job, logs = cluster.wait_job(sid, 300)
        mark(f"job {job}")
        assert job == "SUCCEEDED", logs[-4000:]
        assert "train_upsampler: step 6;" in logs, logs[-3000:]
    finally:
        cluster.stop()
        mark("cluster stopped")
    # The exported upsampler is the final step's, trained by both workers.
    up = load_upsampler(str(runs / "mn" / "upsampler"))
    assert up.checkpoint_meta["step"] == 6 and up.checkpoint_meta["train"]["workers"] == 2
