"""Run `ray start` for a node that joins a loopback-only cluster on this machine (used by start_ray_worker.sh).

Ray binds 127.0.0.1 only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment of every Ray process
(without it, Ray rewrites ``--node-ip-address=127.0.0.1`` to the machine's external address and binds every
interface). But the same setting makes ``ray start --address=...`` refuse to add a node ("Multi-node Ray clusters
are not supported on Windows and OSX"), because Ray reads it as "this is a laptop". This launcher keeps the setting
for every process the node starts and lets only that one refusal through, by giving the CLI module a view of
``ray_constants`` in which ``ENABLE_RAY_CLUSTER`` is true. Everything else (address resolution, the raylet, the
agents) still sees the loopback setting. Arguments are those of ``ray start``.
"""
from __future__ import annotations

import os
import sys
import types


def main() -> int:
    """Run ``ray start ARGS`` with the multi-node refusal lifted; returns the CLI's exit status."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        print("ray_start_loopback.py: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only) first", file=sys.stderr)
        return 2
    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as ray_cli

    view = types.ModuleType(ray_constants.__name__)
    view.__dict__.update(ray_constants.__dict__)
    view.ENABLE_RAY_CLUSTER = True
    ray_cli.ray_constants = view
    sys.argv = ["ray", "start", *sys.argv[1:]]
    return ray_cli.main()


if __name__ == "__main__":
    sys.exit(main())
