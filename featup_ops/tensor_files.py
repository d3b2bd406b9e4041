"""Read a publisher's weight file (bytes) into a mapping of tensors, safely and in one line when it fails.

The published upsamplers ship in three containers: safetensors (UPLiFT), a ``torch.save`` zip or legacy pickle of a
state dict (AnyUp ``.pth``, LoftUp ``pytorch_model.bin``) or of a PyTorch Lightning checkpoint dictionary (FeatUp
``.ckpt``), sometimes xz-compressed. :func:`read_tensor_file` tells them apart by their bytes, never runs pickled
code (``torch.load(weights_only=True)``; Lightning's ``AttributeDict`` is read as a plain dict, the one extra type
allowed) and returns the file's top-level mapping unchanged: no key is renamed or dropped, so each kind's loader can
match keys strictly against the publisher's layout.
"""
from __future__ import annotations

import io
import lzma
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .errors import CheckpointError, CheckpointNotFoundError

__all__ = ["one_line", "read_file_bytes", "read_tensor_file", "tensor_mapping"]

_XZ_MAGIC = b"\xfd7zXZ\x00"


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _AttributeDict:
    """Stand-in for Lightning's ``AttributeDict`` (the dict subclass holding ``hyper_parameters``): unpickles as a
    plain dict, so nothing of Lightning is imported or run."""

    def __new__(cls, *args: Any) -> dict:  # type: ignore[misc]
        return {}


#: The only globals allowed beyond torch's weights-only defaults: Lightning's dict subclass, read as a plain dict.
_SAFE_STAND_INS = [
    (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
]


def read_file_bytes(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                    what: str = "weights file") -> bytes:
    """The bytes of a local file or an fsspec URI (``s3://...``).

    Raises:
        CheckpointNotFoundError: it does not exist (one line: ``{what} '<path>' does not exist; check the path``).
    """
    path = os.fspath(path)
    scheme = urlparse(path).scheme
    if len(scheme) > 1 and scheme != "file":  # one letter is a Windows drive
        import fsspec  # lazily: only where a URI is given

        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        try:
            return fs.cat_file(root)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{what} {path!r} does not exist; check the URI") from None
    file = Path(path.removeprefix("file://")).expanduser()
    if not file.is_file():
        raise CheckpointNotFoundError(f"{what} {path!r} does not exist; check the path")
    return file.read_bytes()


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _torch_load(data: bytes, name: str) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_STAND_INS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
            what = (
                f"a {found.group(1)} object" if found
                else f"an object weights_only loading refuses ({one_line(detail.group(1)) if detail else 'unknown'})"
            )
            raise CheckpointError(
                f"weights file {name} holds {what}, which is not loaded (only tensors and plain containers are); "
                "if you trust the file, re-save just its state dict with torch.save and load that"
            ) from None
        raise CheckpointError(
            f"weights file {name} is not a readable torch file ({one_line(text)}); download it again"
        ) from None
    except Exception as exc:  # truncated or damaged zip, bad pickle stream
        raise CheckpointError(
            f"weights file {name} is not a readable torch file ({type(exc).__name__}: {one_line(str(exc))}); "
            "download it again"
        ) from None


def read_tensor_file(data: bytes, name: str) -> Mapping[str, Any]:
    """The top-level mapping of a weight file's bytes.

    Args:
        data: the file's bytes: safetensors, a ``torch.save`` zip or legacy pickle, or either xz-compressed.
        name: how to name the file in errors (its path or URI, quoted).

    Returns:
        safetensors: ``{key: CPU tensor}``; torch files: the saved object (a state dict, or a checkpoint dictionary
        such as Lightning's with its ``state_dict`` entry), on CPU.

    Raises:
        CheckpointError: not one of these formats, damaged, a pickled object other than tensors and plain
            containers, or not a mapping (one line naming the file).
    """
    if data[:6] == _XZ_MAGIC:
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise CheckpointError(f"weights file {name} is damaged xz data ({exc}); download it again") from None
    if _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors' own SafetensorError
            raise CheckpointError(
                f"weights file {name} is not readable safetensors ({one_line(str(exc))}); download it again"
            ) from None
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise CheckpointError(
            f"weights file {name} is neither safetensors nor a torch file (zip or pickle); download it again"
        )
    obj = _torch_load(data, name)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"weights file {name} holds a {type(obj).__name__}, not a mapping of tensors")
    return obj


def tensor_mapping(obj: Mapping[str, Any], name: str, *, entry: str | None = None) -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` state dict inside a file's top-level mapping, every value checked to be a tensor.

    Args:
        obj: what :func:`read_tensor_file` returned.
        name: the file, for errors.
        entry: take ``obj[entry]`` when present (``"state_dict"`` for Lightning checkpoints); None: ``obj`` itself.

    Raises:
        CheckpointError: the entry is not a mapping, or a value is not a tensor (named).
    """
    inner = obj.get(entry, obj) if entry else obj
    if not isinstance(inner, Mapping):
        raise CheckpointError(f"weights file {name}: {entry!r} is a {type(inner).__name__}, not a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"weights file {name}: {key} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value
    return out
