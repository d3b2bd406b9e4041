"""Helpers for tests that start the project's infra/ scripts: free loopback ports, a private script environment,
and the processes of a started session."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

#: Variables that would point the scripts at another cluster; never inherited.
INHERITED_RAY = ("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> set[int]:
    """Pids of every live process of session ``sid`` (the scripts start each node in its own session). Zombies are
    left out: they are dead, and where PID 1 reaps orphans only now and then they stay listed for seconds."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return {int(p) for p, s, stat in rows if int(s) == sid and not stat.startswith("Z")}


def script_env(root: Path) -> dict[str, str]:
    """Environment for infra/ scripts with state under ``root``: its own Ray dir, auth token (created once) and free
    ports for every port a head opens (Ray's fixed metric defaults 44227/44217 would collide with any other head)."""
    token = root / "auth_token"
    if not token.exists():
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_RAY)}
    env.update(
        FEATUP_RAY_DIR=str(root / "ray"),
        FEATUP_RAY_PORT=str(free_port()),
        FEATUP_DASHBOARD_PORT=str(free_port()),
        FEATUP_RAY_CLIENT_PORT=str(free_port()),
        FEATUP_DASHBOARD_AGENT_PORT=str(free_port()),
        DASHBOARD_METRIC_PORT=str(free_port()),
        AUTOSCALER_METRIC_PORT=str(free_port()),
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    return env
