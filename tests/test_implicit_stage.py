"""The implicit stage: rows written through Ray equal direct fits, resume after a crash, bad rows, odd sizes.

One small store (5 sample photos at 32 px, a random ``test_vit`` backbone, 2 rows per shard -> 3 shards) is made
once per module by the featurize job with ``--implicit`` (the implicit plan runs beside the featurize plan); the
second-pass tests work on copies of it. Fits use a tiny ``ImplicitConfig`` (a few views and steps), so the numbers
mean nothing, only the plumbing.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

BACKBONE = "test_vit"  # timm's tiny ViT (stride 16, 64 channels), random weights: fast and offline
INPUT = 32
IMPLICIT_SIZE = (20, 28)  # neither the input size nor square
ROWS_PER_SHARD = 2
N_IMAGES = 5
SEED = 0  # the featurize job fits with the stage's default seed


def _tiny_cfg():
    from featup_ops.config import IMPLICIT_PRESETS

    return dataclasses.replace(
        IMPLICIT_PRESETS["fast"], n_views=4, view_batch=4, pca_views=4, steps=4, views_per_step=2, proj_dim=8,
        n_freqs=4, hidden_dim=16, early_stop=False,
    )


def _fit(store: str, **kw):
    """The second pass's config with the tiny fit (its ``implicit_*`` flags as the featurize job's)."""
    from pipeline.featurize.implicit_config import FitImplicitConfig

    flags = {"implicit_preset": _tiny_cfg(), "implicit_size": IMPLICIT_SIZE, "implicit_cpus": 0.5,
             "implicit_seed": SEED, "quiet": True}
    return FitImplicitConfig(store=store, **{**flags, **kw})


@pytest.fixture(scope="module")
def made(ray_local, copy_samples, tmp_path_factory):
    """A store made by the featurize job with ``--implicit``: the implicit plan runs beside the featurize plan."""
    from pipeline.featurize import FeaturizeConfig, run_featurize

    root = tmp_path_factory.mktemp("implicit")
    images = copy_samples(root / "images", N_IMAGES)
    store = str(root / "base.zarr")
    result = run_featurize(
        FeaturizeConfig(
            input=str(images), output=store, backbone=BACKBONE, weights="random", input_size=INPUT, upsampler="bilinear",
            rows_per_shard=ROWS_PER_SHARD, dtype="float32", actor_cpus=0.5, batch_size=4, quiet=True,
            implicit=True, implicit_size=IMPLICIT_SIZE, implicit_preset=_tiny_cfg(), implicit_gpus=0,
            implicit_cpus=0.5,
        )
    )
    assert result["complete"] == N_IMAGES
    assert result["implicit"] == {"pending": N_IMAGES, "units": 3, "fitted": N_IMAGES, "failed": 0, "skipped": 0}
    return {"root": root, "store": store, "images": images}


def _copy(made, name: str) -> str:
    dst = made["root"] / name
    shutil.copytree(made["store"], dst)
    return str(dst)


def _read(store: str):
    from pipeline.store import open_store

    g = open_store(store)
    return (
        np.asarray(g["implicit"][:]),
        np.asarray(g["implicit_status"][:]),
        [str(v) for v in np.asarray(g["implicit_error"][:]).tolist()],
    )


def _reset_implicit(store: str) -> None:
    """Forget every implicit row (as if the store had been made without --implicit)."""
    from pipeline.store import open_store

    g = open_store(store, mode="r+")
    g["implicit_status"][:] = 0
    g["implicit"][:] = 0


def _fit_in_process(store: str, rows=None, limit=None, **kw) -> dict[str, int]:
    """The second pass's plan run in this process, one unit at a time, no Ray: its resolved job, the decode stage,
    the fitter and the sink's own lifecycle (``on_write_start``, ``write``); ``kw``: more :func:`_fit` flags."""
    from ray.data.block import BlockAccessor

    from pipeline.featurize.implicit import ImplicitFitter
    from pipeline.featurize.resolve import resolve_fit_implicit
    from pipeline.featurize.stages import decode_units
    from pipeline.store.sink import ZarrFeatureDatasink

    job = resolve_fit_implicit(_fit(store, rows=rows, limit=limit, **kw))
    sink = ZarrFeatureDatasink(store, implicit=job.implicit)
    sink.on_write_start()
    import torch

    threads = torch.get_num_threads()
    try:
        fitter = ImplicitFitter(job.fitter)  # sets the process's torch threads, as it does in its actor
        totals = {"pending": job.pending_fits, "units": len(job.units), "fitted": 0, "failed": 0, "skipped": 0}
        for unit in job.units:
            batch = decode_units({k: np.asarray([v]) for k, v in unit.items()}, job.decode)
            for out in fitter(batch):
                written = sink.write([BlockAccessor.batch_to_block(out)], None)
                totals["fitted"] += written["fitted"]
                totals["failed"] += written["fit_failed"]
    finally:
        torch.set_num_threads(threads)
    return totals


def test_stage_rows_equal_direct_fit(made):
    """Rows written by the Ray actors equal fitting the same decoded image directly (fixed seed, non-square size)."""
    import featup_ops
    from pipeline.io.decode import decode_image
    from pipeline.featurize.implicit import fit_rows
    from pipeline.store.implicit import ATTRS_KEY
    from pipeline.store import open_store

    feats, status, errors = _read(made["store"])
    assert feats.shape == (N_IMAGES, 64, *IMPLICIT_SIZE)
    assert status.tolist() == [1] * N_IMAGES and errors == [""] * N_IMAGES
    g = open_store(made["store"])
    settings = g.attrs[ATTRS_KEY]
    assert settings["output_size"] == list(IMPLICIT_SIZE) and settings["seed"] == SEED
    assert g["implicit"].shards[0] == ROWS_PER_SHARD and g["implicit"].chunks[0] == 1

    import torch

    backbone = featup_ops.load_backbone(BACKBONE, "random")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (0.5 CPU -> 1 thread); tiny tensors spin-wait on a loaded machine
    uris = [str(u) for u in np.asarray(g["uri"][:]).tolist()]
    try:
        for row in (3,):  # one image per call, in another group than the actor fitted it with: same result
            pixels = decode_image(
                Path(uris[row]).read_bytes(), size=(INPUT, INPUT), policy="crop", min_side=16
            ).pixels
            direct, _ = fit_rows(pixels[None], backbone, cfg=_tiny_cfg(), output_size=IMPLICIT_SIZE, seed=SEED)
            ref = direct[0].numpy()
            assert np.isfinite(ref).all() and np.abs(ref).mean() > 0
            np.testing.assert_allclose(feats[row], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    finally:
        torch.set_num_threads(threads)


def test_second_pass_resumes_after_crash(made):
    """Crash after one shard (and mid-way through the next), rerun: the same bytes as the uninterrupted run."""
    from pipeline.featurize.fit_implicit import run_fit_implicit
    from pipeline.store import open_store

    want, _, _ = _read(made["store"])
    store = _copy(made, "crash.zarr")
    _reset_implicit(store)
    # The state a killed second pass leaves: shard 0 done by its actor; shard 1's features half written, its
    # implicit_status never set; shard 2 untouched.
    assert _fit_in_process(store, limit=2)["fitted"] == 2  # the actor's code, in-process, shard 0
    g = open_store(store, mode="r+")
    g["implicit"][2:3] = np.full((1, *want.shape[1:]), 9.0, dtype=want.dtype)  # torn: features, no status
    assert open_store(store)["implicit_status"][:].tolist() == [1, 1, 0, 0, 0]

    result = run_fit_implicit(_fit(store))
    assert result["pending"] == 3 and result["fitted"] == 3 and result["units"] == 2
    feats, status, errors = _read(store)
    assert status.tolist() == [1] * N_IMAGES and errors == [""] * N_IMAGES
    np.testing.assert_allclose(feats, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())

    again = run_fit_implicit(_fit(store))
    assert again["pending"] == 0 and again["fitted"] == 0  # nothing left: a rerun is a no-op


def test_second_pass_bad_rows_and_subset(made):
    """Unreadable / undecodable sources become implicit_status 2 with a reason; --rows and --limit pick rows.

    Runs the plan's two stages in-process (the Ray plan itself is covered above) to keep the suite fast.
    """
    from pipeline.errors import StoreMismatchError
    from pipeline.featurize.fit_implicit import run_fit_implicit
    from pipeline.featurize.implicit_config import ImplicitStageConfig
    from pipeline.store import open_store

    want, _, _ = _read(made["store"])
    store = _copy(made, "bad.zarr")
    _reset_implicit(store)
    junk = made["root"] / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 this is not a jpeg")
    g = open_store(store, mode="r+")
    g["uri"][1:2] = np.asarray([str(junk)])
    g["uri"][3:4] = np.asarray([str(made["root"] / "gone.jpg")])

    result = _fit_in_process(store, rows=(1, 3, 4, 0), limit=3)
    assert result == {"pending": 3, "units": 2, "fitted": 1, "failed": 2, "skipped": 0}
    feats, status, errors = _read(store)
    assert status.tolist() == [1, 2, 0, 2, 0]  # row 4 is past --limit 3 of the chosen rows (0, 1, 3)
    assert errors[0] == "" and errors[1] and errors[3]
    assert "gone.jpg" in errors[3] or "not found" in errors[3].lower()
    assert not feats[1].any() and not feats[3].any()  # failed rows keep the fill value
    np.testing.assert_allclose(feats[0], want[0], rtol=1e-3, atol=1e-3 * np.abs(want).max())

    with pytest.raises(StoreMismatchError, match="output_size"):  # other settings on the same store: refused
        run_fit_implicit(_fit(store, implicit_size=(16, 16)))
    with pytest.raises(ValueError, match="--rows"):
        run_fit_implicit(_fit(store, rows=(99,)))
    assert isinstance(ImplicitStageConfig(preset="paper").fit_config().steps, int)
    with pytest.raises(ValueError, match="--implicit-preset"):
        ImplicitStageConfig(preset="slow")


def test_job_cli(made, capsys):
    """``jobs/fit_implicit.py``: adds the arrays at the store's hires size by default; bad input is one line, rc 2."""
    import importlib.util

    from pipeline.store.implicit import ATTRS_KEY
    from pipeline.store import open_store

    store = _copy(made, "cli.zarr")
    g = open_store(store, mode="r+")
    for name in ("implicit", "implicit_status", "implicit_error"):
        del g[name]
    del g.attrs[ATTRS_KEY]
    spec = importlib.util.spec_from_file_location("fit_implicit_job", Path(__file__).parents[1] / "jobs/fit_implicit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--store", store, "--limit", "0", "--implicit-gpus", "0"]) == 0  # nothing to fit, arrays made
    g = open_store(store)
    assert g["implicit"].shape == g["hires"].shape
    assert g["implicit_status"][:].tolist() == [0] * N_IMAGES
    assert g.attrs[ATTRS_KEY]["preset"] == "lite"
    assert "0 pending" in capsys.readouterr().out
    assert job.main(["--store", str(made["root"] / "missing.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no feature store" in err[0]


def test_store_picture_of_implicit_rows_when_some_rows_have_none(made, tmp_path):
    """With row 0's implicit features missing, the picture of row 1 shows row 1's implicit map (the lowres and
    implicit datasets then hold different rows), and row 0 is refused with one line naming the complete rows."""
    import torch
    from PIL import Image

    from pipeline.read.dataset import FeatureDataset
    from pipeline.errors import StoreError
    from pipeline.store import open_store
    from pipeline.evaluate.visualize import feature_picture, render_store_rows

    store = _copy(made, "partial.zarr")
    open_store(store, mode="r+")["implicit_status"][0] = 0
    g = open_store(store)
    (path,) = render_store_rows(store, [1], tmp_path, array="implicit")
    source = FeatureDataset(store, "lowres").source_pixels(1)
    expected = feature_picture(source, torch.as_tensor(np.asarray(g["lowres"][1])),
                               torch.as_tensor(np.asarray(g["implicit"][1])))
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(expected))
    with pytest.raises(StoreError, match=r"row 0 .* no complete 'implicit' features .* complete rows: 1, 2"):
        render_store_rows(store, [0], tmp_path, array="implicit")


def test_fit_longer_than_the_no_progress_window_is_written_and_reported(made, capsys):
    """Issue 15.3: a fit that takes longer than Ray Data's no-progress window (shortened here to 20 s, which must still
    cover the fitting actor's start-up; the fit is made ~3x longer with many steps) still finishes and is written
    (the fitter's heartbeat rows keep the plan alive), and the job prints progress lines in the featurize format."""
    import re

    from ray.data import DataContext

    from pipeline.featurize.fit_implicit import run_fit_implicit

    from pipeline.store import open_store
    from pipeline.store.implicit import ATTRS_KEY

    store = _copy(made, "long.zarr")
    _reset_implicit(store)
    del open_store(store, mode="r+").attrs[ATTRS_KEY]  # another fit config: a fresh set of implicit features
    slow = dataclasses.replace(_tiny_cfg(), steps=2000)  # ~35 ms per step here: over a minute, 3x the window
    ctx = DataContext.get_current()
    window = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 20
    try:
        result = run_fit_implicit(_fit(store, implicit_preset=slow, rows=(0,), progress_interval_s=2, quiet=False))
    finally:
        ctx.execution_no_progress_timeout_s = window
    assert result["fitted"] == 1 and result["failed"] == 0
    _, status, errors = _read(store)
    assert status.tolist() == [1, 0, 0, 0, 0] and errors[0] == ""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("implicit: ")]
    pattern = r"implicit: \d+/1 rows \(\d+ failed\) \| [\d.]+ img/s \| ETA \S+ \| \S+ elapsed"
    assert any(re.match(pattern, line) for line in lines), lines
    # per group, the step the fit reached (featup_ops.fit_implicit's progress callback, through the ProgressBoard)
    assert any(re.search(r"fitting: step [1-9]\d*/2000 \(1 img\)", line) for line in lines), lines
