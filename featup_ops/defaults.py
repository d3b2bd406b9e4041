"""The default upsampler of each backbone preset, chosen by the segmentation probe (benchmarks/probe_upsamplers.py).

The package ships one trained checkpoint: FeatUp's feature-agnostic JBU (4 layers, kernel fix-up) trained with
``jobs/train_upsampler.py`` on EfficientNet-Lite0 features (docs/training.md). Its kernels depend on the image
only, so it runs on any backbone; it is the default where its training matches the backbone's stride (32: the
same 2x stage plan and layer-per-stage mapping it was trained with). Elsewhere the default is bilinear, which the
probe never saw beaten by an untrained or fixed upsampler.
"""
from __future__ import annotations

from pathlib import Path

#: Folder of the shipped checkpoint (``upsampler.safetensors`` + ``upsampler.json``; ``featup_ops.load_upsampler``).
SHIPPED_JBU = Path(__file__).resolve().parent / "pretrained" / "jbu_lite0"

#: ``featup_ops.checkpoint_hash`` of the shipped checkpoint (config + weights), as feature stores record it.
SHIPPED_JBU_HASH = "c8dbe6d12dab02a08524a3db9645a3f53a93716bdd67790e8f62e56a7af7c6b8"

#: Backbone strides the shipped checkpoint is the default for (it was trained at stride 32).
SHIPPED_JBU_STRIDES = frozenset({32})


def default_upsampler_for(backbone: str) -> str | None:
    """Checkpoint folder of the default upsampler for a backbone preset, or None for bilinear.

    Args:
        backbone: a preset name (``featup_ops.list_backbones()``) or a timm model name (not a preset: bilinear).

    Returns:
        The shipped JBU checkpoint folder (str) for presets of stride 32 (efficientnet_lite0: measured;
        resnet50: not measured), else None (the ViT presets, stride 14/16, and non-preset names).
    """
    from featup_ops.backbones import PRESETS

    cfg = PRESETS.get(backbone)
    if cfg is None or cfg.stride not in SHIPPED_JBU_STRIDES:
        return None
    if not (SHIPPED_JBU / "upsampler.safetensors").is_file():
        raise FileNotFoundError(f"the shipped upsampler is missing from the package: {SHIPPED_JBU}")
    return str(SHIPPED_JBU)
