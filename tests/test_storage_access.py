"""Storage that cannot be reached or written fails early, with one line naming the path, the reason and the fix,
and every job entry point prints a bad input as one line (exit code 2) instead of a traceback.

Against the real S3 server on loopback: a missing bucket, no credentials, an endpoint where nothing listens."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from _local_infra import free_port

from featup_ops.errors import FeatupError
from pipeline.errors import InputNotFoundError, StorageAccessError
from pipeline.io.sources import build_manifest
from pipeline.io.storage import check_writable
from pipeline.store import open_store
from pipeline.train import TrainJobConfig, run_training

REPO = Path(__file__).resolve().parents[1]
#: A fresh s3fs instance per call, so that the credentials in the environment of this test are the ones used.
FRESH = {"skip_instance_cache": True}


@pytest.fixture()
def no_credentials(monkeypatch, tmp_path):
    """An environment in which botocore finds no credentials anywhere (and never asks the EC2 metadata address)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _one_line(info: pytest.ExceptionInfo) -> str:
    text = str(info.value)
    assert "\n" not in text
    return text


def test_writable_output_passes_and_creates_nothing(s3_bucket, tmp_path):
    check_writable(f"{s3_bucket}/feats/new.zarr", FRESH)
    target = tmp_path / "a" / "b" / "out.zarr"
    check_writable(str(target))
    assert not (tmp_path / "a").exists()


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageAccessError) as info:
        check_writable("s3://no-such-bucket-featup/feats.zarr", FRESH)
    assert "bucket 'no-such-bucket-featup' does not exist" in _one_line(info)


def test_no_credentials_says_which_variables_to_set(s3_bucket, no_credentials):
    with pytest.raises(StorageAccessError) as info:
        check_writable(f"{s3_bucket}/feats.zarr", FRESH, what="--output")
    text = _one_line(info)
    assert text.startswith(f"--output '{s3_bucket}/feats.zarr': no S3 credentials found") and "AWS_ACCESS_KEY_ID" in text
    with pytest.raises(InputNotFoundError, match="no S3 credentials found") as info:
        build_manifest(f"{s3_bucket}/images", storage_options=FRESH)
    _one_line(info)
    with pytest.raises(StorageAccessError, match="no S3 credentials found") as info:
        open_store(f"{s3_bucket}/feats.zarr", storage_options=FRESH)
    _one_line(info)


def test_unreachable_endpoint_points_at_the_endpoint_setting(s3_server):
    nowhere = {**FRESH, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageAccessError) as info:
        check_writable("s3://any-bucket/feats.zarr", nowhere)
    assert "cannot reach the storage endpoint" in _one_line(info) and "AWS_ENDPOINT_URL" in str(info.value)


def test_local_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(StorageAccessError) as info:
        check_writable(str(tmp_path / "taken" / "out.zarr"))
    assert "is a file, not a folder" in _one_line(info)


def test_training_checks_its_output_before_reading_any_image(s3_server, tmp_path):
    cfg = TrainJobConfig(input=str(tmp_path / "never-read"), output="s3://no-such-bucket-featup/runs", name="r")
    with pytest.raises(StorageAccessError, match="bucket 'no-such-bucket-featup' does not exist"):
        run_training(cfg)


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "job, argv, expected",
    [
        ("featurize_coco", ["--input", "{tmp}", "--output", "{tmp}/o.zarr", "--output-size", "0"],
         "featurize_coco: --output-size must be >= 1, got 0"),
        ("featurize", ["--input", "{tmp}/nope", "--output", "{tmp}/o.zarr"], "featurize: input '{tmp}/nope': does not exist"),
        ("visualize", ["--store", "{tmp}/none.zarr", "--out", "{tmp}/pics"], "visualize: no feature store at '{tmp}/none.zarr'"),
        ("visualize", ["--image", "{tmp}/none.jpg", "--backbone", "efficientnet_lite0", "--weights", "random",
                       "--out", "{tmp}/pics"], "visualize: image '{tmp}/none.jpg': not found"),
        ("eval_probe", ["--store", "a={tmp}/none.zarr", "--labels", "{tmp}/labels"],
         "eval_probe: no feature store at '{tmp}/none.zarr'"),
    ],
)
def test_jobs_print_bad_input_as_one_line(job, argv, expected, tmp_path, capsys):
    """Each of these fails before any Ray work starts (config, input or store checks come first)."""
    rc = _job(job).main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(expected.format(tmp=tmp_path)) and "\n" not in err, err


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"backbone": "no-such-backbone"}, "unknown backbone 'no-such-backbone'"),
        ({"weights": "/no/such/weights.safetensors"}, "weights file '/no/such/weights.safetensors' does not exist"),
        ({"input_size": 100, "weights": "random"}, "input size 100x100 (HxW) is not a multiple of stride 32"),
    ],
)
def test_training_checks_its_backbones_on_the_driver(kw, message, tmp_path):
    """Bad model settings fail in run_training before Ray Train (or Ray) starts: no workers, no traceback per rank."""
    cfg = TrainJobConfig(input=str(tmp_path / "never-read"), output=str(tmp_path / "runs"), name="r", **kw)
    with pytest.raises(FeatupError, match=re.escape(message)) as info:
        run_training(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("job", ["featurize", "train_upsampler"])
@pytest.mark.parametrize("text, message", [("{bad", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_storage_options_must_be_a_json_object(job, text, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _job(job).main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--storage-options", text])
    assert info.value.code == 2
    assert f"argument --storage-options: {message}" in capsys.readouterr().err


def test_missing_labels_folder_is_named(tmp_path, s3_bucket, no_credentials):
    from pipeline.evaluate.labels import LabelSource

    with pytest.raises(InputNotFoundError, match=f"labels '{tmp_path / 'none'}' do not exist; check --labels"):
        LabelSource(str(tmp_path / "none"), "coco-stuff-27").read("1")
    with pytest.raises(StorageAccessError, match="no S3 credentials found") as info:
        LabelSource(f"{s3_bucket}/labels", "coco-stuff-27", storage_options=FRESH).read("1")
    _one_line(info)
