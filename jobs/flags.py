"""The one job convention: each job has one frozen config dataclass whose field names are its flags.

:func:`parser_for` builds the job's ``argparse`` parser from the config's fields (``input_size`` -> ``--input-size``),
so a flag, its type, its choices and its default are declared once, on the field:

* the type annotation gives the parsing: ``int``/``float``/``str``; ``bool`` -> ``--x/--no-x``;
  ``Literal[...]`` -> choices; ``tuple[int, int]`` -> two values; ``tuple[T, ...]`` -> one or more;
  ``int | tuple[int, int]`` -> one value (square) or two; ``dict[str, Any]`` -> a JSON object; ``X | None`` -> X,
  default None. Fields of a dataclass type (nested method configs) are not flags.
* ``field(metadata={...})`` adds what the type cannot say: ``help``; ``aliases`` (older spellings kept working);
  ``type`` (a parser for one value); ``choices``; ``repeat`` (the flag may be given several times); ``metavar``; ``group``;
  ``flag=False`` (an API-only field); ``path="output"``/``"input"`` (a path the job writes / only reads).

:func:`config_from` turns the parsed flags into the config; the config's own ``__post_init__`` validates them, so
a bad value is refused once, with one message, whether it came from a flag or from code. Before that, inside a
``ray job submit --working-dir`` copy, it refuses relative ``path="output"`` values (and relative inputs that were
not uploaded): :func:`pipeline.cli.check_job_path`.
"""
from __future__ import annotations

import argparse
import dataclasses
import textwrap
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pipeline.cli import check_job_path, json_object, ray_working_dir_copy

C = TypeVar("C")

#: The ``--help`` note of a job with ``path=`` fields.
RAY_JOB_PATHS_NOTE = (
    "Under `ray job submit --working-dir`, the job runs in Ray's temporary copy of that directory, deleted after the "
    "job: a relative output path is refused there (pass an absolute path or s3:// URI); relative input paths are "
    "read from the uploaded copy (.gitignore'd files are not uploaded)."
)

__all__ = ["parser_for", "config_from", "flag_fields", "check_paths"]


def flag_fields(config: type, exclude: Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``config`` that are flags (not excluded, not ``flag=False``, not nested dataclasses)."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        if f.name in exclude or not f.metadata.get("flag", True) or not f.init:
            continue
        if _is_dataclass_type(_strip_none(hints[f.name])[0]):
            continue
        out.append(f)
    return sorted(out, key=lambda f: bool(f.kw_only))  # a base's shared (keyword-only) flags after the job's own


def parser_for(
    config: type,
    *,
    doc: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    exclude: Collection[str] = (),
    aliases: Mapping[str, Collection[str]] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of the frozen dataclass ``config``.

    Args:
        config: the job's config class.
        doc: the job's module docstring: its first paragraph is the description, the rest the epilog.
        defaults: per-job defaults that differ from the config's (a field given one here is not required).
        exclude: fields the job fixes itself (not flags of this job).
        aliases: more spellings of a field's flag in this job (``{"implicit_seed": ["--seed"]}``).
        parser: add to this parser instead of a new one.
    """
    if parser is None:
        head, _, rest = (doc or "").strip().partition("\n\n")
        if any(f.metadata.get("path") for f in flag_fields(config, exclude)):
            rest = "\n\n".join(p for p in (rest, textwrap.fill(RAY_JOB_PATHS_NOTE, 100)) if p)
        parser = argparse.ArgumentParser(
            description=head or None, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    defaults = dict(defaults or {})
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    for f in flag_fields(config, exclude):
        meta = f.metadata
        target: Any = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        names = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ()), *(aliases or {}).get(f.name, ())]
        kwargs = _argparse_kwargs(hints[f.name], meta)
        if meta.get("repeat"):
            kwargs["default"] = None  # argparse appends to a default; config_from leaves the field's own
            kwargs["required"] = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        elif f.name in defaults:
            kwargs["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        kwargs["help"] = _help(meta.get("help", ""), kwargs.get("default"), kwargs.get("required", False))
        target.add_argument(*names, dest=f.name, **kwargs)
    return parser


def config_from(config: type[C], args: argparse.Namespace | Mapping[str, Any], **overrides: Any) -> C:
    """The ``config`` made of the parsed flags in ``args`` that are its fields (``overrides`` win); lists become
    tuples and a one-value ``int | tuple[int, int]`` becomes the int."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(config)
    repeat = {f.name for f in dataclasses.fields(config) if f.metadata.get("repeat")}
    kwargs = {k: _normalise(hints[k], v) for k, v in values.items()
              if k in names and not (k in repeat and v is None)}
    kwargs.update(overrides)
    check_paths(config, kwargs)
    return config(**kwargs)


def check_paths(config: type, values: Mapping[str, Any]) -> None:
    """Inside a ``ray job submit --working-dir`` copy, refuse the ``values`` of ``config``'s ``path=`` fields that
    would be lost there (relative outputs) or are not there (relative inputs that were not uploaded), in one line
    (:func:`pipeline.cli.check_job_path`); a field not in ``values`` is checked at its default. No-op elsewhere."""
    copy = ray_working_dir_copy()
    if copy is None:
        return
    for f in dataclasses.fields(config):
        role = f.metadata.get("path")
        if not role:
            continue
        value = values.get(f.name, f.default)
        if value is not dataclasses.MISSING:
            check_job_path(f"--{f.name.replace('_', '-')}", role, value, copy)


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else ()


def _argparse_kwargs(tp: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``add_argument`` keywords for a field of type ``tp`` (``meta``: the field's metadata)."""
    tp, _ = _strip_none(tp)
    kwargs: dict[str, Any] = {}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kwargs["choices"] = list(meta["choices"])
    if meta.get("repeat"):
        kwargs.update(action="append", type=meta.get("type", str))
        return kwargs
    if "type" in meta:
        kwargs["type"] = meta["type"]
        return kwargs
    union = _union_args(tp)
    if union and any(get_origin(a) is tuple for a in union):  # `int | tuple[int, int]`: one side or two
        scalar = next(a for a in union if get_origin(a) is not tuple)
        kwargs.update(type=scalar, nargs="+")
    elif union:  # e.g. `str | ImplicitConfig`: the flag gives the first (a name); code may pass the other
        kwargs["type"] = union[0]
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(tp) is Literal:
        choices = get_args(tp)
        kwargs.update(type=type(choices[0]), choices=list(choices))
    elif get_origin(tp) is tuple:
        items = get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            kwargs.update(type=items[0], nargs="+")
        else:
            kwargs.update(type=items[0], nargs=len(items))
    elif get_origin(tp) is dict or tp is dict:
        kwargs["type"] = json_object
    elif tp in (int, float, str):
        kwargs["type"] = tp
    else:
        raise TypeError(f"no flag for a field of type {tp!r}; give metadata type= or flag=False")
    return kwargs


def _normalise(tp: Any, value: Any) -> Any:
    """A parsed flag value in the field's form: lists -> tuples, one-value sizes -> the int."""
    if not isinstance(value, list):
        return value
    tp, _ = _strip_none(tp)
    if _union_args(tp) and len(value) == 1:
        return value[0]
    return tuple(value)


def _help(text: str, default: Any, required: bool) -> str:
    if required or "default" in text or default is None or default is False or default in ((), ""):
        return text
    shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
    return f"{text} (default {shown})".lstrip()

