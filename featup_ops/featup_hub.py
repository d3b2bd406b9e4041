"""FeatUp's published JBU upsamplers, computed as FeatUp's torch.hub models compute them (kind ``"featup"``).

FeatUp's hub entries (``mhamilton723/FeatUp``: ``dino16``, ``dinov2``, ``clip``, ``maskclip``, ``vit``,
``resnet50``) download ``<hub>_jbu_stack_cocostuff.ckpt``, the Lightning checkpoint of its training module, or the
``no_norm/`` file of the same name with ``use_norm=False``. The hub model is ``upsampler(model(image), image)``:

* ``use_norm=True`` (variant ``"<hub>"``): ``model`` ends in ChannelNorm, a LayerNorm over the channels at each
  pixel (eps 1e-5, affine from ``model.1.norm.*``), so the low-res features the user sees and the stack consumes
  are normalised (``prepare_lowres``). MaskCLIP is published only without it.
* ``use_norm=False`` (variant ``"<hub>-no-norm"``): the backbone features go straight in.
* the stack: four JBU layers of 2x each (``h -> 16h``) and a residual 1x1 channel mix, this project's
  ``JBUUpsampler(C, cfg=FEATUP_JBU_CONFIG)``; the guidance of every stage is ``adaptive_avg_pool2d(image, size)``,
  also where the stage is larger than the image (224 px image, 256 px output). An ``output_size`` of 16x the grid
  runs FeatUp's four doubling stages exactly; other sizes follow :func:`featup_ops.jbu.plan_stages`.

The file's ``state_dict`` maps one-to-one (other keys are the backbone and training-only parts, ignored)::

    model.1.norm.weight / .bias                      (C,)             -> norm.weight / .bias  (norm variants only)
    upsampler.up{1..4}.range_temp                    ()               -> jbu.layers.{0..3}.log_temperature
    upsampler.up{1..4}.sigma_spatial                 ()               -> jbu.layers.{0..3}.sigma
    upsampler.up{1..4}.range_proj.{0,3}.weight/bias  (32,3|32,1,1)    -> jbu.layers.{0..3}.range_proj.{0,3}.*
    upsampler.up{1..4}.fixup_proj.{0,3}.weight/bias  (49,52|49,1,1)   -> jbu.layers.{0..3}.fixup.{0,3}.*
    upsampler.fixup_proj.1.weight / .bias            (C,C,1,1), (C,)  -> jbu.final_conv.weight / .bias
    model.0.*, model.model.*, downsampler.*, scale_net.*               ignored (backbone, training-only parts)

Example::

    up = load_featup(read_tensor_file(data, "dinov2_jbu_stack_cocostuff.ckpt"), variant="dinov2", name="...")
    hr = up(feats, image, (16 * h, 16 * w))   # (B, 384, 16h, 16w), == FeatUp's hub model on those features
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baselines import check_upsample_args
from .config import JBUConfig
from .published import PUBLISHED
from .errors import CheckpointError, ConfigError, InputSizeError
from .jbu import JBUUpsampler
from .tensor_files import tensor_mapping
from .weights import state_dict_mismatches

__all__ = [
    "CHANNEL_NORM_EPS",
    "FEATUP_CHECKPOINTS",
    "FEATUP_JBU_CONFIG",
    "FEATUP_VARIANTS",
    "FeatUpCheckpoint",
    "FeatUpUpsampler",
    "featup_variant",
    "load_featup",
    "to_featup_state_dict",
]

NO_NORM = "-no-norm"


@dataclass(frozen=True)
class FeatUpCheckpoint:
    """One backbone FeatUp published JBU checkpoints for (derived from the registry,
    :data:`featup_ops.published.PUBLISHED`, which holds every file's address).

    Attributes:
        hub_name: FeatUp's torch.hub entry and file prefix (``<hub_name>_jbu_stack_cocostuff.ckpt``).
        preset: this project's backbone preset whose features it upsamples (None: no equivalent preset here).
        dim: feature channels C (the final 1x1 mix is C x C).
        note: the backbone in FeatUp's words.
        has_norm: FeatUp publishes a ChannelNorm (``use_norm=True``) file too (all but MaskCLIP).
    """

    hub_name: str
    preset: str | None
    dim: int
    note: str
    has_norm: bool = True

    @property
    def url(self) -> str:
        """Address of the hub's default file (with ChannelNorm; MaskCLIP's no-norm one, its only file)."""
        return self.norm_url if self.has_norm else self.no_norm_url

    @property
    def norm_url(self) -> str:
        """Address of the ``use_norm=True`` file (variant ``"<hub>"``); MaskCLIP has none (KeyError)."""
        return PUBLISHED[f"featup:{self.hub_name}"].url

    @property
    def no_norm_url(self) -> str:
        """Address of the ``use_norm=False`` file (variant ``"<hub>-no-norm"``)."""
        return PUBLISHED[f"featup:{self.hub_name}{NO_NORM}"].url


def _checkpoints() -> dict[str, FeatUpCheckpoint]:
    """One entry per FeatUp hub name, in the registry's order."""
    out: dict[str, FeatUpCheckpoint] = {}
    for row in PUBLISHED.values():
        if row.kind == "featup":
            hub = row.variant.removesuffix(NO_NORM)
            has_norm = hub in out and out[hub].has_norm or not row.variant.endswith(NO_NORM)
            preset = row.backbones[0] if row.backbones else None
            out[hub] = FeatUpCheckpoint(hub, preset, int(row.dim), row.note, has_norm)
    return out


#: FeatUp hub name -> its published checkpoints and the backbone preset they belong to.
FEATUP_CHECKPOINTS: dict[str, FeatUpCheckpoint] = _checkpoints()

#: Every published variant: ``"<hub>"`` (ChannelNorm) and ``"<hub>-no-norm"``; MaskCLIP only without norm.
FEATUP_VARIANTS: tuple[str, ...] = tuple(
    v for c in FEATUP_CHECKPOINTS.values() for v in ((c.hub_name,) if c.has_norm else ()) + (c.hub_name + NO_NORM,)
)

#: FeatUp's JBUStack as a ``JBUConfig``: 4 layers with the kernel fix-up and the final residual channel mix.
FEATUP_JBU_CONFIG = JBUConfig(fixup=True, final_mix=True, n_layers=4)

#: ChannelNorm's LayerNorm epsilon (torch's default, which FeatUp keeps).
CHANNEL_NORM_EPS = 1e-5

_N_LAYERS = 4
_PREFIX = "upsampler."
_IGNORED_PREFIXES = ("model.0.", "model.model.", "downsampler.", "scale_net.")
_NORM_KEYS = {"model.1.norm.weight": "norm.weight", "model.1.norm.bias": "norm.bias"}
_LAYER_RENAMES = (("range_temp", "log_temperature"), ("sigma_spatial", "sigma"), ("fixup_proj.", "fixup."))
_FINAL = ("fixup_proj.1.", "final_conv.")


def featup_variant(variant: str) -> tuple[FeatUpCheckpoint, bool]:
    """The published checkpoint and whether it has ChannelNorm, for a variant name.

    Args:
        variant: ``"<hub>"`` or ``"<hub>-no-norm"`` (see :data:`FEATUP_VARIANTS`).

    Raises:
        ConfigError: an unknown variant, or ``"maskclip"`` (published only as ``"maskclip-no-norm"``).
    """
    name = str(variant)
    norm = not name.endswith(NO_NORM)
    entry = FEATUP_CHECKPOINTS.get(name if norm else name[: -len(NO_NORM)])
    if entry is not None and norm and not entry.has_norm:
        raise ConfigError(
            f"featup: FeatUp published {entry.hub_name!r} only without ChannelNorm (its hub asserts use_norm=False); "
            f"use variant '{entry.hub_name}{NO_NORM}'"
        )
    if entry is None:
        raise ConfigError(f"featup: unknown variant {variant!r}; use one of {', '.join(FEATUP_VARIANTS)}")
    return entry, norm


class FeatUpUpsampler(nn.Module):
    """A FeatUp hub model's upsampling part: optional ChannelNorm, then the 4-layer JBU stack.

    Args:
        variant: one of :data:`FEATUP_VARIANTS` (``"dinov2"``, ``"dinov2-no-norm"``, ...); fixes C and the norm.
        device, dtype: factory kwargs of the parameters.

    Attributes:
        variant, dim (C), hub (the :class:`FeatUpCheckpoint`), lowres_normalized (True with ChannelNorm),
        norm (``nn.LayerNorm(C)`` or None), jbu (``JBUUpsampler(C, cfg=FEATUP_JBU_CONFIG)`` pooling its guidance).

    The parameters are the module's own initial values until a file is loaded (:func:`load_featup`).
    """

    kind: ClassVar[str] = "featup"
    channel_agnostic: ClassVar[bool] = False  # the final 1x1 conv mixes channels

    def __init__(self, variant: str = "dinov2", *, device=None, dtype=None) -> None:
        super().__init__()
        self.hub, norm = featup_variant(variant)
        self.variant = str(variant)
        self.dim = self.hub.dim
        self.lowres_normalized = norm
        fk = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(self.dim, eps=CHANNEL_NORM_EPS, **fk) if norm else None
        self.jbu = JBUUpsampler(self.dim, cfg=FEATUP_JBU_CONFIG, guidance_resize=F.adaptive_avg_pool2d, **fk)

    def _name(self) -> str:
        return f"FeatUpUpsampler({self.variant})"

    def prepare_lowres(self, lowres: torch.Tensor) -> torch.Tensor:
        """FeatUp's ChannelNorm (LayerNorm over C at every pixel) for norm variants; the identity otherwise.

        Args:
            lowres: (B, C, h, w) backbone features, the module's dtype.

        Returns:
            (B, C, h, w) contiguous, lowres' dtype: what FeatUp's hub ``model`` returns.

        Raises:
            InputSizeError: not (B, C, h, w) with C == dim.
        """
        if not torch.is_tensor(lowres) or lowres.dim() != 4 or lowres.shape[1] != self.dim:
            raise InputSizeError(
                f"{self._name()}: lowres must be (B, {self.dim}, h, w) features of FeatUp's {self.hub.hub_name!r} "
                f"backbone, got {tuple(getattr(lowres, 'shape', ())) or type(lowres).__name__}"
            )
        if self.norm is None:
            return lowres
        return self.norm(lowres.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def upsample_prepared(
        self, lowres_prepared: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The JBU stack on already prepared features.

        Args:
            lowres_prepared: (B, C, h, w), :meth:`prepare_lowres` output.
            image: (B, 3, H, W) ImageNet-normalised image (the guidance, area-pooled to every stage's size).
            output_size: (Ho, Wo) >= (h, w); default (H, W). FeatUp's own size is (16h, 16w).

        Returns:
            (B, C, Ho, Wo), lowres' dtype.
        """
        out = check_upsample_args(lowres_prepared, image, output_size, name=self._name(), dim=self.dim)
        return self.jbu(lowres_prepared, image, out)

    def forward(
        self, lowres: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``upsample_prepared(prepare_lowres(lowres), image, output_size)``: (B, C, Ho, Wo) in lowres' dtype."""
        return self.upsample_prepared(self.prepare_lowres(lowres), image, output_size)

    def config_dict(self) -> dict[str, Any]:
        """``{"kind": "featup", "variant": ..., "dim": C}``."""
        return {"kind": self.kind, "variant": self.variant, "dim": self.dim}

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> "FeatUpUpsampler":
        """Rebuild (initial parameters) from :meth:`config_dict` output."""
        if config.get("kind") != cls.kind:
            raise ConfigError(f"FeatUpUpsampler.from_config_dict: kind must be 'featup', got {config.get('kind')!r}")
        module = cls(str(config.get("variant")))
        if config.get("dim", module.dim) != module.dim:
            raise ConfigError(
                f"FeatUpUpsampler.from_config_dict: variant {module.variant!r} has {module.dim} channels, "
                f"not dim={config.get('dim')!r}"
            )
        return module


# --- FeatUp's key layout ----------------------------------------------------------------------------------------


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


def to_featup_state_dict(upsampler: nn.Module, *, prefix: str = _PREFIX) -> dict[str, torch.Tensor]:
    """An upsampler in FeatUp's key layout (detached CPU tensors), what :func:`load_featup` reads back.

    Args:
        upsampler: a :class:`FeatUpUpsampler` (its ChannelNorm goes to ``model.1.norm.*``), or a
            ``JBUUpsampler(dim, cfg=FEATUP_JBU_CONFIG)`` (4 layers, fix-up and final mix on).
        prefix: prepended to every stack key (FeatUp's Lightning module keeps the stack under ``"upsampler."``).

    Returns:
        {featup_key: tensor}, the same shapes and dtypes.

    Raises:
        CheckpointError: the module is not FeatUp's stack (other layer count, no fix-up or no final mix).
    """
    out: dict[str, torch.Tensor] = {}
    if isinstance(upsampler, FeatUpUpsampler):
        if upsampler.norm is not None:
            out = {k: getattr(upsampler.norm, v.split(".")[1]).detach().cpu() for k, v in _NORM_KEYS.items()}
        upsampler = upsampler.jbu
    cfg = getattr(upsampler, "cfg", None)
    layers = getattr(upsampler, "layers", ())
    if not isinstance(cfg, JBUConfig) or not (cfg.fixup and cfg.final_mix and len(layers) == _N_LAYERS):
        raise CheckpointError(
            "to_featup_state_dict: only a FeatUpUpsampler or a JBUUpsampler(dim, cfg=FEATUP_JBU_CONFIG) has "
            "FeatUp's layout (4 layers, fixup=True, final_mix=True)"
        )
    out.update({prefix + _to_featup_key(k): v.detach().cpu() for k, v in upsampler.state_dict().items()})
    return out


def _file_dim(stack: Mapping[str, torch.Tensor]) -> int | None:
    w = stack.get(_FINAL[0] + "weight")
    return int(w.shape[0]) if w is not None and w.dim() == 4 else None


def load_featup(obj: Mapping[str, Any], *, variant: str, name: str) -> FeatUpUpsampler:
    """Build a FeatUp hub variant from its published file's contents, strictly.

    Args:
        obj: :func:`featup_ops.tensor_files.read_tensor_file` output: a Lightning checkpoint dictionary (its
            ``state_dict`` entry is read), or a bare state dict (FeatUp's ``upsampler.*`` / ``model.1.norm.*`` keys,
            or a ``JBUStack``'s own ``up1.*`` ... ``fixup_proj.1.*`` keys).
        variant: one of :data:`FEATUP_VARIANTS`; norm variants need ``model.1.norm.*``, ``-no-norm`` ones refuse it.
        name: how to name the file in errors (its path or URI).

    Returns:
        The :class:`FeatUpUpsampler` with the file's weights (float32, CPU), in eval mode.

    Raises:
        ConfigError: an unknown variant (or ``"maskclip"``, published only as ``"maskclip-no-norm"``).
        CheckpointError: a value that is not a tensor; channels other than the variant's; ChannelNorm present in a
            ``-no-norm`` file or absent from a norm one; missing, unexpected or mis-shaped keys (FeatUp's names).
    """
    entry, norm = featup_variant(variant)
    where = f"FeatUp checkpoint {name}"
    state = tensor_mapping(obj, name, entry="state_dict")
    lightning = any(k.startswith(_PREFIX) for k in state)
    prefix = _PREFIX if lightning else ""
    stack: dict[str, torch.Tensor] = {}
    given: dict[str, torch.Tensor] = {}  # FeatUp name -> tensor, for the strict comparison
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        given[key] = value
        if key.startswith(prefix) and key not in _NORM_KEYS:
            stack[key[len(prefix):]] = value
    has_norm = any(k in state for k in _NORM_KEYS)
    dim = _file_dim(stack)
    if dim is None:
        raise CheckpointError(
            f"{where} has no {prefix}{_FINAL[0]}weight (C, C, 1, 1) (the final 1x1 channel mix); "
            "is it a FeatUp jbu_stack checkpoint?"
        )
    if dim != entry.dim:
        raise CheckpointError(
            f"{where} upsamples {dim}-channel features but variant {variant!r} is FeatUp's {entry.dim}-channel "
            f"{entry.hub_name} stack; use the variant of the backbone it was trained on"
        )
    if has_norm and not norm:
        fix = f"use variant {entry.hub_name!r}" if entry.has_norm else f"FeatUp published no such {entry.hub_name} file"
        raise CheckpointError(
            f"{where} holds FeatUp's ChannelNorm (model.1.norm.*), a use_norm=True file, but variant {variant!r} "
            f"has none; {fix}"
        )
    if norm and not has_norm:
        raise CheckpointError(
            f"{where} has no ChannelNorm (model.1.norm.*), a use_norm=False file, but variant {variant!r} applies "
            f"it; use variant '{entry.hub_name}{NO_NORM}'"
        )
    module = FeatUpUpsampler(variant, device="meta")
    target: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if key.startswith("jbu."):
            target[prefix + _to_featup_key(key[len("jbu."):])] = value
        else:
            target[next(k for k, v in _NORM_KEYS.items() if v == key)] = value
    problems = state_dict_mismatches(given, target, source="file")
    if problems:
        raise CheckpointError(f"{where} does not fit FeatUp's {variant} upsampler (C={dim}): {problems}")
    tensors = {"jbu." + _to_project_key(k): v for k, v in stack.items()}
    tensors.update({_NORM_KEYS[k]: state[k] for k in _NORM_KEYS if norm})
    module = module.to_empty(device="cpu")
    module.load_state_dict(tensors, strict=True)
    return module.eval()
