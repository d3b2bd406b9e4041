"""The one upsampler spec: parsing, the registry, the cache, offline refusals, and what every loaded module carries."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import featup_ops
from featup_ops.errors import CheckpointError, CheckpointNotFoundError
from featup_ops.published import KINDS, PUBLISHED
from featup_ops.upsampler_spec import UpsamplerSpec, cache_dir, parse_upsampler_spec

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("bilinear", UpsamplerSpec("bilinear")),
        ("bilateral", UpsamplerSpec("bilateral")),
        ("jbu", UpsamplerSpec("jbu", "lite0")),
        ("jbu:lite0", UpsamplerSpec("jbu", "lite0")),
        ("jbu=runs/x/upsampler", UpsamplerSpec("jbu", None, "runs/x/upsampler")),
        ("featup:dinov2", UpsamplerSpec("featup", "dinov2")),
        ("featup:dinov2-no-norm=/w/dinov2_jbu_stack_cocostuff.ckpt",
         UpsamplerSpec("featup", "dinov2-no-norm", "/w/dinov2_jbu_stack_cocostuff.ckpt")),
        ("uplift:dinov2-s14=s3://b/w/uplift.safetensors", UpsamplerSpec("uplift", "dinov2-s14", "s3://b/w/uplift.safetensors")),
        ("anyup:multi-backbone", UpsamplerSpec("anyup", "multi-backbone")),
        ("loftup:dinov2s-reg", UpsamplerSpec("loftup", "dinov2s-reg")),
        ("runs/lite0/upsampler", UpsamplerSpec("path", None, "runs/lite0/upsampler")),
        ("s3://bucket/ckpt/step_2000", UpsamplerSpec("path", None, "s3://bucket/ckpt/step_2000")),
        ("dinov2_jbu_stack_cocostuff.ckpt", UpsamplerSpec("path", None, "dinov2_jbu_stack_cocostuff.ckpt")),
    ],
)
def test_every_form_parses(text, parsed):
    assert parse_upsampler_spec(text) == parsed


@pytest.mark.parametrize(
    "text, says",
    [
        ("featup:dinov3", "unknown featup variant 'dinov3'"),
        ("featup:maskclip", "featup:maskclip-no-norm"),  # FeatUp publishes MaskCLIP without ChannelNorm only
        ("uplift", "needs a variant: uplift:dinov2-s14, uplift:dinov3-splus16"),
        ("bilinear:x", "takes no variant"),
        ("uplift:dinov2-s14=", "nothing after '='"),
        ("jbu:other", "jbu=PATH"),
    ],
)
def test_bad_specs_are_one_line_naming_the_valid_ones(text, says):
    with pytest.raises(CheckpointError) as info:
        parse_upsampler_spec(text)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_registry_lists_every_kind_of_the_issues_with_file_address_and_licence():
    rows = featup_ops.list_upsamplers()
    specs = {r["spec"] for r in rows}
    for kind in ("featup", "uplift", "anyup", "loftup"):
        assert any(s.startswith(kind + ":") for s in specs), kind
    for hub in ("dino16", "dinov2", "clip", "vit", "resnet50"):
        assert {f"featup:{hub}", f"featup:{hub}-no-norm"} <= specs
    assert {"featup:maskclip-no-norm", "uplift:dinov2-s14", "uplift:dinov3-splus16", "anyup:paper",
            "anyup:multi-backbone", "bilinear", "bilateral", "jbu:lite0"} <= specs
    for row in rows:
        if row["kind"] in ("featup", "uplift", "anyup", "loftup"):
            assert row["file"] and row["address"].startswith("https://") and row["licence"], row
    assert KINDS["anyup"].licence == "CC-BY-4.0" and "Wimmer" in KINDS["anyup"].attribution
    # FeatUp's norm and no-norm files share a name; their cache paths must not
    norm, plain = PUBLISHED["featup:dinov2"], PUBLISHED["featup:dinov2-no-norm"]
    assert norm.file == plain.file and norm.url != plain.url and norm.lowres_normalized and not plain.lowres_normalized


@pytest.mark.parametrize("spec", ["featup:dinov2", "uplift:dinov2-s14", "anyup:paper", "loftup:dinov2s"])
def test_offline_without_a_cached_file_is_one_line_with_the_file_address_and_path_form(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUP_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = PUBLISHED[spec]
    with pytest.raises(CheckpointNotFoundError) as info:
        featup_ops.load_upsampler(spec)
    text = str(info.value)
    assert "\n" not in text and entry.file in text and entry.url in text and f"--upsampler {spec}=" in text


def test_cache_folder_is_overridable_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FEATUP_PIPELINE_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "featup-pipeline"
    monkeypatch.setenv("FEATUP_PIPELINE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_fixed_kinds_and_the_shipped_jbu_carry_what_stores_record():
    for spec, kind in (("bilinear", "bilinear"), ("bilateral", "bilateral")):
        up = featup_ops.load_upsampler(spec)
        assert up.upsampler_spec == kind and up.checkpoint_hash is None and up.weights_path is None
        assert up.lowres_normalized is False and up.published is None
    up = featup_ops.load_upsampler("jbu")
    assert up.upsampler_spec == "jbu:lite0" and up.checkpoint_hash == featup_ops.checkpoint_hash(up.weights_path)


def test_a_jbu_checkpoint_of_ours_loads_by_path_and_by_jbu_equals(tmp_path):
    path = tmp_path / "mine"
    featup_ops.save_upsampler(path, featup_ops.JBUUpsampler())
    a = featup_ops.load_upsampler(str(path))
    b = featup_ops.load_upsampler(f"jbu={path}")
    assert a.upsampler_spec == b.upsampler_spec == "jbu" and a.checkpoint_hash == b.checkpoint_hash


def _hf_cache(root: Path, repo: str, file: str, data: bytes) -> Path:
    """huggingface_hub's cache layout: models--<org>--<name>/{refs/main, snapshots/<rev>/<file>}."""
    rev = "0" * 40
    base = root / "hf" / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / file).write_bytes(data)
    return snap / file


def test_a_cached_hugging_face_file_loads_offline_and_records_its_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUP_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = PUBLISHED["uplift:dinov2-s14"]
    data = (FIXTURES / "uplift" / entry.file).read_bytes()
    _hf_cache(tmp_path, entry.hf_repo, entry.file, data)
    up = featup_ops.load_upsampler("uplift:dinov2-s14", backbone="dinov2_vits14")
    assert up.upsampler_spec == "uplift:dinov2-s14" and up.checkpoint_hash == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="patch-14 backbones but 'dino_vits16' has stride 16"):
        featup_ops.load_upsampler("uplift:dinov2-s14", backbone="dino_vits16")
    with pytest.raises(CheckpointError, match="384-channel features but backbone 'resnet50' gives 2048"):
        featup_ops.load_upsampler("uplift:dinov2-s14", backbone="resnet50")


def test_a_cached_url_file_loads_from_its_kind_variant_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUP_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = FIXTURES / "featup_jbu" / "dinov2_jbu_stack_norm.ckpt"
    dest = tmp_path / "featup" / "dinov2" / PUBLISHED["featup:dinov2"].file
    dest.parent.mkdir(parents=True)
    shutil.copy(src, dest)
    up = featup_ops.load_upsampler("featup:dinov2", backbone="dinov2_vits14")
    assert up.upsampler_spec == "featup:dinov2" and up.lowres_normalized
    assert up.checkpoint_hash == hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(CheckpointNotFoundError):  # the no-norm variant has its own place in the cache
        featup_ops.load_upsampler("featup:dinov2-no-norm")
