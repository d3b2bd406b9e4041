"""What every job entry point shares: a bad input ends the job with one line on stderr, not a traceback; Ray is
started (or joined) by one function, :func:`init_ray`; paths are checked for ``ray job submit`` by
:func:`check_job_path` (called for every ``flag(path=...)`` field by ``jobs/flags.py``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "user_errors", "run_job", "json_object", "init_ray", "flag", "PATH_ROLES", "ray_working_dir_copy",
    "check_job_path", "demo_dir",
]

#: ``flag(path=ROLE)``: ``"output"`` for a path the job writes (refused when relative inside a Ray job's
#: working-directory copy), ``"input"`` for one it only reads (read from that copy; refused when not there).
PATH_ROLES = ("input", "output")
#: The folders of a Ray session under which a runtime env's working-directory copies live (Ray 2.60:
#: ``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/``).
_WORKING_DIR_COPIES = ("runtime_resources", "working_dir_files")
#: ``--demo`` writes under ``$FEATUP_DEMO_DIR``; unset: ``out/`` locally, ``~/featup-pipeline`` under a Ray job.
DEMO_DIR_ENV = "FEATUP_DEMO_DIR"
DEMO_DIR_UNDER_RAY_JOB = Path("~") / "featup-pipeline"


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
    ``flag=False``). ``compare=False`` keeps a field (credentials, say) out of equality and hashing.
    ``path="output"`` / ``path="input"`` marks a local-path-or-URI field the job writes / only reads: under
    ``ray job submit --working-dir`` :func:`jobs.flags.config_from` checks it with :func:`check_job_path`."""
    if meta.get("path") not in (None, *PATH_ROLES):
        raise ValueError(f"flag(path={meta['path']!r}): expected one of {PATH_ROLES}")
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


def ray_working_dir_copy(cwd: str | os.PathLike[str] | None = None) -> Path | None:
    """The temporary working-directory copy this process runs in, or None (``cwd``: default the current one).

    ``ray job submit --working-dir DIR`` uploads DIR (without ``.gitignore``'d files) and Ray 2.60 starts the
    entrypoint in a copy at ``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/``, deleted
    with the job's runtime environment. The driver's environment names the job only in ``RAY_JOB_CONFIG_JSON_ENV_VAR``
    (its ``runtime_env.working_dir``; there is no ``RAY_JOB_ID``), and a command may ``cd`` elsewhere first, so the
    current directory is what tells: a relative path lands in the copy exactly when the cwd is inside one.
    Without ``--working-dir`` a job runs in the directory ``ray start`` ran in, which stays.
    """
    parts = Path(os.path.abspath(cwd if cwd is not None else os.getcwd())).parts
    n = len(_WORKING_DIR_COPIES)
    for i in range(len(parts) - n):
        if parts[i:i + n] == _WORKING_DIR_COPIES:
            return Path(*parts[:i + n + 1])
    return None


def check_job_path(name: str, role: str, value: Any, copy: Path | None) -> None:
    """Refuse, in one line, a path that under ``ray job submit`` would be lost or not found (no-op if ``copy`` is
    None, i.e. not inside a Ray job's working-directory copy: see :func:`ray_working_dir_copy`).

    Args:
        name: the flag, e.g. ``"--output"``.
        role: ``"output"``: a relative path is refused (it would be written into the copy, which Ray deletes).
            ``"input"``: a relative path that exists in the copy is kept (it was uploaded; reading it is harmless);
            one that does not exist there and names a folder (has a ``/``) is refused; a bare word (``random``,
            ``bilinear``, a file that is not there) is left to the job, which resolves it or says it is not found;
            of ``KIND:VARIANT=PATH`` (an upsampler spec) the PATH is checked.
        value: the field's value: a string, None, a ``NamedTuple`` with a ``uri`` (``NAME=URI`` refs) or a tuple
            of those.

    Raises:
        ConfigError: naming the flag, the value and the fix (an absolute path or an s3:// URI).
    """
    from pipeline.errors import ConfigError

    if copy is None:
        return
    for path in _path_values(value):
        if role == "input" and "=" in path:  # an upsampler spec's KIND:VARIANT=PATH form: the PATH
            path = path.split("=", 1)[1]
        if "://" in path or os.path.isabs(path) or path == "":
            continue
        if role == "output":
            raise ConfigError(
                f"{name} {path!r} is relative, and under ray job submit it would land in Ray's temporary copy of the "
                "working directory, deleted after the job; pass an absolute path or s3:// URI")
        if not os.path.exists(path) and "/" in path.rstrip("/"):
            raise ConfigError(
                f"{name} {path!r} is relative and not in Ray's temporary copy of the working directory (ray job "
                "submit uploads --working-dir without its .gitignore'd files); pass an absolute path or s3:// URI")


def _path_values(value: Any) -> Iterator[str]:
    """The path strings of a path field's value (see :func:`check_job_path`)."""
    if value is None:
        return
    if isinstance(value, (str, os.PathLike)):
        yield os.fspath(value)
    elif isinstance(getattr(value, "uri", None), str):
        yield value.uri
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _path_values(item)


def demo_dir() -> Path:
    """Where ``--demo`` writes its store and pictures: ``$FEATUP_DEMO_DIR``; else ``~/featup-pipeline`` (absolute)
    when running inside a Ray job's working-directory copy (``ray job submit --working-dir``), which Ray deletes;
    else ``out`` (relative to the current directory). A relative ``$FEATUP_DEMO_DIR`` inside such a copy raises
    ConfigError."""
    from pipeline.errors import ConfigError

    copy = ray_working_dir_copy()
    env = os.environ.get(DEMO_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if copy is not None and not path.is_absolute():
            raise ConfigError(
                f"{DEMO_DIR_ENV}={env!r} is relative, and under ray job submit it would land in Ray's temporary copy "
                "of the working directory, deleted after the job; set it to an absolute path")
        return path
    if copy is not None:
        return DEMO_DIR_UNDER_RAY_JOB.expanduser()
    return Path("out")
