"""Implicit features kept as functions (``--implicit-store function|both``): each row's fitted network and basis in
``implicit_params`` (+ the ``guidance`` image), rendered by the reader at any size.

Two stores made by the featurize job with ``--implicit``, identical settings (4 sample photos at 32 px, a random
``test_vit`` backbone, PCA to 8 channels, float16, 2 rows per shard, a tiny ``ImplicitConfig``), one keeping the
features (``array``) and one the functions: read through ``FeatureDataset`` they agree within float16 rounding; the
function store reads at any size (equal to rendering the stored networks directly, and to a direct fit); a
damaged, missing or mismatching stored network is refused with one line; resume and refusal of other settings work
as for arrays; the second pass keeps ``both``. The fits' numbers mean nothing, only the plumbing.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

BACKBONE = "test_vit"  # timm's tiny ViT (stride 16, 64 channels), random weights: fast and offline
INPUT = 32
IMPLICIT_SIZE = (20, 28)
N_IMAGES = 4
PCA = 8
EPS16 = 2.0**-10  # relative rounding of one float16 value


def _tiny_cfg():
    from featup_ops.config import IMPLICIT_PRESETS

    return dataclasses.replace(
        IMPLICIT_PRESETS["fast"], n_views=4, view_batch=4, pca_views=4, steps=4, views_per_step=2, proj_dim=8,
        n_freqs=4, hidden_dim=16, early_stop=False,
    )


def _featurize(images: Path, out: str, **kw):
    from pipeline.featurize import FeaturizeConfig, run_featurize

    return run_featurize(FeaturizeConfig(
        input=str(images), output=out, backbone=BACKBONE, weights="random", input_size=INPUT, rows_per_shard=2,
        upsampler="bilinear",
        dtype="float16", pca=PCA, actor_cpus=0.5, batch_size=4, quiet=True, implicit=True,
        implicit_size=IMPLICIT_SIZE, implicit_preset=_tiny_cfg(), implicit_gpus=0, implicit_cpus=0.5, **kw,
    ))


def _fit(store: str, store_as: str):
    """The second pass's config with the tiny fit, keeping ``store_as``."""
    from pipeline.featurize.implicit_config import FitImplicitConfig

    return FitImplicitConfig(store=store, implicit_preset=_tiny_cfg(), implicit_size=IMPLICIT_SIZE, implicit_cpus=0.5,
                             implicit_store=store_as, quiet=True)


@pytest.fixture(scope="module")
def made(ray_local, copy_samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit_fn")
    images = copy_samples(root / "images", N_IMAGES)
    array, function = str(root / "array.zarr"), str(root / "function.zarr")
    assert _featurize(images, array)["implicit"]["fitted"] == N_IMAGES
    res = _featurize(images, function, implicit_store="function")
    assert res["complete"] == N_IMAGES and res["implicit"]["fitted"] == N_IMAGES
    return {"root": root, "images": images, "array": array, "function": function}


def _copy(made, name: str, src: str = "function") -> str:
    dst = made["root"] / name
    shutil.copytree(made[src], dst)
    return str(dst)


def _all(ds) -> torch.Tensor:
    return torch.cat([b["features"] for b in ds.loader(3, shuffle=False)])


def test_function_store_reads_equal_the_array_store(made):
    from pipeline.read.dataset import FeatureDataset
    from pipeline.store import open_store
    from pipeline.store.implicit import ATTRS_KEY

    a, f = FeatureDataset(made["array"], "implicit"), FeatureDataset(made["function"], "implicit")
    assert len(a) == len(f) == N_IMAGES and a.item_shape == f.item_shape == (PCA, *IMPLICIT_SIZE)
    x, y = _all(a), _all(f)
    assert torch.isfinite(y).all() and float(y.abs().max()) > 0
    torch.testing.assert_close(y, x, rtol=0, atol=2 * EPS16 * float(x.abs().max()))  # float16 rounding
    g = open_store(made["function"])
    assert "implicit" not in g and g["guidance"].dtype == np.uint8
    assert g["guidance"].shape == (N_IMAGES, INPUT, INPUT, 3)
    params = g["implicit_params"]
    settings = g.attrs[ATTRS_KEY]
    assert params.dtype == np.float32 and params.shape == (N_IMAGES, settings["function_size"])
    assert params.chunks == (1, settings["function_size"]) and params.shards[0] == 2  # sharded like feature rows
    assert settings["store_as"] == "function" and "store_as" not in open_store(made["array"]).attrs[ATTRS_KEY]
    from pipeline.store.checksum import has_checksums

    assert has_checksums(params) and has_checksums(g["guidance"])


def test_any_size_equals_rendering_the_stored_networks_and_a_direct_fit(made):
    import featup_ops
    from featup_ops.implicit_function import ImplicitFunctions
    from featup_ops.pca import PCABasis, apply_pca
    from pipeline.errors import ConfigError
    from pipeline.io.decode import normalize
    from pipeline.read.dataset import FeatureDataset
    from pipeline.read.ray_source import read_feature_store
    from pipeline.store import open_store, read_attrs
    from pipeline.store.implicit import ATTRS_KEY, function_layout_of, implicit_config_of

    size = (40, 24)
    ds = FeatureDataset(made["function"], "implicit", size=size, channels=(2, 6), crop=(4, 2, 30, 20))
    assert ds.item_shape == (4, 30, 20)
    item = ds[1]
    g = open_store(made["function"])
    attrs, row = read_attrs(g), item["row"]
    layout = function_layout_of(attrs, implicit_config_of(g.attrs[ATTRS_KEY]))
    fns = ImplicitFunctions(torch.from_numpy(np.asarray(g["implicit_params"][row : row + 1])), layout)
    norm = attrs["normalization"]
    images = normalize(np.asarray(g["guidance"][row : row + 1]), norm["mean"], norm["std"])
    want = fns.render(images, size).to(torch.float16).float()[0, 2:6, 4:34, 2:22]
    torch.testing.assert_close(item["features"], want, rtol=0, atol=2 * EPS16 * float(want.abs().max()))

    # the same image fitted directly (same seed and config), read out at that size: the same features
    backbone = featup_ops.load_backbone(BACKBONE, "random")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (0.5 CPU -> 1 thread)
    try:
        direct = featup_ops.fit_implicit(images, backbone, cfg=_tiny_cfg(), output_size=size, seed=0)
    finally:
        torch.set_num_threads(threads)
    direct = apply_pca(direct, PCABasis.from_dict(attrs["pca"]))[0, 2:6, 4:34, 2:22]
    torch.testing.assert_close(item["features"], direct, rtol=1e-3, atol=2e-3 * float(direct.abs().max()))

    # the Ray source yields what the dataset yields
    rows = read_feature_store(made["function"], "implicit", size=size).take_all()
    assert [r["row"] for r in rows] == list(range(N_IMAGES))
    full = FeatureDataset(made["function"], "implicit", size=size)
    torch.testing.assert_close(torch.from_numpy(np.stack([r["features"] for r in rows])), _all(full))

    with pytest.raises(ConfigError, match="--implicit-store function"):  # a stored array has one size
        FeatureDataset(made["array"], "implicit", size=size)


def test_damaged_missing_or_mismatching_networks_are_refused_in_one_line(made):
    from pipeline.errors import CorruptDataError, StoreError
    from pipeline.read.dataset import FeatureDataset
    from pipeline.store import open_store
    from pipeline.store.implicit import ATTRS_KEY

    damaged = Path(_copy(made, "damaged.zarr"))
    shard = damaged / "implicit_params" / "c" / "1" / "0"  # rows 2, 3; row 2's chunk first
    data = bytearray(shard.read_bytes())
    for i in range(40, 104):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError) as e:
        FeatureDataset(str(damaged), "implicit")[2]
    assert "\n" not in str(e.value) and "row 2 of 'implicit_params' is damaged" in str(e.value)

    nan = _copy(made, "nan.zarr")
    open_store(nan, mode="r+")["implicit_params"][3, 5] = np.nan
    with pytest.raises(StoreError, match="row 3's implicit network .* non-finite"):
        FeatureDataset(nan, "implicit")[3]

    missing = Path(_copy(made, "missing.zarr"))
    shutil.rmtree(missing / "implicit_params")
    foreign = _copy(made, "foreign.zarr")
    g = open_store(foreign, mode="r+")
    recorded = dict(g.attrs[ATTRS_KEY])
    recorded["config"] = {**recorded["config"], "hidden_dim": 24}  # another network than the one stored
    g.attrs[ATTRS_KEY] = recorded
    for store, what in ((str(missing), "'implicit_params' array is missing"), (foreign, "are not the ones")):
        with pytest.raises(StoreError, match=what) as e:
            FeatureDataset(store, "implicit")
        assert "\n" not in str(e.value) and "implicit" in str(e.value)
    assert len(FeatureDataset(str(missing), "lowres")) == N_IMAGES  # the rest of the store still reads


def test_resume_and_other_settings_refused(made):
    from pipeline.errors import StoreMismatchError
    from pipeline.featurize.fit_implicit import run_fit_implicit
    from pipeline.store import open_store

    from test_implicit_stage import _fit_in_process

    store = _copy(made, "resume.zarr")
    g = open_store(store, mode="r+")
    want = np.asarray(g["implicit_params"][:])
    guidance = np.asarray(g["guidance"][:])
    g["implicit_status"][2:4] = 0  # a crash after shard 1's networks were written, before its status
    g["implicit_params"][2:3] = 9.0
    assert _fit_in_process(store, implicit_store="function")["fitted"] == 2  # the fitter and the sink, in-process
    g = open_store(store)
    assert g["implicit_status"][:].tolist() == [1] * N_IMAGES
    np.testing.assert_allclose(g["implicit_params"][:], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    np.testing.assert_array_equal(g["guidance"][:], guidance)
    for other in ("array", "both"):
        with pytest.raises(StoreMismatchError, match="store_as"):
            run_fit_implicit(_fit(store, other))
    with pytest.raises(StoreMismatchError, match="store_as"):  # the featurize job refuses it too
        _featurize(made["images"], made["array"], implicit_store="function")


def test_second_pass_keeps_both_and_reads_the_array_unless_a_size_is_asked(made):
    """``jobs/fit_implicit.py --implicit-store both`` on a store made without implicit features: the array equals
    the array store's, the functions render it at any size."""
    import importlib.util

    from pipeline.read.dataset import FeatureDataset
    from pipeline.store import open_store
    from pipeline.store.implicit import ATTRS_KEY

    def without_implicit(name: str) -> str:
        store = _copy(made, name, src="array")
        g = open_store(store, mode="r+")
        for array in ("implicit", "implicit_status", "implicit_error"):
            del g[array]
        del g.attrs[ATTRS_KEY]
        return store

    spec = importlib.util.spec_from_file_location("fit_implicit_job",
                                                  Path(__file__).parents[1] / "jobs/fit_implicit.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cli = without_implicit("cli.zarr")  # the flag: arrays made, nothing fitted (--limit 0)
    assert job.main(["--store", cli, "--limit", "0", "--implicit-gpus", "0", "--implicit-store", "function"]) == 0
    g = open_store(cli)
    assert "implicit" not in g and g["implicit_params"].shape[0] == N_IMAGES and "guidance" in g
    assert g.attrs[ATTRS_KEY]["store_as"] == "function" and g.attrs[ATTRS_KEY]["preset"] == "lite"

    from pipeline.featurize.fit_implicit import run_fit_implicit

    store = without_implicit("both.zarr")
    res = run_fit_implicit(_fit(store, "both"))
    assert res["fitted"] == N_IMAGES and res["failed"] == 0
    g = open_store(store)
    assert {"implicit", "implicit_params", "guidance"} <= set(g.array_keys())
    want = np.asarray(open_store(made["array"])["implicit"][:]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(g["implicit"][:]).astype(np.float32), want, rtol=1e-3,
                               atol=1e-3 * np.abs(want).max())
    stored = FeatureDataset(store, "implicit")
    assert stored._on_read is None  # both, no size: the stored array
    rendered = FeatureDataset(store, "implicit", size=IMPLICIT_SIZE)
    x, y = _all(stored), _all(rendered)
    torch.testing.assert_close(y, x, rtol=0, atol=2 * EPS16 * float(x.abs().max()))
    assert g.attrs[ATTRS_KEY]["store_as"] == "both"


def test_schema_declares_the_function_arrays():
    """``implicit_arrays``: the function's arrays per ``store_as``; an on-read store's own ``guidance`` is reused."""
    from pipeline.errors import ConfigError
    from pipeline.store import FeatureStoreSchema

    kw = dict(n_rows=5, channels=8, lowres_size=(2, 2), output_size=(32, 32), rows_per_shard=2)
    mat, onread = FeatureStoreSchema(**kw), FeatureStoreSchema(**kw, hires_mode="on-read", input_size=(32, 32))
    both = mat.implicit_arrays((20, 28), store_as="both", function_size=100, input_size=(32, 32))
    assert list(both) == ["implicit", "implicit_params", "guidance", "implicit_error", "implicit_status"]
    assert both["implicit_params"].shards == (2, 100) and both["guidance"] == onread.arrays()["guidance"]
    assert list(onread.implicit_arrays((20, 28), store_as="function", function_size=100)) == [
        "implicit_params", "implicit_error", "implicit_status"]  # guidance is a main array of an on-read store
    assert list(mat.implicit_arrays((20, 28))) == ["implicit", "implicit_error", "implicit_status"]
    with pytest.raises(ConfigError, match="--implicit-store 'fn'"):
        mat.implicit_arrays((20, 28), store_as="fn")


def test_on_read_store_keeps_its_functions_beside_its_one_guidance(made):
    """``--hires on-read --implicit --implicit-store function``: the compact store holds lowres, one guidance array
    (shared by hires-on-read and the implicit functions), the networks; no hires, no implicit array. Both feature
    kinds read back: implicit equal to the function store's, hires equal to a materialized store's."""
    from pipeline.read.dataset import FeatureDataset
    from pipeline.store import open_store

    out = str(made["root"] / "on_read_function.zarr")
    res = _featurize(made["images"], out, implicit_store="function", hires="on-read")
    assert res["complete"] == N_IMAGES and res["implicit"]["fitted"] == N_IMAGES
    g = open_store(out)
    assert {"lowres", "guidance", "implicit_params"} <= set(g.array_keys())
    assert "hires" not in g and "implicit" not in g
    np.testing.assert_array_equal(g["guidance"][:], open_store(made["function"])["guidance"][:])

    y, f = _all(FeatureDataset(out, "implicit")), _all(FeatureDataset(made["function"], "implicit"))
    torch.testing.assert_close(y, f, rtol=0, atol=2 * EPS16 * float(f.abs().max()))
    materialized = FeatureDataset(made["array"], "hires")
    on_read = FeatureDataset(out, "hires")
    assert on_read.item_shape == materialized.item_shape
    want = _all(materialized)
    torch.testing.assert_close(_all(on_read), want, rtol=0, atol=2 * EPS16 * float(want.abs().max()))
