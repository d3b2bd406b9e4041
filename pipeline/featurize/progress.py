"""Progress lines of a running plan, one format for every stage::

    featurize: 12/96 rows (0 failed) | 3.10 img/s | ETA 0m27s | 0m04s elapsed
    implicit: 3/8 rows (0 failed) | 0.05 img/s | ETA 1m40s | 1m02s elapsed | fitting: step 120/400 (4 img)

Rows done are read from the store's status arrays (what is written is what counts); the implicit fitters' current
steps come from a :class:`ProgressBoard` actor they report to.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.fmt import fmt_time

__all__ = ["ProgressBoard", "Progress", "progress_line", "start_board"]


class ProgressBoard:
    """A tiny Ray actor (0 CPUs): the latest fitting state each fitter reported (step, total, images)."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def report(self, key: str, state: dict[str, Any]) -> None:
        if state.get("done"):
            self.state.pop(key, None)
        else:
            self.state[key] = state

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.state)


def start_board() -> Any:
    """Start a :class:`ProgressBoard` actor (Ray must be initialised)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


def progress_line(stage: str, done: int, failed: int, total: int, new: int, elapsed: float) -> str:
    """``<stage>: done/total rows (failed) | rate | ETA | elapsed``; ``new`` rows were done by this run."""
    rate = new / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (
        f"{stage}: {done}/{total} rows ({failed} failed) | {rate:.2f} img/s | ETA {fmt_time(eta)} | "
        f"{fmt_time(elapsed)} elapsed"
    )


def _fitting(board: Any) -> str:
    import ray

    groups = ray.get(board.snapshot.remote(), timeout=5)
    parts = [
        f"step {g.get('step', 0)}/{g.get('total', '?')} ({g.get('active', g.get('images', '?'))} img)"
        for _, g in sorted(groups.items())
    ]
    return f" | fitting: {', '.join(parts)}" if parts else ""


class Progress:
    """Prints one :func:`progress_line` per stage every ``interval`` seconds while a plan runs (best effort).

    Args:
        counts: called for ``{stage: (done, failed, total, done_before)}``; may raise while the store does not
            exist yet (that line is skipped).
        interval: seconds between lines.
        say: where lines go.
        board: the fitters' :class:`ProgressBoard`, or None.
    """

    def __init__(
        self, counts: Callable[[], dict[str, tuple[int, int, int, int]]], interval: float,
        say: Callable[[str], None], board: Any = None,
    ) -> None:
        self.counts, self.interval, self.say, self.board = counts, interval, say, board
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def lines(self) -> list[str]:
        out = []
        elapsed = time.monotonic() - self.t0
        for stage, (done, failed, total, before) in self.counts().items():
            line = progress_line(stage, done, failed, total, done - before, elapsed)
            if stage == "implicit" and self.board is not None:
                line += _fitting(self.board)
            out.append(line)
        return out

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                for line in self.lines():
                    self.say(line)
            except Exception:  # progress is best effort; never kill the job over it
                pass

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
