"""The one job convention (jobs/flags.py): every job's flags are its config's fields, with the config's defaults,
and a bad value is refused once, by the config, in one line."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Literal

import pytest

from jobs.flags import config_from, flag_fields, parser_for
from pipeline.cli import flag

REPO = Path(__file__).resolve().parents[1]
JOBS = ("featurize", "featurize_coco", "fit_implicit", "train_upsampler", "eval_probe", "visualize", "materialize")
#: the smallest argv each job accepts (its required flags)
MINIMAL = {
    "featurize": ["--input", "in", "--output", "out"],
    "featurize_coco": ["--input", "in", "--output", "out"],
    "fit_implicit": ["--store", "s"],
    "train_upsampler": ["--input", "in", "--output", "out"],
    "eval_probe": ["--store", "a=s.zarr", "--labels", "l"],
    "visualize": ["--store", "s", "--out", "o"],
    "materialize": ["--source", "s", "--output", "o"],
}
#: flags a job has beyond its config (a mode of the job itself), and fields it fixes instead of exposing
EXTRA = {"featurize_coco": {"--demo"}}
FIXED = {"featurize_coco": {"kind"}}


def _job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_flags_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _long_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """First long option string -> dest, for every option but --help."""
    return {a.option_strings[0]: a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("name", JOBS)
def test_every_flag_is_a_config_field_and_every_field_a_flag(name):
    job = _job(name)
    flags = _long_flags(job.build_parser())
    fields = {f.name for f in flag_fields(job.CONFIG)} - FIXED.get(name, set())
    assert {f"--{n.replace('_', '-')}" for n in fields} | EXTRA.get(name, set()) == set(flags)
    assert all(dest == flag_.removeprefix("--").replace("-", "_") for flag_, dest in flags.items()
               if flag_ not in EXTRA.get(name, set()))
    assert "--storage-options" in flags  # every job touches storage


@pytest.mark.parametrize("name", [n for n in JOBS if n != "featurize_coco"])
def test_default_flags_give_the_config_defaults(name):
    job = _job(name)
    args = job.build_parser().parse_args(MINIMAL[name])
    cfg = config_from(job.CONFIG, args)
    required = {k: v for k, v in vars(args).items() if f"--{k.replace('_', '-')}" in MINIMAL[name]}
    assert cfg == job.CONFIG(**required) or name == "eval_probe"  # eval_probe's --store parses into a StoreRef
    if name == "eval_probe":
        assert cfg.store == (("a", "s.zarr", "hires"),) and cfg.seeds == (0,)


def test_the_implicit_flags_are_the_same_in_featurize_and_fit_implicit():
    featurize = _long_flags(_job("featurize").build_parser())
    second = _long_flags(_job("fit_implicit").build_parser())
    shared = {f for f in featurize if f.startswith("--implicit-") or f == "--images-per-fit"}
    assert len(shared) == 8 and shared <= set(second)
    cfg = config_from(_job("fit_implicit").CONFIG, _job("fit_implicit").build_parser().parse_args(
        ["--store", "s", "--preset", "fast", "--seed", "3", "--implicit-size", "16", "24"]))  # older spellings
    stage = cfg.stage_config()
    assert (stage.preset, stage.seed, stage.output_size) == ("fast", 3, (16, 24))


def test_featurize_flags_reach_the_config():
    job = _job("featurize")
    argv = [*MINIMAL["featurize"], "--input-size", "64", "--output-size", "96", "128", "--dtype", "bfloat16",
            "--storage-options", '{"anon": true}', "--quiet", "--implicit", "--implicit-size", "8", "8",
            "--hires", "on-read"]
    cfg = config_from(job.CONFIG, job.build_parser().parse_args(argv))
    assert (cfg.input_hw, cfg.output_hw, cfg.dtype, cfg.hires) == ((64, 64), (96, 128), "bfloat16", "on-read")
    assert cfg.storage_options == {"anon": True} and cfg.quiet and cfg.implicit and cfg.implicit_size == (8, 8)


def test_train_fixup_flag_sets_the_nested_method_config():
    job = _job("train_upsampler")
    plain = config_from(job.CONFIG, job.build_parser().parse_args([*MINIMAL["train_upsampler"], "--no-fixup"]))
    assert plain.fixup is False and plain.jbu.fixup is False
    assert job.CONFIG.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("featurize", ["--batch-size", "0"], "featurize: --batch-size must be >= 1, got 0"),
        ("fit_implicit", ["--implicit-actors", "0"], "fit_implicit: --implicit-actors 0 must be >= 1"),
        ("fit_implicit", ["--preset", "slow"], "fit_implicit: --implicit-preset 'slow' is not one of"),
        ("train_upsampler", ["--steps", "0"], "train_upsampler: steps must be >= 1, got 0 (flag --steps)"),
        ("visualize", ["--image", "x.jpg"], "visualize: give one of --store"),
        ("materialize", ["--batch-size", "0"], "materialize: --batch-size must be >= 1, got 0"),
    ],
)
def test_a_bad_value_is_one_line_from_the_config(name, argv, message, capsys):
    job = _job(name)
    assert job.main([*MINIMAL[name], *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_malformed_flag_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        _job("featurize").main([*MINIMAL["featurize"], "--storage-options", "{not json"])
    assert info.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _job("featurize").main([*MINIMAL["featurize"], "--dtype", "int8"])  # not one of the Literal's choices


@dataclasses.dataclass(frozen=True)
class _Every:
    """One field of each kind parser_for maps."""

    name: str = flag(help="required")
    count: int | None = flag(None, "optional int")
    ratio: float = flag(0.5, "float")
    on: bool = flag(True, "bool")
    mode: Literal["a", "b"] = flag("a", "choices")
    pair: tuple[int, int] | None = flag(None, "two ints", metavar=("H", "W"))
    many: tuple[str, ...] = flag((), "one or more")
    side: int | tuple[int, int] = flag(4, "one side or two")
    opts: dict[str, Any] | None = flag(None, "JSON")
    tags: tuple[str, ...] = flag((), "repeatable", repeat=True)
    hidden: int = flag(7, "api only", flag=False)


def test_parser_for_maps_every_kind_of_field():
    parser = parser_for(_Every, aliases={"count": ["-n"]})
    cfg = config_from(_Every, parser.parse_args(
        ["--name", "x", "-n", "3", "--no-on", "--mode", "b", "--pair", "1", "2", "--many", "p", "q", "--side", "5",
         "--opts", '{"k": 1}', "--tags", "t1", "--tags", "t2"]))
    assert cfg == _Every("x", 3, 0.5, False, "b", (1, 2), ("p", "q"), 5, {"k": 1}, ("t1", "t2"))
    assert config_from(_Every, parser.parse_args(["--name", "x", "--side", "5", "6"])).side == (5, 6)
    assert config_from(_Every, parser.parse_args(["--name", "x"])) == _Every("x")
    assert "--hidden" not in _long_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --name is required: no default
