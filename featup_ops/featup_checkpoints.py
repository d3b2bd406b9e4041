"""Load FeatUp's published JBU checkpoints (PyTorch Lightning ``.ckpt`` files) as this project's ``JBUUpsampler``.

FeatUp's torch.hub entry (``mhamilton723/FeatUp``: ``dino16``, ``dinov2``, ``clip``, ``maskclip``, ``vit``,
``resnet50``) downloads ``<name>_jbu_stack_cocostuff.ckpt`` (``no_norm/`` variants beside them), the checkpoint of
its Lightning training module. Its ``state_dict`` holds::

    model.0.*                         the frozen backbone          (ignored here: the backbone is loaded separately)
    model.1.norm.weight / .bias       ChannelNorm = LayerNorm(C)   (ignored; recorded as meta "channel_norm")
    downsampler.*, scale_net.*        training-only parts          (ignored)
    upsampler.up{1..4}.range_temp                    ()            -> layers.{0..3}.log_temperature
    upsampler.up{1..4}.sigma_spatial                 ()            -> layers.{0..3}.sigma
    upsampler.up{1..4}.range_proj.{0,3}.weight/bias  (32,3|32,1,1) -> layers.{0..3}.range_proj.{0,3}.*
    upsampler.up{1..4}.fixup_proj.{0,3}.weight/bias  (49,52|49,1,1)-> layers.{0..3}.fixup.{0,3}.*
    upsampler.fixup_proj.1.weight / .bias            (C,C,1,1)     -> final_conv.weight / .bias

The mapping is one-to-one onto ``JBUUpsampler(C, cfg=FEATUP_JBU_CONFIG)`` (fix-up MLPs and the final channel mix
on). Every ``upsampler.*`` key must be there with its shape and no other key may appear outside the ignored
prefixes; a file is read with ``torch.load(weights_only=True)``, so no pickled object other than tensors and plain
containers is ever constructed.

Equal outputs to FeatUp's ``JBUStack`` hold when the output size is 16x the feature grid and the image is at least
that large (then the stage plan and the guidance pooling are FeatUp's); at other sizes the project's stage plan
reaches the requested size directly.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import JBUConfig
from .errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "FEATUP_CHECKPOINTS",
    "FEATUP_JBU_CONFIG",
    "FeatUpCheckpoint",
    "featup_checkpoint_hash",
    "from_featup_state_dict",
    "is_featup_checkpoint_path",
    "load_featup_checkpoint",
    "to_featup_state_dict",
]


@dataclass(frozen=True)
class FeatUpCheckpoint:
    """One published FeatUp JBU checkpoint.

    Attributes:
        hub_name: FeatUp's torch.hub entry and file prefix (``<hub_name>_jbu_stack_cocostuff.ckpt``).
        preset: this project's backbone preset whose features it upsamples (None: no equivalent preset here).
        dim: feature channels C (the final 1x1 mix is C x C).
        note: the backbone in FeatUp's words.
    """

    hub_name: str
    preset: str | None
    dim: int
    note: str

    @property
    def url(self) -> str:
        """Download address of the default (ChannelNorm) variant; the no-norm one is under ``pretrained/no_norm/``."""
        return (
            "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
            f"{self.hub_name}_jbu_stack_cocostuff.ckpt"
        )


#: FeatUp hub name -> the published checkpoint and the backbone preset it belongs to.
FEATUP_CHECKPOINTS: dict[str, FeatUpCheckpoint] = {
    c.hub_name: c
    for c in (
        FeatUpCheckpoint("dino16", "dino_vits16", 384, "DINO ViT-S/16"),
        FeatUpCheckpoint("dinov2", "dinov2_vits14", 384, "DINOv2 ViT-S/14 (no registers)"),
        FeatUpCheckpoint("clip", "clip_vitb16", 512, "OpenAI CLIP ViT-B/16, projected patch tokens"),
        FeatUpCheckpoint("vit", "vit_s16", 384, "supervised ViT-S/16"),
        FeatUpCheckpoint("resnet50", "resnet50", 2048, "ResNet-50 layer4"),
        FeatUpCheckpoint("maskclip", None, 512, "MaskCLIP ViT-B/16 (value-path last block); no preset here"),
    )
}

#: FeatUp's JBUStack as a ``JBUConfig``: 4 layers with the kernel fix-up and the final residual channel mix.
FEATUP_JBU_CONFIG = JBUConfig(fixup=True, final_mix=True, n_layers=4)

_N_LAYERS = 4
_IGNORED_PREFIXES = ("model.", "downsampler.", "scale_net.")
_NORM_KEYS = ("model.1.norm.weight", "model.1.norm.bias")
_LAYER_RENAMES = (("range_temp", "log_temperature"), ("sigma_spatial", "sigma"), ("fixup_proj.", "fixup."))
_FINAL = ("fixup_proj.1.", "final_conv.")


def _to_project_key(key: str) -> str | None:
    """FeatUp ``JBUStack`` key (without ``upsampler.``) -> ``JBUUpsampler`` key; None when it has no counterpart."""
    m = re.fullmatch(r"up([1-9][0-9]*)\.(.+)", key)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_RENAMES:
            if rest == old or (old.endswith(".") and rest.startswith(old)):
                rest = new + rest[len(old):]
                break
        return f"layers.{int(m.group(1)) - 1}.{rest}"
    if key.startswith(_FINAL[0]):
        return _FINAL[1] + key[len(_FINAL[0]):]
    return None


def _to_featup_key(key: str) -> str:
    """``JBUUpsampler`` key -> FeatUp ``JBUStack`` key (without ``upsampler.``)."""
    m = re.fullmatch(r"layers\.([0-9]+)\.(.+)", key)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_RENAMES:
            if rest == new or (new.endswith(".") and rest.startswith(new)):
                rest = old + rest[len(new):]
                break
        return f"up{int(m.group(1)) + 1}.{rest}"
    if key.startswith(_FINAL[1]):
        return _FINAL[0] + key[len(_FINAL[1]):]
    raise CheckpointError(f"JBUUpsampler key {key!r} has no FeatUp counterpart; only FeatUp's JBU stack maps")


def _build(dim: int, device: str | torch.device | None = None) -> torch.nn.Module:
    from .jbu import JBUUpsampler

    return JBUUpsampler(dim, cfg=FEATUP_JBU_CONFIG, device=device)


def to_featup_state_dict(upsampler: torch.nn.Module, *, prefix: str = "upsampler.") -> dict[str, torch.Tensor]:
    """A ``JBUUpsampler`` built with :data:`FEATUP_JBU_CONFIG` as FeatUp's key layout (detached CPU tensors).

    Args:
        upsampler: the module (4 layers, fix-up and final mix on, ``dim`` set).
        prefix: prepended to every key (FeatUp's Lightning module keeps the stack under ``"upsampler."``).

    Returns:
        {featup_key: tensor}, the same shapes and dtypes.

    Raises:
        CheckpointError: the module is not FeatUp's stack (other layer count, no fix-up or no final mix).
    """
    cfg = getattr(upsampler, "cfg", None)
    layers = getattr(upsampler, "layers", ())
    if not isinstance(cfg, JBUConfig) or not (cfg.fixup and cfg.final_mix and len(layers) == _N_LAYERS):
        raise CheckpointError(
            "to_featup_state_dict: only a JBUUpsampler(dim, cfg=FEATUP_JBU_CONFIG) has FeatUp's layout "
            "(4 layers, fixup=True, final_mix=True)"
        )
    return {prefix + _to_featup_key(k): v.detach().cpu() for k, v in upsampler.state_dict().items()}


def from_featup_state_dict(
    state_dict: Mapping[str, Any], *, name: str = "state_dict"
) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Map a FeatUp state dict onto ``JBUUpsampler`` keys, strictly.

    Args:
        state_dict: the Lightning ``state_dict`` (keys under ``upsampler.`` plus ignored backbone/training parts),
            or a bare ``JBUStack`` state dict (``up1.`` ... ``fixup_proj.1.``).
        name: how to call the source in errors (the file path).

    Returns:
        (tensors for ``JBUUpsampler(dim, cfg=FEATUP_JBU_CONFIG).load_state_dict``, dim C, whether the file holds
        FeatUp's ChannelNorm).

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (all named, with FeatUp's names), non-tensor values.
    """
    from .weights import state_dict_mismatches

    has_prefix = any(str(k).startswith("upsampler.") for k in state_dict)
    prefix = "upsampler." if has_prefix else ""
    stack: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        key = str(key)
        if has_prefix and key.startswith(_IGNORED_PREFIXES):
            continue
        if not key.startswith(prefix) or _to_project_key(key[len(prefix):]) is None:
            unexpected.append(key)
            continue
        if not torch.is_tensor(value):
            raise CheckpointError(f"FeatUp checkpoint {name}: {key} is a {type(value).__name__}, not a tensor")
        stack[key[len(prefix):]] = value
    final_w = stack.get(_FINAL[0] + "weight")
    if final_w is None or final_w.dim() != 4 or final_w.shape[0] < 1:
        raise CheckpointError(
            f"FeatUp checkpoint {name} has no {prefix}{_FINAL[0]}weight (C, C, 1, 1) (the final 1x1 channel mix); "
            "is it a FeatUp jbu_stack checkpoint?"
        )
    dim = int(final_w.shape[0])
    target = {prefix + _to_featup_key(k): v for k, v in _build(dim, "meta").state_dict().items()}
    given = {prefix + k: v for k, v in stack.items()}
    given.update({k: torch.empty(0) for k in unexpected})  # named as unexpected below (never loaded)
    problems = state_dict_mismatches(given, target, source="file")
    if problems:
        raise CheckpointError(f"FeatUp checkpoint {name} does not fit FeatUp's JBU stack (C={dim}): {problems}")
    channel_norm = has_prefix and all(k in state_dict for k in _NORM_KEYS)
    return {_to_project_key(k): v for k, v in stack.items()}, dim, channel_norm


# --- reading ------------------------------------------------------------------------------------------------------


def is_featup_checkpoint_path(path: str | os.PathLike) -> bool:
    """True for a path/URI naming a ``.ckpt`` file (FeatUp's Lightning format) rather than a checkpoint directory."""
    text = os.fspath(path).rstrip("/")
    if not text.lower().endswith(".ckpt"):
        return False
    from .checkpoint import _is_uri

    return _is_uri(text) or not Path(text.removeprefix("file://")).expanduser().is_dir()


def _read_bytes(path: str, storage_options: Mapping[str, Any] | None) -> bytes:
    from .checkpoint import _is_uri

    if _is_uri(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        try:
            return fs.cat_file(root)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"FeatUp checkpoint {path!r} does not exist; check the URI") from None
    file = Path(path.removeprefix("file://")).expanduser()
    if not file.is_file():
        raise CheckpointNotFoundError(f"FeatUp checkpoint {path!r} does not exist; check the path")
    return file.read_bytes()


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


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickle(data: bytes, name: str) -> Any:
    """``torch.load(weights_only=True)`` with Lightning's AttributeDict as the one extra (harmless) type."""
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):  # torch's zip format, or the legacy pickle
        raise CheckpointError(
            f"FeatUp checkpoint {name} is not a torch file (neither zip nor pickle); download it again"
        )
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
                else f"an object weights_only loading refuses ({_one_line(detail.group(1)) if detail else 'unknown'})"
            )
            raise CheckpointError(
                f"FeatUp checkpoint {name} holds {what}, which is not loaded (only tensors and plain containers "
                "are); if you trust the file, re-save just its 'state_dict' with torch.save and load that"
            ) from None
        raise CheckpointError(
            f"FeatUp checkpoint {name} is not a readable torch file ({_one_line(str(exc))}); download it again"
        ) from None
    except Exception as exc:  # truncated or damaged
        raise CheckpointError(
            f"FeatUp checkpoint {name} is not a readable torch file ({type(exc).__name__}: {_one_line(str(exc))}); "
            "download it again"
        ) from None


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


def _check_backbone(name: str, backbone: str, dim: int, hub_name: str | None) -> None:
    from .backbones import PRESETS

    preset = _resolve_backbone(backbone)
    published = sorted(c.preset for c in FEATUP_CHECKPOINTS.values() if c.preset)
    if backbone in FEATUP_CHECKPOINTS and FEATUP_CHECKPOINTS[backbone].preset is None:
        raise CheckpointError(
            f"FeatUp's {backbone!r} backbone has no preset here, so checkpoint {name} cannot be checked against it; "
            "load it with backbone=None"
        )
    if preset not in PRESETS:
        raise CheckpointError(f"unknown backbone {backbone!r} for FeatUp checkpoint {name}; use one of {published}")
    if PRESETS[preset].dim != dim:
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
    if hub_name is None and preset not in published:
        raise CheckpointError(
            f"FeatUp published no JBU checkpoint for backbone {preset!r}; FeatUp's checkpoints belong to {published}"
        )


def load_featup_checkpoint(
    path: str | os.PathLike,
    backbone: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a FeatUp JBU ``.ckpt`` (local path or fsspec URI) as ``JBUUpsampler(C, cfg=FEATUP_JBU_CONFIG)``.

    Args:
        path: the Lightning checkpoint file (``<hub>_jbu_stack_cocostuff.ckpt`` or a renamed copy).
        backbone: preset (``"dino_vits16"``) or FeatUp hub name (``"dino16"``) whose features will be upsampled;
            refused when its channels differ from the file's C or the file names another backbone. None: no check.
        storage_options: fsspec options for a URI (e.g. ``{"anon": True}``).
        map_location: device for the parameters.

    Returns:
        The upsampler in eval mode: ``up(feats (B,C,h,w), image (B,3,H,W), output_size) -> (B,C,Ho,Wo)`` in feats'
        dtype. ``.checkpoint_hash`` is :func:`featup_checkpoint_hash`; ``.checkpoint_meta`` holds ``format``,
        ``featup_name`` (hub name or None), ``backbone`` (preset or None), ``dim``, ``channel_norm`` (FeatUp applied
        LayerNorm over channels to the features before this upsampler), ``epoch``, ``global_step``, ``file``.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: unreadable file, a pickled non-weight object, missing/unexpected/mis-shaped keys, or a
            backbone mismatch (each one line naming it).
    """
    path = os.fspath(path)
    data = _read_bytes(path, storage_options)
    ckpt = _unpickle(data, repr(path))
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"FeatUp checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict of tensors")
    state_dict = ckpt.get("state_dict", ckpt)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"FeatUp checkpoint {path!r}: 'state_dict' is a {type(state_dict).__name__}, not a dict")
    tensors, dim, channel_norm = from_featup_state_dict(state_dict, name=repr(path))
    hub_name = _identify(path, ckpt)
    if hub_name is not None and FEATUP_CHECKPOINTS[hub_name].dim != dim:
        hub_name = None  # a renamed or retrained file: trust the tensors, not the name
    if backbone is not None:
        _check_backbone(repr(path), backbone, dim, hub_name)
    module = _build(dim)
    module.load_state_dict(tensors, strict=True)
    module.to(map_location)
    module.eval()
    preset = FEATUP_CHECKPOINTS[hub_name].preset if hub_name else None
    module.checkpoint_meta = {
        "format": "featup-lightning-ckpt",
        "featup_name": hub_name,
        "backbone": preset if preset else (_resolve_backbone(backbone) if backbone else None),
        "dim": dim,
        "channel_norm": channel_norm,
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "global_step": ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None,
        "file": path.rstrip("/").rsplit("/", 1)[-1],
    }
    module.checkpoint_hash = hashlib.sha256(data).hexdigest()
    return module
