"""Load FeatUp's published JBU checkpoint files (PyTorch Lightning ``.ckpt``) by path or URI.

FeatUp's torch.hub entries download ``<hub>_jbu_stack_cocostuff.ckpt`` (ChannelNorm variant) or the ``no_norm/``
file of the same name (:data:`FEATUP_CHECKPOINTS` has both addresses). :func:`load_featup_checkpoint` reads such a
file from a local path or any fsspec URI (``featup_ops.load_upsampler`` hands it every path ending in ``.ckpt``),
decides which published variant it is, and returns :class:`featup_ops.featup_hub.FeatUpUpsampler`, which computes
what FeatUp's hub model computes (ChannelNorm included). The bytes are read by
:func:`featup_ops.tensor_files.read_tensor_file` (``weights_only``: no pickled code runs) and the keys are matched
strictly by :func:`featup_ops.featup_hub.load_featup`.

The variant is the hub name, taken from the file's ``hyper_parameters["model_type"]`` if it has one, else from its
name (``<hub>_jbu_stack...``), else from ``backbone=``; ``-no-norm`` is added when the file has no
``model.1.norm.*`` (FeatUp's ``use_norm=False`` layout).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .featup_hub import (
    FEATUP_CHECKPOINTS,
    FEATUP_JBU_CONFIG,
    NO_NORM,
    FeatUpCheckpoint,
    FeatUpUpsampler,
    load_featup,
    to_featup_state_dict,
)
from .tensor_files import read_file_bytes, read_tensor_file

__all__ = [
    "FEATUP_CHECKPOINTS",
    "FEATUP_JBU_CONFIG",
    "FeatUpCheckpoint",
    "featup_checkpoint_hash",
    "is_featup_checkpoint_path",
    "load_featup_checkpoint",
    "to_featup_state_dict",
]

_NORM_KEYS = ("model.1.norm.weight", "model.1.norm.bias")


def is_featup_checkpoint_path(path: str | os.PathLike) -> bool:
    """True for a path/URI naming a ``.ckpt`` file (FeatUp's Lightning format) rather than a checkpoint directory."""
    text = os.fspath(path).rstrip("/")
    if not text.lower().endswith(".ckpt"):
        return False
    from .checkpoint import _is_uri

    return _is_uri(text) or not Path(text.removeprefix("file://")).expanduser().is_dir()


def _read_bytes(path: str, storage_options: Mapping[str, Any] | None) -> bytes:
    return read_file_bytes(path, storage_options, what="FeatUp checkpoint")


def featup_checkpoint_hash(path: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 (hex) of the ``.ckpt`` file's bytes (what ``sha256sum`` prints); stores record it.

    Raises:
        CheckpointNotFoundError: the file does not exist.
    """
    return hashlib.sha256(_read_bytes(os.fspath(path), storage_options)).hexdigest()


def _identify(name: str, ckpt: Mapping[str, Any]) -> str | None:
    """FeatUp hub name of a file: its ``hyper_parameters['model_type']``, else its file name; None if neither says."""
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and str(hp.get("model_type")) in FEATUP_CHECKPOINTS:
        return str(hp["model_type"])
    base = name.rstrip("/").rsplit("/", 1)[-1]
    m = re.match(r"([a-z0-9]+)_jbu_stack", base)
    if m and m.group(1) in FEATUP_CHECKPOINTS:
        return m.group(1)
    return None


def _resolve_backbone(backbone: str) -> str:
    """Preset name for a preset or FeatUp hub name."""
    entry = FEATUP_CHECKPOINTS.get(backbone)
    return entry.preset or backbone if entry else backbone


def _backbone_hub(name: str, backbone: str, dim: int | None, hub_name: str | None) -> str:
    """The hub name ``backbone`` stands for, checked against the file (its channels, its own hub name)."""
    from .backbones import PRESETS

    preset = _resolve_backbone(backbone)
    published = sorted(c.preset for c in FEATUP_CHECKPOINTS.values() if c.preset)
    if backbone in FEATUP_CHECKPOINTS and FEATUP_CHECKPOINTS[backbone].preset is None:
        if hub_name in (None, backbone):
            return backbone  # a hub name without a preset here (maskclip) names the variant only
        raise CheckpointError(f"FeatUp checkpoint {name} was trained on FeatUp's {hub_name!r}, not {backbone!r}")
    if preset not in PRESETS:
        raise CheckpointError(f"unknown backbone {backbone!r} for FeatUp checkpoint {name}; use one of {published}")
    if dim is not None and PRESETS[preset].dim != dim:
        raise CheckpointError(
            f"FeatUp checkpoint {name} upsamples {dim}-channel features but backbone {preset!r} has "
            f"{PRESETS[preset].dim}; use the checkpoint made for {preset!r}"
        )
    if hub_name is not None and FEATUP_CHECKPOINTS[hub_name].preset != preset:
        raise CheckpointError(
            f"FeatUp checkpoint {name} was trained on FeatUp's {hub_name!r} "
            f"({FEATUP_CHECKPOINTS[hub_name].preset or 'no preset here'}), not {preset!r}; "
            f"use {preset!r}'s checkpoint or backbone={FEATUP_CHECKPOINTS[hub_name].preset!r}"
        )
    found = [c.hub_name for c in FEATUP_CHECKPOINTS.values() if c.preset == preset]
    if not found:
        raise CheckpointError(
            f"FeatUp published no JBU checkpoint for backbone {preset!r}; FeatUp's checkpoints belong to {published}"
        )
    return found[0]


def _final_dim(state: Any) -> int | None:
    """C of the file's final 1x1 mix, if it has one (for the backbone check's message)."""
    if not isinstance(state, Mapping):
        return None
    w = state.get("upsampler.fixup_proj.1.weight", state.get("fixup_proj.1.weight"))
    return int(w.shape[0]) if torch.is_tensor(w) and w.dim() == 4 else None


def load_featup_checkpoint(
    path: str | os.PathLike,
    backbone: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> FeatUpUpsampler:
    """Load a FeatUp JBU ``.ckpt`` (local path or fsspec URI) as the FeatUp hub model's upsampler.

    Args:
        path: the Lightning checkpoint file (``<hub>_jbu_stack_cocostuff.ckpt``, either folder's), or a bare state
            dict saved with ``torch.save``.
        backbone: preset (``"dino_vits16"``) or FeatUp hub name (``"dino16"``) whose features will be upsampled;
            refused when its channels differ from the file's C or the file names another backbone. Required when
            neither the file's name nor its ``hyper_parameters`` say which backbone it belongs to.
        storage_options: fsspec options for a URI (e.g. ``{"anon": True}``).
        map_location: device for the parameters.

    Returns:
        :class:`FeatUpUpsampler` in eval mode: ``up(feats (B,C,h,w), image (B,3,H,W), output_size) ->
        (B,C,Ho,Wo)``, ChannelNorm applied first for norm files. ``.variant`` is the inferred variant;
        ``.checkpoint_hash`` is :func:`featup_checkpoint_hash`; ``.checkpoint_meta`` holds ``format``,
        ``featup_name`` (hub name), ``variant``, ``backbone`` (preset or None), ``dim``, ``channel_norm`` (the file
        has ChannelNorm, applied by ``prepare_lowres``), ``epoch``, ``global_step``, ``file``.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: unreadable file, a pickled non-weight object, unknown backbone, missing/unexpected/
            mis-shaped keys, channels other than the backbone's, or a backbone mismatch (each one line naming it).
    """
    path = os.fspath(path)
    name = repr(path)
    data = _read_bytes(path, storage_options)
    ckpt = read_tensor_file(data, name)
    state = ckpt.get("state_dict", ckpt)
    hub_name = _identify(path, ckpt)
    if backbone is not None:
        hub_name = _backbone_hub(name, backbone, _final_dim(state), hub_name)
    if hub_name is None:
        raise CheckpointError(
            f"FeatUp checkpoint {name}: neither its name (<hub>_jbu_stack_cocostuff.ckpt) nor its hyper_parameters "
            f"say which backbone it was trained on; rename it or pass backbone= (one of {sorted(FEATUP_CHECKPOINTS)})"
        )
    has_norm = isinstance(state, Mapping) and any(k in state for k in _NORM_KEYS)
    entry = FEATUP_CHECKPOINTS[hub_name]
    if has_norm and not entry.has_norm:
        raise CheckpointError(
            f"FeatUp checkpoint {name} holds a ChannelNorm (model.1.norm.*), but FeatUp's {hub_name!r} has none "
            f"(published only as '{hub_name}{NO_NORM}'); it is not FeatUp's {hub_name} file"
        )
    variant = hub_name if has_norm else hub_name + NO_NORM
    module = load_featup(ckpt, variant=variant, name=name)
    module.to(map_location)
    module.checkpoint_meta = {
        "format": "featup-lightning-ckpt",
        "featup_name": hub_name,
        "variant": variant,
        "backbone": entry.preset,
        "dim": module.dim,
        "channel_norm": has_norm,
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "global_step": ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        "file": path.rstrip("/").rsplit("/", 1)[-1],
    }
    module.checkpoint_hash = hashlib.sha256(data).hexdigest()
    return module
