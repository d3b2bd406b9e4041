"""infra/: the container image, the KubeRay and `ray up` configs, and the local start/stop scripts.

The configs are parsed (PyYAML) and checked against the code they run: entrypoints name existing jobs/ files with
flags the job's own argparse accepts, every config uses the one image built by infra/Dockerfile, the Ray resources
the pipeline's actors and Train workers ask for exist in the worker groups, the Ray pin agrees with pyproject.toml,
dashboards stay off public addresses and no credential is written in any file. The local scripts are run for real:
everything they start must listen on 127.0.0.1 only (checked with `ss`), require the Ray token, and stop cleanly.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from _local_infra import free_port, script_env, session_pids

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-featurize-coco.yaml"
RAY_UP = INFRA / "ray-up" / "cluster.yaml"
LOCAL_SCRIPTS = ["_lib.sh", "start_ray_head.sh", "start_ray_worker.sh", "stop_ray.sh", "start_s3.sh", "stop_s3.sh"]
LOOPBACK_HOSTS = {"127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:127.0.0.1", "[::1]", "::1"}


# ---------------------------------------------------------------------------------------------------- helpers
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_pin(package: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package} with ==")


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                out.append(v)
            out.extend(_walk(v, key))
    elif isinstance(node, list):
        for v in node:
            out.extend(_walk(v, key))
    return out


def _containers(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, rayStartParams, container) of the head and every worker group."""
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g.get("rayStartParams") or {}, g["template"]["spec"]["containers"][0]) for name, g in groups]


def _expected_image() -> str:
    return f"featup-pipeline:{_pyproject()['project']['version']}"


def _load_job(script: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_infra_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_job_args(script: Path, argv: list[str]) -> Any:
    module = _load_job(script)
    try:
        if hasattr(module, "build_parser"):
            return module.build_parser().parse_args(argv)
        return module.parse_args(argv)
    except SystemExit as e:  # argparse: unknown flag or bad value
        raise AssertionError(f"{script.name} rejects the config's arguments {argv}") from e


_RAY_KEYWORDS = {"num_gpus": "GPU", "num_cpus": "CPU"}


def _ray_resources_in(source: Path) -> set[str]:
    """Ray resource names the module's remote options ask for: num_gpus/num_cpus keywords or dict keys, and the
    keys of any dict literal bound to a name containing 'resources' (custom resources, Train's resources_per_worker).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.keyword) and node.arg in _RAY_KEYWORDS:
            names.add(_RAY_KEYWORDS[node.arg])
        if isinstance(node, ast.Dict):
            for k in node.keys:
                if isinstance(k, ast.Constant) and k.value in _RAY_KEYWORDS:
                    names.add(_RAY_KEYWORDS[k.value])
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name) and "resources" in t.id and isinstance(value, ast.Dict):
                for k in value.keys:
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        names.add(_RAY_KEYWORDS.get(k.value, k.value))
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and "resources" in node.value.id:
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(_RAY_KEYWORDS.get(node.slice.value, node.slice.value))
    return names


def _pipeline_resources() -> set[str]:
    names = set()
    for package in ("featurize", "train"):
        for path in sorted((REPO / "pipeline" / package).glob("*.py")):
            names |= _ray_resources_in(path)
    return names


def _kuberay_group_resources(params: dict[str, Any], container: dict[str, Any]) -> set[str]:
    limits = (container.get("resources") or {}).get("limits") or {}
    names = set()
    if "cpu" in limits and str(params.get("num-cpus", "1")) != "0":
        names.add("CPU")
    if int(str(limits.get("nvidia.com/gpu", 0))) > 0 or int(str(params.get("num-gpus", 0))) > 0:
        names.add("GPU")
    if "resources" in params:  # KubeRay's rayStartParams form: '"{\"name\": 1}"'
        names |= set(json.loads(str(params["resources"]).strip().strip("'\"").replace('\\"', '"')))
    return names


# ---------------------------------------------------------------------------------------------------- image
def test_dockerfile_ray_pin_equals_pyproject() -> None:
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == _pyproject_pin("ray")
    text = DOCKERFILE.read_text()
    assert '"ray[data,train,default]==${RAY_VERSION}"' in text, "the Dockerfile must install Ray at RAY_VERSION"


def test_dockerfile_torch_cuda_and_cupy_agree() -> None:
    args = _dockerfile_args()
    make_torch = re.search(r"^TORCH\s*\?=\s*(.+)$", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    assert f"torch=={args['TORCH_VERSION']}" in make_torch.split()
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in make_torch.split()
    # The CUDA base image and the torch wheel index are the same CUDA major.minor (cu130 <-> 13.0.x).
    cu = re.search(r"/cu(\d+)(\d)$", args["TORCH_INDEX_URL"])
    base = re.search(r":(\d+)\.(\d+)\.\d+-", args["CUDA_IMAGE"])
    assert cu and base and (cu.group(1), cu.group(2)) == base.groups(), (args["TORCH_INDEX_URL"], args["CUDA_IMAGE"])
    gpu_extra = _pyproject()["project"]["optional-dependencies"]["gpu"]
    assert any(d.startswith(f"cupy-cuda{cu.group(1)}x") for d in gpu_extra), gpu_extra
    assert f'"cupy-cuda{cu.group(1)}x==${{CUPY_VERSION}}"' in DOCKERFILE.read_text()
    # Every package the image imports exists in the repo and is copied in.
    for pkg in ("featup_ops", "kernels", "pipeline", "jobs"):
        assert (REPO / pkg).is_dir() and re.search(rf"^COPY .*\b{pkg} {pkg}$", DOCKERFILE.read_text(), flags=re.M)


def test_dockerfile_runs_as_non_root_without_secrets() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER ray$", text, flags=re.M)
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|RAY_AUTH_TOKEN=", text)


# ---------------------------------------------------------------------------------------------------- KubeRay
def test_kuberay_images_version_and_ray_pin() -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")
    job = _one(RAYJOB, "RayJob")
    assert cluster["spec"]["rayVersion"] == _pyproject_pin("ray")
    images = {c["image"] for _, _, c in _containers(cluster)}
    images |= {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    images |= {yaml.safe_load(RAY_UP.read_text())["docker"]["image"]}
    assert len(images) == 1, f"all configs must run the one image, found {images}"
    assert images.pop().endswith("/" + _expected_image())


def test_rayjob_targets_the_raycluster_and_its_entrypoint_runs() -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")
    job = _one(RAYJOB, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    # The image's WORKDIR holds the repository's jobs/ (Dockerfile: WORKDIR + COPY jobs jobs).
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert argv[1].startswith(workdir + "/"), argv[1]
    script = REPO / argv[1][len(workdir) + 1 :]
    assert script.is_file() and script.parent.name == "jobs", f"{argv[1]} is not a file of jobs/"
    args = _parse_job_args(script, argv[2:])
    assert args.input.startswith("s3://") and args.output.startswith("s3://") and args.split == "train2017"
    # An autoscaling GPU group starts at zero GPUs: the pool size must be explicit, and fit the group.
    assert args.num_gpus and args.num_gpus >= 1
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"] if "GPU" in _kuberay_group_resources(
        g.get("rayStartParams") or {}, g["template"]["spec"]["containers"][0])]
    assert sum(g["maxReplicas"] for g in gpu_groups) >= args.num_gpus


def test_kuberay_groups_provide_the_resources_the_pipeline_asks_for() -> None:
    needed = _pipeline_resources()
    assert {"CPU", "GPU"} <= needed, f"could not read the actor options of pipeline/ ({needed})"
    cluster = _one(RAYCLUSTER, "RayCluster")
    groups = {name: _kuberay_group_resources(p, c) for name, p, c in _containers(cluster)}
    assert groups["head"] == set(), "the head must not run featurizer actors or decode tasks (num-cpus 0, no GPU)"
    provided = set().union(*groups.values())
    assert needed <= provided, f"no worker group provides {needed - provided}"
    autoscaled = [g for g in cluster["spec"]["workerGroupSpecs"] if g["maxReplicas"] > g["minReplicas"]]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert any("GPU" in groups[g["groupName"]] for g in autoscaled), "the GPU group must autoscale"
    assert any(groups[g["groupName"]] == {"CPU"} for g in autoscaled), "a CPU-only group must autoscale (decode)"


def test_kuberay_dashboard_is_cluster_internal_and_token_protected() -> None:
    docs = _docs(RAYCLUSTER) + _docs(RAYJOB)
    assert not [d for d in docs if d["kind"] in ("Ingress", "Service", "Route", "Gateway")]
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    service_types = {str(v) for v in _walk(docs, "serviceType") + _walk(docs, "type")}
    assert not {"LoadBalancer", "NodePort"} & service_types
    containers = [c for _, _, c in _containers(cluster)]
    containers += _one(RAYJOB, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], c["name"]
        assert c["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB, RAY_UP], ids=lambda p: p.name)
def test_no_credentials_in_config_files(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is written in the file"
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id|aws_session_token", text)
    for env in _walk(_docs(path), "env"):
        for e in env if isinstance(env, list) else []:
            if re.search(r"(?i)token|secret|password|key", e["name"]) and e["name"] != "RAY_AUTH_MODE":
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{e['name']} must come from a Secret"


def test_kuberay_s3_access_via_irsa_service_account() -> None:
    sa = _one(RAYCLUSTER, "ServiceAccount")
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)
    pods = [g["template"]["spec"] for g in [_one(RAYCLUSTER, "RayCluster")["spec"]["headGroupSpec"],
                                              *_one(RAYCLUSTER, "RayCluster")["spec"]["workerGroupSpecs"]]]
    pods.append(_one(RAYJOB, "RayJob")["spec"]["submitterPodTemplate"]["spec"])
    assert all(p["serviceAccountName"] == sa["metadata"]["name"] for p in pods)


# ---------------------------------------------------------------------------------------------------- ray up
def test_ray_up_dashboard_on_head_loopback_and_no_public_ingress() -> None:
    cfg = yaml.safe_load(RAY_UP.read_text())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        cidrs = [r["CidrIp"] for r in perm.get("IpRanges", [])] + [r["CidrIpv6"] for r in perm.get("Ipv6Ranges", [])]
        assert not {"0.0.0.0/0", "::/0"} & set(cidrs), f"security group opens {perm} to the internet"
        assert (perm["FromPort"], perm["ToPort"]) == (22, 22), "only SSH may be opened; reach 8265 via `ray dashboard`"
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_ray_up_nodes_use_instance_profiles_and_provide_pipeline_resources() -> None:
    cfg = yaml.safe_load(RAY_UP.read_text())
    types = cfg["available_node_types"]
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    provided = {r for n, t in types.items() if n != cfg["head_node_type"] for r, v in t["resources"].items() if v}
    assert _pipeline_resources() <= provided
    gpu = [n for n, t in types.items() if t["resources"].get("GPU")]
    assert gpu and all(types[n]["max_workers"] > types[n]["min_workers"] for n in gpu)


# ---------------------------------------------------------------------------------------------------- scripts
def test_local_scripts_bind_loopback_and_never_stop_other_rays() -> None:
    for name in LOCAL_SCRIPTS:
        text = (INFRA / name).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\bray stop\b|\bpkill\b|\bkillall\b", code), f"{name} kills processes by name"
        assert "0.0.0.0" not in code, name
    head = (INFRA / "start_ray_head.sh").read_text()
    for flag in ("--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true"):
        assert flag in head
    assert "--node-ip-address=127.0.0.1" in (INFRA / "start_ray_worker.sh").read_text()
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in (INFRA / "_lib.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in (INFRA / "_lib.sh").read_text()
    assert "moto_server -H 127.0.0.1" in (INFRA / "start_s3.sh").read_text()
    for name in LOCAL_SCRIPTS[1:]:
        assert os.access(INFRA / name, os.X_OK), f"{name} is not executable"


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(host, port, pid) of every TCP/UDP socket the given processes listen on, from `ss -ltunpH`."""
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[4]
        host, _, port = local.rpartition(":")
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((host, int(port), pid))
    return found


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def short_tmp():
    """A short temp dir: Ray's unix socket paths under it must stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fi-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _script_env(tmp_path: Path) -> dict[str, str]:
    return dict(script_env(tmp_path), FEATUP_S3_DIR=str(tmp_path / "s3"))


def test_stop_session_ignores_dead_children_nobody_reaped(tmp_path: Path) -> None:
    """A process that died but is not yet reaped (a zombie; PID 1 of a container or micro-VM may reap orphans only now
    and then) is not a survivor: listing it made stop_session wait out its timeout and the head test fail in CI."""
    leader = ("import subprocess, sys, time; child = subprocess.Popen(['true']); "
              "print(child.pid, flush=True); time.sleep(60)")
    script = f"""
        source {shlex.quote(str(INFRA / "_lib.sh"))}
        start_detached {tmp_path}/p.pid {tmp_path}/p.log {shlex.quote(sys.executable)} -c {shlex.quote(leader)}
        sid=$(cat {tmp_path}/p.pid)
        until [ -s {tmp_path}/p.log ] && ps -o stat= -p "$(cat {tmp_path}/p.log)" | grep -q Z; do sleep 0.1; done
        echo "sid $sid"
        echo "live $(session_pids "$sid" | tr '\\n' ' ')"
        stop_session {tmp_path}/p.pid test-session
        echo "after $(session_pids "$sid" | tr '\\n' ' ')"
    """
    env = dict(os.environ, FEATUP_RAY_DIR=str(tmp_path), FEATUP_STOP_TIMEOUT="30")
    run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()}
    sid, zombie = int(lines["sid"][0]), int((tmp_path / "p.log").read_text())
    assert lines["live"] == [str(sid)], run.stdout  # the leader, not its dead child
    assert lines["after"] == [], run.stdout
    assert "test-session: stopped" in run.stderr and "killed what was left" not in run.stderr, run.stderr
    assert zombie != sid


def test_session_pids_helper_leaves_out_zombies() -> None:
    """The tests' own session_pids (tests/_local_infra.py) agrees with the scripts' one on unreaped children."""
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; c = subprocess.Popen(['true']); print(c.pid, flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        zombie = int(leader.stdout.readline())
        while subprocess.run(["ps", "-o", "stat=", "-p", str(zombie)], capture_output=True, text=True).stdout[:1] != "Z":
            pass
        assert session_pids(leader.pid) == {leader.pid}
    finally:
        leader.kill()
        leader.wait()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
@pytest.mark.slow
def test_local_head_script_listens_on_loopback_only_and_requires_the_token(short_tmp: Path) -> None:
    tmp_path = short_tmp
    env = _script_env(tmp_path)
    try:
        run = subprocess.run(
            [str(INFRA / "start_ray_head.sh"), "--num-cpus=0", "--object-store-memory=80000000"],
            env=env, capture_output=True, text=True, timeout=150,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", run.stdout, flags=re.M))
        dashboard = f"http://127.0.0.1:{env['FEATUP_DASHBOARD_PORT']}"
        assert exports == {"RAY_API_SERVER_ADDRESS": dashboard, "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"]}
        sid = int((tmp_path / "ray" / "head.pid").read_text())
        sockets = _listening(session_pids(sid))
        ports = {port for _, port, _ in sockets}
        assert {int(env["FEATUP_RAY_PORT"]), int(env["FEATUP_DASHBOARD_PORT"])} <= ports, sockets
        public = [s for s in sockets if s[0] not in LOOPBACK_HOSTS]
        assert not public, f"Ray listens beyond loopback: {public}"
        # The job API refuses requests without the token and accepts the right one.
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
        assert _get(f"{dashboard}/api/jobs/", None) == 401
        assert _get(f"{dashboard}/api/jobs/", "0" * 64) == 403
        assert _get(f"{dashboard}/api/jobs/", token) == 200
        # A second start with the same state dir is refused instead of starting a second head.
        again = subprocess.run([str(INFRA / "start_ray_head.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stop = subprocess.run([str(INFRA / "stop_ray.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    # A clean stop: `ray start --block` stopped its raylet, GCS and the rest on SIGTERM, without the SIGKILL fallback
    # (a head stopped while a job runs: tests/test_job_submit.py).
    assert "ray head: stopped" in stop.stderr and "killed what was left" not in stop.stderr, stop.stderr
    assert not session_pids(sid), "processes of the head survived stop_ray.sh"
    assert not (tmp_path / "ray" / "head.pid").exists()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
def test_local_s3_script_serves_on_loopback_and_stops(tmp_path: Path) -> None:
    env = _script_env(tmp_path)
    env["FEATUP_S3_PORT"] = str(free_port())
    try:
        run = subprocess.run([str(INFRA / "start_s3.sh"), "featup-test"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr[-3000:]
        exports = dict(re.findall(r"(\w+)=(\S+)", "\n".join(re.findall(r"^export (.+)$", run.stdout, flags=re.M))))
        endpoint = f"http://127.0.0.1:{env['FEATUP_S3_PORT']}"
        assert exports["AWS_ENDPOINT_URL"] == endpoint and exports["AWS_EC2_METADATA_DISABLED"] == "true"
        sid = int((tmp_path / "s3" / "moto.pid").read_text())
        sockets = _listening(session_pids(sid))
        assert [(h, p) for h, p, _ in sockets] == [("127.0.0.1", int(env["FEATUP_S3_PORT"]))], sockets
        # The bucket the script was asked for exists on that server.
        with urllib.request.urlopen(endpoint + "/", timeout=10) as r:
            assert b"<Name>featup-test</Name>" in r.read()
    finally:
        stop = subprocess.run([str(INFRA / "stop_s3.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not session_pids(sid)
