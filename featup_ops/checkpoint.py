"""Save and load upsamplers as a directory of ``upsampler.safetensors`` + ``upsampler.json``.

Layout (local path or any fsspec URI such as ``s3://bucket/ckpt/step_2000``)::

    <path>/upsampler.safetensors   every tensor of ``upsampler.state_dict()``
    <path>/upsampler.json          {"format": "featup-upsampler", "format_version": 1,
                                    "config": upsampler.config_dict(),   # has "kind"; rebuilds the module
                                    "meta": {...},                       # backbone, step, ... (free-form)
                                    "tensors": {key: [dtype, shape]},
                                    "weights_sha256": "<hex of the safetensors bytes>"}

An upsampler class is found from ``config["kind"]`` in :data:`UPSAMPLER_KINDS` (``kind -> "module:Class"``, imported
lazily, so loading a checkpoint imports only the class it needs). Other classes register with
:func:`register_upsampler`. A class rebuilds from its config via ``cls.from_config_dict(config)`` when it has one,
else ``cls(**config_without_kind)``.

Loading is strict: missing keys, unexpected keys and shape mismatches are all named in one
:class:`~featup_ops.errors.CheckpointError`; changed or truncated bytes are caught by the recorded sha256.

A path naming a ``.ckpt`` file is FeatUp's own (PyTorch Lightning) checkpoint instead: :func:`load_upsampler` and
:func:`checkpoint_hash` hand it to :mod:`featup_ops.featup_checkpoints`.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import CheckpointError, CheckpointNotFoundError
from .weights import state_dict_mismatches

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "UPSAMPLER_KINDS",
    "WEIGHTS_NAME",
    "build_upsampler",
    "checkpoint_hash",
    "load_upsampler",
    "read_checkpoint_config",
    "register_upsampler",
    "save_upsampler",
    "upsampler_class",
]

WEIGHTS_NAME = "upsampler.safetensors"
CONFIG_NAME = "upsampler.json"
FORMAT = "featup-upsampler"
#: Bump when the layout of the two files changes incompatibly; loaders refuse newer versions.
FORMAT_VERSION = 1

#: kind -> "module:Class" (imported lazily) or the class itself (after :func:`register_upsampler`).
UPSAMPLER_KINDS: dict[str, str | type[nn.Module]] = {
    "jbu": "featup_ops.jbu:JBUUpsampler",
    "bilateral": "featup_ops.baselines:BilateralUpsampler",
    "bilinear": "featup_ops.baselines:BilinearUpsampler",
}

T = TypeVar("T", bound=type[nn.Module])


def register_upsampler(kind: str) -> Callable[[T], T]:
    """Class decorator: make ``load_upsampler`` rebuild checkpoints whose config has ``"kind": kind``.

    Args:
        kind: the value of ``config_dict()["kind"]`` for this class.

    Returns:
        A decorator returning the class unchanged.
    """

    def decorate(cls: T) -> T:
        UPSAMPLER_KINDS[kind] = cls
        return cls

    return decorate


def upsampler_class(kind: str) -> type[nn.Module]:
    """The class registered for ``kind``.

    Raises:
        CheckpointError: ``kind`` is not registered, or its module cannot be imported.
    """
    target = UPSAMPLER_KINDS.get(kind)
    if target is None:
        raise CheckpointError(
            f"unknown upsampler kind {kind!r}; known kinds: {', '.join(sorted(UPSAMPLER_KINDS))} "
            "(register others with featup_ops.checkpoint.register_upsampler)"
        )
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(
                f"upsampler kind {kind!r} needs {module_name}.{attr}, which is unavailable ({exc})"
            ) from exc
    return target


def build_upsampler(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild an (untrained) upsampler from its ``config_dict()``.

    Args:
        config: a JSON-able mapping with a ``"kind"`` key.

    Returns:
        The module, freshly initialised.

    Raises:
        CheckpointError: no kind, unknown kind, or the class rejects the config.
    """
    if "kind" not in config:
        raise CheckpointError(f"upsampler config has no 'kind' key (keys: {sorted(config)})")
    cls = upsampler_class(str(config["kind"]))
    try:
        from_config = getattr(cls, "from_config_dict", None)
        if callable(from_config):
            return from_config(dict(config))
        return cls(**{k: v for k, v in config.items() if k != "kind"})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild {cls.__name__} from its checkpoint config: {exc}") from exc


# --- storage -------------------------------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def _write(path: str, files: Mapping[str, bytes], storage_options: Mapping | None) -> None:
    if _is_uri(path):
        import fsspec  # lazily: only where a URI is given

        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        for name, data in files.items():  # weights first, config last: a readable config implies weights exist
            fs.pipe_file(_join(root, name), data)
        return
    root_path = Path(path.removeprefix("file://")).expanduser()
    root_path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = root_path / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, root_path / name)  # atomic: a reader never sees half a file


def _read(path: str, name: str, storage_options: Mapping | None) -> bytes:
    if _is_uri(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        try:
            return fs.cat_file(_join(root, name))
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint {path!r} has no {name} (is it a save_upsampler directory?)"
            ) from None
    file = Path(path.removeprefix("file://")).expanduser() / name
    if not file.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path!r} has no {name} (is it a save_upsampler directory?)")
    return file.read_bytes()


# --- save / load ---------------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def save_upsampler(
    path: str | os.PathLike,
    upsampler: nn.Module,
    *,
    meta: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write an upsampler checkpoint directory.

    Args:
        path: directory to create (local path or fsspec URI); existing checkpoint files in it are replaced.
        upsampler: a module with ``config_dict() -> dict`` (JSON-able, with a ``"kind"`` key).
        meta: free-form JSON-able facts to keep with it (backbone name, step, metrics...); not part of the hash.
        storage_options: fsspec options for a URI.

    Returns:
        :func:`checkpoint_hash` of what was written.

    Raises:
        CheckpointError: the module has no ``config_dict``, or config/meta are not JSON-able.
    """
    from safetensors.torch import save as save_safetensors

    path = os.fspath(path)
    config_dict = getattr(upsampler, "config_dict", None)
    if not callable(config_dict):
        raise CheckpointError(f"{type(upsampler).__name__} has no config_dict(); only upsamplers can be saved")
    config = dict(config_dict())
    if "kind" not in config:
        raise CheckpointError(f"{type(upsampler).__name__}.config_dict() lacks the 'kind' key")
    # clone: safetensors refuses tensors that share memory; contiguous CPU copies are what it stores anyway.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in upsampler.state_dict().items()}
    weights = save_safetensors(tensors)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "meta": dict(meta or {}),
        "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    try:
        doc_bytes = json.dumps(doc, indent=2, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"upsampler config or meta is not JSON-able: {exc}") from exc
    _write(path, {WEIGHTS_NAME: weights, CONFIG_NAME: doc_bytes}, storage_options)
    return _hash(config, weights)


def _hash(config: Mapping[str, Any], weights: bytes) -> str:
    return hashlib.sha256(_canonical(config) + b"\0" + weights).hexdigest()


def read_checkpoint_config(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The parsed ``upsampler.json`` of a checkpoint (format checked).

    Raises:
        CheckpointNotFoundError: the directory or file does not exist.
        CheckpointError: not JSON, not this format, or a newer format version.
    """
    path = os.fspath(path)
    raw = _read(path, CONFIG_NAME, storage_options)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"checkpoint {path!r}: {CONFIG_NAME} is not a {FORMAT} file")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format_version {version!r}; this code reads up to {FORMAT_VERSION} (upgrade)"
        )
    return doc


def _check_keys(path: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    problems = state_dict_mismatches(tensors, module.state_dict(), source="checkpoint")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not fit {type(module).__name__}: {problems}")


def load_upsampler(
    spec: str | os.PathLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    backbone: str | None = None,
    data: bytes | None = None,
) -> nn.Module:
    """Build the upsampler an upsampler spec names, in eval mode (see :mod:`featup_ops.upsampler_spec`).

    Args:
        spec: ``bilinear``, ``bilateral``, ``jbu[:lite0]``, ``KIND:VARIANT`` (the publisher's file, fetched once into
            the cache), ``KIND:VARIANT=PATH_OR_URI`` (that file), or the path/URI of a checkpoint directory written
            by :func:`save_upsampler` or of a FeatUp ``.ckpt`` file.
        storage_options: fsspec options for a URI.
        map_location: device for the loaded tensors.
        backbone: the backbone preset the upsampler will serve: a file that does not fit its channels or patch size
            is refused (presets only; other names are checked by the featurize job from the model itself).
        data: for a ``KIND:VARIANT`` spec, the publisher's file's bytes already read (nothing is fetched).

    Returns:
        The module with its weights, ``.eval()``. Every module carries ``.upsampler_spec`` (what stores record,
        :func:`featup_ops.upsampler_spec.spec_identity`), ``.checkpoint_hash`` (sha256 of a publisher's file, the
        :func:`checkpoint_hash` of a directory, None for bilinear/bilateral), ``.checkpoint_meta``,
        ``.weights_path`` (the file or directory read, None when there is none), ``.published`` (the
        :class:`featup_ops.published.PublishedUpsampler` or None) and ``.lowres_normalized``.

    Raises:
        CheckpointNotFoundError: the file or directory does not exist (offline and not cached: one line naming the
            file, its address and the ``=PATH`` form).
        CheckpointError: corrupted bytes, unknown kind or variant, keys/shapes that do not fit (all named), or a
            backbone it does not fit.
    """
    from .upsampler_spec import finish_loaded, load_named_upsampler, parse_upsampler_spec

    parsed = parse_upsampler_spec(spec)
    if parsed.kind != "path":
        module = load_named_upsampler(parsed, storage_options=storage_options, map_location=map_location, data=data)
    else:
        module = _load_path(str(parsed.path), storage_options=storage_options, map_location=map_location,
                            backbone=backbone)
    return finish_loaded(module, parsed, backbone=backbone)


def _load_path(
    path: str,
    *,
    storage_options: Mapping[str, Any] | None,
    map_location: str | torch.device,
    backbone: str | None,
) -> nn.Module:
    """A checkpoint directory of ours, or a FeatUp ``.ckpt`` file."""
    from safetensors.torch import load as load_safetensors

    from .featup_checkpoints import is_featup_checkpoint_path, load_featup_checkpoint

    if is_featup_checkpoint_path(path):
        module = load_featup_checkpoint(path, backbone, storage_options=storage_options, map_location=map_location)
        module.weights_path = path
        return module
    doc = read_checkpoint_config(path, storage_options=storage_options)
    weights = _read(path, WEIGHTS_NAME, storage_options)
    recorded = doc.get("weights_sha256")
    actual = hashlib.sha256(weights).hexdigest()
    if recorded != actual:
        raise CheckpointError(
            f"checkpoint {path!r}: {WEIGHTS_NAME} is corrupted or was replaced (sha256 {actual[:12]}... "
            f"but {CONFIG_NAME} records {str(recorded)[:12]}...); save it again"
        )
    try:
        tensors = load_safetensors(weights)
    except Exception as exc:  # safetensors' own SafetensorError
        raise CheckpointError(f"checkpoint {path!r}: {WEIGHTS_NAME} is not readable safetensors ({exc})") from None
    module = build_upsampler(doc["config"])
    _check_keys(path, module, tensors)
    module.load_state_dict(tensors, strict=True)
    module.to(map_location)
    module.eval()
    module.checkpoint_meta = dict(doc.get("meta") or {})
    module.checkpoint_hash = _hash(doc["config"], weights)
    module.weights_path = path
    return module


def checkpoint_hash(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 (hex) over the canonical config JSON and the weights bytes; ``meta`` does not enter it.

    Two checkpoints with the same hash build the same upsampler with the same weights, so a feature store records it
    to say which upsampler produced its features. For a FeatUp ``.ckpt`` file: the sha256 of its bytes.

    Raises:
        CheckpointNotFoundError: the directory or one of its files does not exist.
        CheckpointError: the config is not a checkpoint config.
    """
    from .featup_checkpoints import featup_checkpoint_hash, is_featup_checkpoint_path

    path = os.fspath(path)
    if is_featup_checkpoint_path(path):
        return featup_checkpoint_hash(path, storage_options=storage_options)
    doc = read_checkpoint_config(path, storage_options=storage_options)
    return _hash(doc["config"], _read(path, WEIGHTS_NAME, storage_options))
