"""What every job entry point shares: a bad input ends the job with one line on stderr, not a traceback; Ray is
started (or joined) by one function, :func:`init_ray`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["user_errors", "run_job", "json_object", "init_ray", "flag"]


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean the user's input or settings are wrong; each message names the thing and the fix."""
    from featup_ops.errors import FeatupError
    from kernels.errors import KernelInputError
    from pipeline.errors import PipelineError

    return (PipelineError, FeatupError, KernelInputError)


def run_job(prog: str, body: Callable[[], int]) -> int:
    """Run a job's ``body`` and return its exit code; a user error prints ``"<prog>: <message>"`` and returns 2."""
    try:
        return body()
    except user_errors() as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def json_object(text: str) -> dict[str, Any]:
    """argparse ``type=`` for options given as a JSON object (``--storage-options``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"anon\": true}}', got {text!r}")
    return value


def flag(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
         compare: bool = True, repr: bool = True, **meta: Any) -> Any:
    """A config field that is also a job flag (``jobs/flags.py`` builds the parser from it): ``help`` and the
    ``meta`` keys :func:`jobs.flags.parser_for` reads (``aliases``, ``type``, ``repeat``, ``metavar``, ``group``,
    ``flag=False``). ``compare=False`` keeps a field (credentials, say) out of equality and hashing."""
    kw: dict[str, Any] = {"compare": compare, "repr": repr, "metadata": {"help": help, **meta}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, **kw)
    return dataclasses.field(default=default, **kw)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Start Ray the one way every job does: join ``address`` (or the cluster in ``RAY_ADDRESS``, as under
    ``ray job submit``), else start a local Ray on 127.0.0.1. No-op when Ray is already initialised.

    The local Ray has no dashboard and binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's job API
    and dashboard have no authentication, so a local head must not listen on the network). ``log_to_driver``: show
    the workers' output (training prints from its workers; the featurize plan reports through the driver).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=log_to_driver,
    )
