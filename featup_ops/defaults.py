"""The default upsampler of each backbone: the published upsampler with the best published probe figure for it.

One table, :data:`DEFAULT_UPSAMPLERS` (preset -> upsampler spec); docs/upsamplers.md gives each row's source. A
default is resolved and fetched like the backbone's pretrained weights (once, into the cache; offline with no cached
copy the job stops with one line naming the file and the ``=PATH`` form); ``--upsampler bilinear`` opts out.

- ``efficientnet_lite0``: the JBU shipped in the package (``jbu:lite0``, trained with ``jobs/train_upsampler.py``;
  docs/training.md), which needs no download, so ``make demo`` runs offline.
- A timm model that is not a preset: ``anyup:multi-backbone``, the one published model trained for any backbone
  (AnyUp keeps its gain over bilinear on backbones it never saw).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_UPSAMPLERS", "SHIPPED_JBU", "SHIPPED_JBU_HASH", "default_upsampler_for"]

#: Folder of the shipped checkpoint (``upsampler.safetensors`` + ``upsampler.json``; ``featup_ops.load_upsampler``).
SHIPPED_JBU = Path(__file__).resolve().parent / "pretrained" / "jbu_lite0"

#: ``featup_ops.checkpoint_hash`` of the shipped checkpoint (config + weights), as feature stores record it.
SHIPPED_JBU_HASH = "c8dbe6d12dab02a08524a3db9645a3f53a93716bdd67790e8f62e56a7af7c6b8"

#: Backbone preset -> default upsampler spec (``featup_ops.load_upsampler``). Sources: docs/upsamplers.md.
DEFAULT_UPSAMPLERS: dict[str, str] = {
    "dinov2_vits14": "uplift:dinov2-s14",          # COCO-Stuff 62.55 vs bilinear 59.41, best of UPLiFT's table
    "dinov3_vits16plus": "uplift:dinov3-splus16",   # UPLiFT's DINOv3-S+ model
    "dinov3_vits16": "anyup:multi-backbone",        # no per-backbone model published; AnyUp transfers (Tab. 6)
    "dinov2_vits14_reg": "anyup:multi-backbone",    # trained on DINOv2-S+reg4 among others
    "dino_vits16": "featup:dino16",
    "clip_vitb16": "featup:clip",
    "vit_s16": "featup:vit",
    "resnet50": "featup:resnet50",
    "efficientnet_lite0": "jbu:lite0",
}

#: The default for timm models that are not presets.
ANY_BACKBONE_DEFAULT = "anyup:multi-backbone"


def default_upsampler_for(backbone: str) -> str:
    """The default upsampler spec for a backbone.

    Args:
        backbone: a preset name (``featup_ops.list_backbones()``) or a timm model name.

    Returns:
        A spec for ``featup_ops.load_upsampler``: the preset's row of :data:`DEFAULT_UPSAMPLERS`, else
        :data:`ANY_BACKBONE_DEFAULT`.
    """
    spec = DEFAULT_UPSAMPLERS.get(backbone, ANY_BACKBONE_DEFAULT)
    if spec == "jbu:lite0" and not (SHIPPED_JBU / "upsampler.safetensors").is_file():
        raise FileNotFoundError(f"the shipped upsampler is missing from the package: {SHIPPED_JBU}; reinstall")
    return spec
