"""Progress lines of a running plan, one format for every stage::

    featurize: 12/96 rows (0 failed) | 3.10 img/s | ETA 0m27s | 0m04s elapsed | 8 written
    implicit: 3/8 rows (0 failed) | 0.05 img/s | ETA 1m40s | 1m02s elapsed | fitting: step 120/400 (4 img)

A :class:`ProgressBoard` actor (0 CPUs) collects what the workers report with fire-and-forget calls: the rows each
featurizer actor finished (:func:`count_forward_rows`, one report per forward batch, so the count moves between
shard writes even when a shard holds hundreds of rows) and the implicit fitters' current steps. A featurize line
counts the rows through the featurizer (failed ones included) and says how many of them the store already holds
(``written``, read from its status arrays); the last line, printed when the plan ends, is read from the store only.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.fmt import fmt_time

__all__ = ["ProgressBoard", "Progress", "progress_line", "start_board", "report_rows", "count_forward_rows"]


class ProgressBoard:
    """A tiny Ray actor (0 CPUs): the latest fitting state each fitter reported (step, total, images) and the rows
    each stage's workers finished (done, failed) in this run."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[int]] = {}

    def report(self, key: str, state: dict[str, Any]) -> None:
        if state.get("done"):
            self.state.pop(key, None)
        else:
            self.state[key] = state

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.state)

    def add_rows(self, stage: str, done: int, failed: int = 0) -> None:
        """``done`` more rows of ``stage`` finished, ``failed`` of them failed."""
        counts = self.rows.setdefault(stage, [0, 0])
        counts[0] += int(done)
        counts[1] += int(failed)

    def row_counts(self) -> dict[str, tuple[int, int]]:
        """``{stage: (done, failed)}`` reported so far."""
        return {stage: (c[0], c[1]) for stage, c in self.rows.items()}


def start_board() -> Any:
    """Start a :class:`ProgressBoard` actor (Ray must be initialised)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


def report_rows(board: Any, stage: str, done: int, failed: int = 0) -> None:
    """Tell ``board`` (a :class:`ProgressBoard` handle, or None: nothing) that ``done`` rows of ``stage`` finished,
    ``failed`` of them failed. Fire-and-forget (nothing waits for the actor) and never raises: progress is best
    effort."""
    if board is None or (done <= 0 and failed <= 0):
        return
    try:
        board.add_rows.remote(stage, int(done), int(failed))
    except Exception:
        pass


def count_forward_rows(module: Any, board: Any, stage: str = "featurize") -> None:
    """Report the rows of every forward batch ``module`` (a ``torch.nn.Module``) finishes to ``board`` as done rows
    of ``stage`` (a forward hook; the batch size is the first input's first dimension). No-op without a board."""
    if board is None:
        return

    def hook(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
        report_rows(board, stage, len(inputs[0]) if inputs else 0)

    module.register_forward_hook(hook)


def progress_line(
    stage: str, done: int, failed: int, total: int, new: int, elapsed: float, written: int | None = None
) -> str:
    """``<stage>: done/total rows (failed) | rate | ETA | elapsed [| written]``; ``new`` rows were done by this run,
    ``written`` of the ``done`` rows are in the store (None: not shown)."""
    rate = new / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    line = (
        f"{stage}: {done}/{total} rows ({failed} failed) | {rate:.2f} img/s | ETA {fmt_time(eta)} | "
        f"{fmt_time(elapsed)} elapsed"
    )
    return line if written is None else f"{line} | {written} written"


def _fitting(board: Any) -> str:
    import ray

    groups = ray.get(board.snapshot.remote(), timeout=5)
    parts = [
        f"step {g.get('step', 0)}/{g.get('total', '?')} ({g.get('active', g.get('images', '?'))} img)"
        for _, g in sorted(groups.items())
    ]
    return f" | fitting: {', '.join(parts)}" if parts else ""


class Progress:
    """Prints one :func:`progress_line` per stage every ``interval`` seconds while a plan runs, and a last one, read
    from the store, when it ends without an error (best effort: a line that cannot be made is skipped).

    A stage whose workers report rows to ``board`` (the featurizer: ``featurize``) counts them as they finish:
    ``done_before + max(reported, written by this run)`` rows, failed ones likewise, plus ``| N written`` (rows the
    store holds). Other stages count what the store holds.

    Args:
        counts: called for ``{stage: (done, failed, total, done_before)}`` read from the store; may raise while the
            store does not exist yet (that line is skipped).
        interval: seconds between lines.
        say: where lines go.
        board: the plan's :class:`ProgressBoard`, or None.
    """

    def __init__(
        self, counts: Callable[[], dict[str, tuple[int, int, int, int]]], interval: float,
        say: Callable[[str], None], board: Any = None,
    ) -> None:
        self.counts, self.interval, self.say, self.board = counts, interval, say, board
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.failed_before: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _reported(self) -> dict[str, tuple[int, int]]:
        import ray

        return ray.get(self.board.row_counts.remote(), timeout=5) if self.board is not None else {}

    def lines(self, final: bool = False) -> list[str]:
        """One line per stage; ``final``: from the store only (the totals a finished plan leaves)."""
        out = []
        elapsed = time.monotonic() - self.t0
        stored = self.counts()
        reported = {} if final else self._reported()
        for stage, (written, failed, total, before) in stored.items():
            done = written
            if stage in reported:  # rows finished by this run, written or not
                ran, ran_failed = reported[stage]
                failed0 = self.failed_before.get(stage, 0)
                done = before + max(ran, written - before)
                failed = failed0 + max(ran_failed, failed - failed0)
            shown = written if self.board is not None and stage == "featurize" else None
            line = progress_line(stage, done, failed, total, done - before, elapsed, written=shown)
            if stage == "implicit" and self.board is not None and not final:
                line += _fitting(self.board)
            out.append(line)
        return out

    def _say_lines(self, final: bool = False) -> None:
        try:
            for line in self.lines(final):
                self.say(line)
        except Exception:  # progress is best effort; never kill the job over it
            pass

    def _run(self) -> None:
        deadline = self.t0 + self.interval
        while not self.stop.wait(max(0.0, deadline - time.monotonic())):
            self._say_lines()
            # a fixed schedule: one line per interval, however long reading the counts took
            deadline = max(deadline + self.interval, time.monotonic())

    def __enter__(self) -> "Progress":
        try:  # failed rows already in the store (a resumed job); none when the store does not exist yet
            self.failed_before = {stage: c[1] for stage, c in self.counts().items()}
        except Exception:
            self.failed_before = {}
        self.t0 = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if exc_type is None:
            self._say_lines(final=True)
