"""Progress lines (issue 23.2): rows count as the featurizer finishes them, not only when a shard is written, and the
last line's totals are the store's. Through a real local Ray, real featurizer actors and a real store."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.featurize import FeaturizeConfig, run_featurize
from pipeline.featurize.progress import Progress, progress_line, report_rows, start_board
from pipeline.store import open_store, status_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINE = re.compile(
    r"featurize: (\d+)/(\d+) rows \((\d+) failed\) \| [\d.]+ img/s \| ETA \S+ \| \S+ elapsed \| (\d+) written$"
)


def test_progress_line_format():
    assert progress_line("implicit", 3, 1, 8, 2, 4.0) == (
        "implicit: 3/8 rows (1 failed) | 0.50 img/s | ETA 0m10s | 0m04s elapsed")
    assert progress_line("featurize", 3, 1, 8, 2, 4.0, written=0).endswith("| 0m04s elapsed | 0 written")


def test_reported_rows_move_the_line_between_store_writes(ray_local):
    """A resumed job (10 rows, 1 failed, in the store before the run): rows the workers report count at once; rows
    written later are not counted twice; the last line (on a clean exit) is the store's."""
    store = {"featurize": (10, 1, 40, 10), "implicit": (2, 0, 5, 2)}  # (done, failed, total, done_before)
    said: list[str] = []
    board = start_board()
    with Progress(lambda: dict(store), 600, said.append, board) as progress:
        report_rows(board, "featurize", 5, 2)  # 5 rows featurized, 2 of them failed to decode
        ray_local.get(board.row_counts.remote())  # the fire-and-forget report has been handled
        assert progress.lines()[0].startswith("featurize: 15/40 rows (3 failed) |")
        assert progress.lines()[0].endswith("| 10 written")
        assert re.match(r"implicit: 2/5 rows \(0 failed\) \| [\d.]+ img/s \| ETA \S+ \| \S+ elapsed$",
                        progress.lines()[1])
        store["featurize"] = (14, 2, 40, 10)  # 4 of them written, 1 failed
        assert progress.lines()[0].startswith("featurize: 15/40 rows (3 failed) |")
        assert progress.lines()[0].endswith("| 14 written")
        store["featurize"] = (15, 3, 40, 10)
        assert progress.lines()[0].startswith("featurize: 15/40 rows (3 failed) |")
        report_rows(board, "featurize", 3)
        store["featurize"] = (22, 3, 40, 10)  # written rows the board has not heard of yet still count
        ray_local.get(board.row_counts.remote())
        assert progress.lines()[0].startswith("featurize: 22/40 rows (3 failed) |")
        assert said == []  # no interval has passed
        report_rows(board, "featurize", 20)  # reported but never written (the run ended without them)
    assert said[0].startswith("featurize: 22/40 rows (3 failed) |") and said[0].endswith("| 22 written")
    assert said[1].startswith("implicit: 2/5 rows (0 failed) |")


def test_on_read_featurizer_reports_every_row(ray_local, samples_dir):
    """The on-read (compact) featurizer runs no upsampler; its rows are reported too, decode failures included."""
    from pipeline.featurize.stages import Featurizer, ModelSpec
    from pipeline.io.decode import decode_image

    px = decode_image((samples_dir / "skate.jpg").read_bytes(), size=(64, 64)).pixels
    ok = [True, False, True, True]
    batch = {"shard": np.array([0, 1]), "n": np.array([4, 2]), "pixels": np.stack([[px] * 4] * 2),
             "ok": np.array([ok, [True, False, False, False]]),  # unit 1 has 2 real rows, 1 failed
             "orig_size": np.zeros((2, 4, 2), np.int32), "valid_size": np.zeros((2, 4, 2), np.int32),
             "meta": np.array(["{}", "{}"], dtype=object)}
    board = start_board()
    spec = ModelSpec("efficientnet_lite0", "random", None, (64, 64), "float32", 1, hires_mode="on-read")
    out = Featurizer(spec, board=board)(batch)
    assert "guidance" in out and "hires" not in out
    assert ray_local.get(board.row_counts.remote()) == {"featurize": (6, 2)}


def test_featurize_lines_move_before_the_only_shard_is_written(ray_local, copy_samples, tmp_path, capsys):
    """Six photos and one bad file in one shard: progress lines report featurized rows strictly between 0 and the
    total while the store still holds none, and the last line's totals are the store's."""
    folder = copy_samples(tmp_path / "in", 6)
    (folder / "z_bad.jpg").write_bytes(b"not an image\n")
    out = str(tmp_path / "out.zarr")
    # the shipped JBU at 128 px, one image per forward pass: ~0.2 s an image here, many 0.1 s intervals
    cfg = FeaturizeConfig(input=str(folder), output=out, weights="random", input_size=128, batch_size=1,
                          rows_per_shard=7, progress_interval_s=0.1, quiet=False)
    result = run_featurize(cfg)
    stored = status_counts(open_store(out))
    assert result["units_run"] == 1 and result["rows"] == 7
    assert (stored["complete"], stored["failed"], stored["pending"]) == (6, 1, 0)

    printed = capsys.readouterr().out.splitlines()
    lines = [(int(d), int(t), int(f), int(w)) for d, t, f, w in
             (LINE.match(line).groups() for line in printed if LINE.match(line))]
    assert lines and all(t == 7 for _, t, _, _ in lines)
    between = [(d, f) for d, _, f, w in lines if 0 < d < 7 and w == 0]
    assert between, printed  # counts that moved before the shard was written
    assert all(f == 1 for _, f in between)  # the bad file counts as a failed row as soon as the featurizer sees it
    done = [d for d, _, _, _ in lines]
    assert done == sorted(done)
    # the last progress line and the closing line are the store's
    assert lines[-1] == (7, 7, stored["failed"], stored["complete"] + stored["failed"])
    assert printed[-1] == next(line for line in printed if line.startswith("featurize: done in"))
    assert printed[-1].endswith(f": {stored['complete']} complete, {stored['failed']} failed, 0 pending")
    assert (result["complete"], result["failed"]) == (stored["complete"], stored["failed"])
