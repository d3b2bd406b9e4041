"""Paths under `ray job submit --working-dir`, and stopping a head while a job runs (issue #23, items 1 and 5).

Ray 2.60 runs a submitted job in a temporary copy of its working directory
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/``) and deletes that copy with the job's
runtime environment, so a relative output path must be refused there in one line (``pipeline.cli.check_job_path``,
applied to every ``flag(path=...)`` field by ``jobs.flags.config_from``), and ``--demo`` must write to a durable
place it prints (``~/featup-pipeline``). The fast tests build that directory layout for real and call the jobs' own
parsers and configs; the slow ones start ONE real head on 127.0.0.1 (infra/start_ray_head.sh) for the module and
submit real jobs to it. The stop test runs last: it stops that head while a job's actor is running.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _local_infra import script_env, session_pids

from jobs.flags import config_from, flag_fields
from pipeline.cli import check_job_path, demo_dir, ray_working_dir_copy
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY = Path(sys.executable).parent / "ray"
JOBS = ("featurize", "featurize_coco", "fit_implicit", "train_upsampler", "eval_probe", "visualize", "materialize")
#: fields that hold a path or URI, and the role each must declare (``flag(path=...)``)
PATH_FIELDS = {"input": "input", "source": "input", "image": "input", "labels": "input", "val_store": "input",
               "weights": "input", "upsampler": "input", "output": "output", "out": "output"}
#: each job's flags with a relative output (and, where it has them, relative inputs present in the copy)
RELATIVE_OUTPUT = {
    "featurize": (["--input", "imgs", "--output", "out/x.zarr"], "--output 'out/x.zarr'"),
    "featurize_coco": (["--input", "imgs", "--output", "out/x.zarr"], "--output 'out/x.zarr'"),
    "fit_implicit": (["--store", "out/x.zarr"], "--store 'out/x.zarr'"),
    "train_upsampler": (["--input", "imgs", "--output", "runs"], "--output 'runs'"),
    "eval_probe": (["--store", "a=/data/a.zarr", "--labels", "imgs", "--out", "results.json"],
                   "--out 'results.json'"),
    "visualize": (["--store", "/data/a.zarr", "--out", "pictures"], "--out 'pictures'"),
    "materialize": (["--source", "/data/a.zarr", "--output", "out/m.zarr"], "--output 'out/m.zarr'"),
}
#: in every job's --help
RAY_JOB_NOTE = "a relative output path is refused there (pass an absolute path or s3:// URI)"
LOST = ("is relative, and under ray job submit it would land in Ray's temporary copy of the working directory, "
        "deleted after the job; pass an absolute path or s3:// URI")


def _job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_submit_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def in_job_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory is a working-directory copy laid out as Ray 2.60 lays it out, holding ``imgs/``."""
    copy = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "imgs").mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("FEATUP_DEMO_DIR", raising=False)
    return copy


# ------------------------------------------------------------------------------------------------ fast
def test_working_dir_copy_is_recognised_from_the_current_directory(tmp_path: Path) -> None:
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    assert ray_working_dir_copy(copy) == copy
    assert ray_working_dir_copy(copy / "jobs") == copy
    assert ray_working_dir_copy(REPO) is None
    assert ray_working_dir_copy(tmp_path / "runtime_resources") is None


@pytest.mark.parametrize("name", JOBS)
def test_every_path_field_declares_its_role(name: str) -> None:
    config = _job(name).CONFIG
    roles = {f.name: f.metadata.get("path") for f in flag_fields(config)}
    expected = {n: r for n, r in PATH_FIELDS.items() if n in roles}
    if "store" in roles:  # fit_implicit writes into its store; the readers only read theirs
        expected["store"] = "output" if name == "fit_implicit" else "input"
    assert expected and {n: roles[n] for n in expected} == expected
    assert RAY_JOB_NOTE in " ".join(_job(name).build_parser().format_help().split())


@pytest.mark.parametrize("name", JOBS)
def test_relative_output_is_refused_in_a_job_copy_in_one_line(name: str, in_job_copy: Path) -> None:
    job = _job(name)
    argv, shown = RELATIVE_OUTPUT[name]
    args = job.build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as e:
        config_from(job.CONFIG, args)
    assert str(e.value) == f"{shown} {LOST}"
    assert not any(in_job_copy.rglob("*.zarr")) and sorted(p.name for p in in_job_copy.iterdir()) == ["imgs"]


def test_outside_a_job_copy_relative_paths_stay_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = _job("featurize")
    cfg = config_from(job.CONFIG, job.build_parser().parse_args(["--input", "imgs", "--output", "out/x.zarr"]))
    assert (cfg.input, cfg.output) == ("imgs", "out/x.zarr")


def test_inputs_in_a_job_copy_are_read_from_it_unless_missing(in_job_copy: Path) -> None:
    job = _job("featurize")
    parse = job.build_parser().parse_args
    base = ["--output", str(in_job_copy.parent / "x.zarr")]  # absolute: accepted
    cfg = config_from(job.CONFIG, parse([*base, "--input", "imgs", "--weights", "random"]))
    assert (cfg.input, cfg.weights) == ("imgs", "random")  # uploaded input kept; a name is not a path
    check_job_path("--upsampler", "input", "featup:dinov2=imgs", in_job_copy)  # a spec's =PATH, uploaded
    for flag, value in (("--input", "data/photos"), ("--upsampler", "runs/lite0/upsampler"),
                        ("--upsampler", "featup:dinov2=ckpt/dinov2.ckpt")):
        with pytest.raises(ConfigError, match="is relative and not in Ray's temporary copy of the working directory"):
            config_from(job.CONFIG, parse([*base, "--input", "imgs", flag, value]))
    probe = _job("eval_probe")
    with pytest.raises(ConfigError, match=r"^--store 'out/a.zarr' is relative and not in Ray's temporary copy"):
        config_from(probe.CONFIG, probe.build_parser().parse_args(
            ["--store", "a=out/a.zarr", "--labels", "imgs", "--out", "/tmp/r.json"]))
    assert config_from(probe.CONFIG, probe.build_parser().parse_args(
        ["--store", "a=s3://b/a.zarr:implicit", "--labels", "imgs", "--out", "s3://b/r.json"])).out == "s3://b/r.json"


def test_demo_dir_is_durable_under_a_job(in_job_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(in_job_copy.parents[4] / "home"))
    assert demo_dir() == in_job_copy.parents[4] / "home" / "featup-pipeline"
    monkeypatch.setenv("FEATUP_DEMO_DIR", "/srv/demo")
    assert demo_dir() == Path("/srv/demo")
    monkeypatch.setenv("FEATUP_DEMO_DIR", "demo")
    with pytest.raises(ConfigError, match=r"^FEATUP_DEMO_DIR='demo' is relative, and under ray job submit"):
        demo_dir()
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("FEATUP_DEMO_DIR")
    assert demo_dir() == Path("out")


# ------------------------------------------------------------------------------------------------ a real head
class Head:
    """A Ray head started by infra/start_ray_head.sh with its own state dir, ports and token."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = script_env(root)
        for key in [k for k in self.env if k.startswith("FEATUP_DEMO")]:
            del self.env[key]
        self.env.update(HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")
        self.dashboard = f"http://127.0.0.1:{self.env['FEATUP_DASHBOARD_PORT']}"
        self.token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text()
        self.pidfile = root / "ray" / "head.pid"

    def start(self) -> None:
        run = subprocess.run([str(INFRA / "start_ray_head.sh"), "--num-cpus=2", "--object-store-memory=300000000"],
                             env=self.env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]

    def stop(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(INFRA / "stop_ray.sh")], env=self.env, capture_output=True, text=True, timeout=120)

    def submit(self, sid: str, entrypoint: list[str], *, working_dir: Path | None = None,
               env_vars: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """``ray job submit --no-wait`` job ``sid``; returns the client process (:meth:`submitted` waits for it)."""
        argv = [str(RAY), "job", "submit", "--no-wait", "--submission-id", sid]
        if working_dir is not None:
            argv += ["--working-dir", str(working_dir)]
        if env_vars:
            argv += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        env = dict(self.env, RAY_AUTH_MODE="token", RAY_API_SERVER_ADDRESS=self.dashboard)
        return subprocess.Popen([*argv, "--", *entrypoint], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def submitted(*clients: subprocess.Popen[str]) -> None:
        for client in clients:
            out, _ = client.communicate(timeout=180)
            assert client.returncode == 0, out[-3000:]

    def _api(self, path: str) -> Any:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def logs(self, sid: str) -> str:
        return self._api(f"/api/jobs/{sid}/logs")["logs"]

    def wait(self, sid: str, timeout_s: float = 400) -> tuple[str, str]:
        """(final status, logs) of job ``sid``; fails the test after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (status := self._api(f"/api/jobs/{sid}")["status"]) in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job {sid} still {status}:\n{self.logs(sid)[-3000:]}"
            time.sleep(1)
        return status, self.logs(sid)


@pytest.fixture(scope="module")
def head():
    """One head for the module (the last test stops it)."""
    root = Path(tempfile.mkdtemp(prefix="js-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    cluster = Head(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def featurize_jobs(head: Head) -> Head:
    """The two featurize jobs, submitted together (they run side by side while the first test waits), with the
    repository as working directory: ``refused`` (a relative --output) and ``demo`` (a small --demo, HOME in a temp
    dir through the job's runtime env)."""
    head.submitted(
        head.submit("refused", ["python", "jobs/featurize.py", "--input", "pipeline/samples",
                                "--output", "out/refused.zarr"], working_dir=REPO),
        head.submit("demo", ["python", "jobs/featurize_coco.py", "--demo", "--limit", "2", "--weights", "random",
                             "--input-size", "64", "--output-size", "64"],
                    working_dir=REPO, env_vars={"HOME": str(head.root / "home")}),
    )
    return head


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_relative_output_under_job_submit_fails_in_one_line_and_writes_nothing(featurize_jobs: Head) -> None:
    head = featurize_jobs
    status, logs = head.wait("refused")
    assert status == "FAILED", logs[-3000:]
    assert f"featurize: --output 'out/refused.zarr' {LOST}\n" in logs
    assert "Traceback" not in logs, logs[-3000:]
    assert not list(head.root.rglob("refused.zarr")) and not (REPO / "out" / "refused.zarr").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_under_job_submit_writes_a_durable_store_it_prints(featurize_jobs: Head) -> None:
    import zarr

    from pipeline.store import complete_rows, open_store

    head = featurize_jobs
    status, logs = head.wait("demo")
    assert status == "SUCCEEDED", logs[-4000:]
    durable = head.root / "home" / "featup-pipeline"
    assert f"demo store: {durable / 'demo.zarr'}\n" in logs
    assert len(complete_rows(open_store(str(durable / "demo.zarr")))) == 2
    # the rows point at photos that outlive the job (copied next to the store), and the pictures are there too
    uris = [str(u) for u in zarr.open_group(str(durable / "demo.zarr"), mode="r")["uri"][:]]
    assert len(uris) == 2 and all(u.startswith(str(durable / "samples")) and Path(u).is_file() for u in uris)
    assert len(list((durable / "demo_pictures").glob("*.png"))) == 2
    assert "runtime_resources" not in "".join(line for line in logs.splitlines() if line.startswith("demo "))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_ray_stops_a_head_with_a_running_job_without_sigkill(head: Head) -> None:
    """Ray's SIGTERM drain waits for running tasks and actors for up to 30 s, longer than stop_ray.sh's 20 s: the
    head was always SIGKILLed. infra/_lib.sh turns the drain off for the nodes it starts."""
    code = ("import os, time, ray\n"
            "ray.init()\n"
            "@ray.remote(num_cpus=1)\n"
            "class Busy:\n"
            "    def ping(self): return os.getpid()\n"
            "    def work(self): time.sleep(600)\n"
            "b = Busy.remote()\n"
            "print('busy', os.getpid(), ray.get(b.ping.remote()), flush=True)\n"
            "ray.get(b.work.remote())\n")
    head.submitted(head.submit("busy", ["python", "-c", code]))
    deadline = time.monotonic() + 300
    while "busy " not in (logs := head.logs("busy")):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)
    driver, actor = map(int, logs.split("busy ", 1)[1].split()[:2])
    assert _alive(driver) and _alive(actor)
    sid = int(head.pidfile.read_text())
    stop = head.stop()
    assert stop.returncode == 0, stop.stderr
    assert "ray head: stopped" in stop.stderr and "killed what was left" not in stop.stderr, stop.stderr
    assert not session_pids(sid) and not head.pidfile.exists()
    assert not _alive(actor)
    deadline = time.monotonic() + 30  # Ray's job watcher kills the driver's process group once the supervisor is gone
    while _alive(driver):
        assert time.monotonic() < deadline, f"the job's driver {driver} outlived the head"
        time.sleep(0.5)
