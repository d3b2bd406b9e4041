"""What every job entry point shares: a bad input ends the job with one line on stderr, not a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["user_errors", "run_job", "json_object"]


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
