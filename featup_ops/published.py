"""The published upsamplers this project runs, as data: one :class:`PublishedUpsampler` per ``KIND:VARIANT``.

Each entry names the publisher's file, where it lives (a Hugging Face repo, read with ``huggingface_hub``, or a plain
URL, read with torch.hub's download helper), its licence, what it fits (feature channels, backbone patch size, the
backbone presets it was trained for) and the published probe figure it is chosen by. Entries are presets in the timm
sense: adding a checkpoint is adding a row. :func:`list_upsamplers` prints them; :mod:`featup_ops.upsampler_spec`
resolves a spec string to an entry, fetches its file and builds the module with the kind's loader.

Kinds and their loaders (each module reads the publisher's own key layout strictly; see docs/upsamplers.md):

==========  ===================================  =====================================================
kind        loader                               what it is
==========  ===================================  =====================================================
bilinear    ``featup_ops.baselines``             ``F.interpolate`` (no file)
bilateral   ``featup_ops.baselines``             fixed joint bilateral filter (no file)
jbu         ``featup_ops.checkpoint``            this project's JBU checkpoints (shipped ``lite0``, or trained)
featup      ``featup_ops.featup_hub``            FeatUp's hub JBU stacks (Lightning ``.ckpt``), ChannelNorm included
uplift      ``featup_ops.uplift``                UPLiFT (iterative 2x decoder + local attender), safetensors
anyup       ``featup_ops.anyup``                 AnyUp (feature-agnostic window attention), ``.pth``
loftup      ``featup_ops.loftup``                LoftUp (coordinate cross-attention), ``pytorch_model.bin``
==========  ===================================  =====================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KINDS", "PUBLISHED", "PublishedUpsampler", "list_upsamplers", "published_entry"]

_FEATUP_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
_HF = "https://huggingface.co/{repo}/resolve/main/{file}"


@dataclass(frozen=True)
class PublishedUpsampler:
    """One published checkpoint of one upsampler kind.

    Attributes:
        kind: ``featup``, ``uplift``, ``anyup``, ``loftup``.
        variant: the name after the colon (``dinov2``, ``dinov2-s14``, ``paper``, ...).
        file: the publisher's file name (what is cached, and what ``=PATH`` must hold).
        url: its download address.
        hf_repo: the Hugging Face repo id when it lives there (fetched with ``hf_hub_download``), else None.
        sha256: hex digest of the publisher's file where it is known and fixed; None: not pinned (the store records
            the digest of the file actually used).
        licence: the weights' licence.
        source: the publisher's code repository.
        dim: feature channels the file requires (None: any).
        patch: backbone stride the file requires (None: any).
        backbones: this project's presets the checkpoint was trained for.
        lowres_normalized: the kind normalises the low-res features first, and stores keep them normalised.
        probe: a published linear-probe figure with its source (what the default table cites), or "".
        note: the backbone in the publisher's words.
    """

    kind: str
    variant: str
    file: str
    url: str
    hf_repo: str | None = None
    sha256: str | None = None
    licence: str = ""
    source: str = ""
    dim: int | None = None
    patch: int | None = None
    backbones: tuple[str, ...] = ()
    lowres_normalized: bool = False
    probe: str = ""
    note: str = ""

    @property
    def spec(self) -> str:
        """``KIND:VARIANT``."""
        return f"{self.kind}:{self.variant}"


@dataclass(frozen=True)
class KindInfo:
    """An upsampler kind: how its files are loaded (``"module:function"``, called ``(obj, variant=, name=)``), and
    what it is. ``files`` is False for the kinds that need no weights (bilinear, bilateral)."""

    loader: str
    summary: str
    files: bool = True
    licence: str = ""
    source: str = ""
    attribution: str = ""
    variants: tuple[str, ...] = field(default=())


KINDS: dict[str, KindInfo] = {
    "bilinear": KindInfo("featup_ops.baselines:BilinearUpsampler", "bilinear interpolation", files=False),
    "bilateral": KindInfo("featup_ops.baselines:BilateralUpsampler", "fixed joint bilateral upsampling", files=False),
    "jbu": KindInfo(
        "featup_ops.checkpoint:load_upsampler", "this project's JBU: the shipped lite0 checkpoint, or one you trained",
        licence="MIT", source="this repository",
    ),
    "featup": KindInfo(
        "featup_ops.featup_hub:load_featup", "FeatUp's JBU stacks (ICLR'24), hub checkpoints",
        licence="MIT", source="github.com/mhamilton723/FeatUp",
    ),
    "uplift": KindInfo(
        "featup_ops.uplift:load_uplift", "UPLiFT (CVPR'26): iterative 2x decoder with a local attender",
        licence="MIT", source="github.com/mwalmer-umd/UPLiFT",
    ),
    "anyup": KindInfo(
        "featup_ops.anyup:load_anyup", "AnyUp (ICLR'26): one feature-agnostic window-attention model for any backbone",
        licence="CC-BY-4.0", source="github.com/wimmerth/anyup",
        attribution="AnyUp weights by Thomas Wimmer et al., CC-BY-4.0 (github.com/wimmerth/anyup)",
    ),
    "loftup": KindInfo(
        "featup_ops.loftup:load_loftup", "LoftUp (ICCV'25): coordinate cross-attention over all low-res tokens",
        licence="MIT", source="github.com/andrehuang/loftup",
    ),
}


def _featup(hub: str, preset: str | None, dim: int, patch: int, note: str, probe: str = "") -> list[PublishedUpsampler]:
    common = dict(licence="MIT", source=KINDS["featup"].source, dim=dim, patch=patch,
                  backbones=(preset,) if preset else (), note=note)
    file = f"{hub}_jbu_stack_cocostuff.ckpt"
    rows = [PublishedUpsampler("featup", f"{hub}-no-norm", file, _FEATUP_URL + "no_norm/" + file, **common)]
    if hub != "maskclip":  # FeatUp publishes MaskCLIP without ChannelNorm only
        rows.insert(0, PublishedUpsampler("featup", hub, file, _FEATUP_URL + file, lowres_normalized=True,
                                          probe=probe, **common))
    return rows


def _hf(kind: str, variant: str, repo: str, file: str, **kw) -> PublishedUpsampler:
    return PublishedUpsampler(kind, variant, file, _HF.format(repo=repo, file=file), hf_repo=repo,
                              licence=KINDS[kind].licence, source=KINDS[kind].source, **kw)


_ANYUP_RELEASES = "https://github.com/wimmerth/anyup/releases/download/"

_ROWS: list[PublishedUpsampler] = [
    *_featup("dino16", "dino_vits16", 384, 16, "DINO ViT-S/16",
             "CAM ADCC 64.3 vs bilinear 61.7 (ViT-B/16, JAFAR Tab. 2); COCO +2.5 mIoU on DINOv2 (AnyUp Tab. 2)"),
    *_featup("dinov2", "dinov2_vits14", 384, 14, "DINOv2 ViT-S/14 (no registers)",
             "COCO-Stuff 61.95 vs bilinear 59.48 (AnyUp Tab. 2); 61.77 vs 59.41 (UPLiFT Tab.)"),
    *_featup("clip", "clip_vitb16", 512, 16, "OpenAI CLIP ViT-B/16, projected patch tokens",
             "COCO 52.55 vs bilinear 48.32 at 448 px (LoftUp, CLIP-B/16)"),
    *_featup("maskclip", None, 512, 16, "MaskCLIP ViT-B/16 (value path of the last block); no preset here"),
    *_featup("vit", "vit_s16", 384, 16, "supervised ViT-S/16",
             "CAM ADCC 64.3 vs bilinear 61.7 (ViT-B/16, JAFAR Tab. 2)"),
    *_featup("resnet50", "resnet50", 2048, 32, "ResNet-50 layer4",
             "no published probe figure; FeatUp's paper reports its ResNet-50 JBU above bilinear (Tab. 1)"),
    _hf("uplift", "dinov2-s14", "UPLiFT-upsampler/uplift_dinov2-s14", "uplift_dinov2-s14.safetensors",
        dim=384, patch=14, backbones=("dinov2_vits14",), note="DINOv2 ViT-S/14",
        probe="COCO-Stuff 62.55 vs bilinear 59.41, best of 7 (UPLiFT Tab., 448 px)"),
    _hf("uplift", "dinov3-splus16", "UPLiFT-upsampler/uplift_dinov3-splus16", "uplift_dinov3-splus16.safetensors",
        dim=384, patch=16, backbones=("dinov3_vits16plus",), note="DINOv3 ViT-S+/16",
        probe="no published probe figure for this variant; UPLiFT's DINOv2 model leads its table"),
    PublishedUpsampler("anyup", "paper", "anyup_paper.pth", _ANYUP_RELEASES + "checkpoint/anyup_paper.pth",
                       licence="CC-BY-4.0", source=KINDS["anyup"].source, note="trained on DINOv2 ViT-S/14",
                       backbones=("dinov2_vits14",),
                       probe="COCO 62.16 vs bilinear 59.48 (AnyUp Tab. 2); DINOv3-S+ 62.96 (Tab. 6)"),
    PublishedUpsampler("anyup", "multi-backbone", "anyup_multi_backbone.pth",
                       _ANYUP_RELEASES + "checkpoint_v2/anyup_multi_backbone.pth",
                       licence="CC-BY-4.0", source=KINDS["anyup"].source,
                       note="trained on DINOv2-S, DINOv2-S+reg4, CLIP-B/16, SigLIP-B/16, ViT-B/16",
                       backbones=("dinov2_vits14_reg",),
                       probe="unseen DeiT 54.83 vs 53.93 single-backbone (AnyUp Tab. 7); any backbone"),
    *[
        _hf("loftup", v, f"haiwen/loftup-{r}", "pytorch_model.bin", dim=d, patch=p, lowres_normalized=True,
            backbones=b, note=n, probe=pr)
        for v, r, d, p, b, n, pr in (
            ("dinov2s", "dinov2s", 384, 14, (), "DINOv2 ViT-S/14",
             "COCO-Stuff 62.19 vs bilinear 59.41 (UPLiFT Tab.); 62.15 vs 59.48 (AnyUp Tab. 2)"),
            ("dinov2s-reg", "dinov2s_reg", 384, 14, (), "DINOv2 ViT-S/14 with registers", ""),
            ("dinov2b", "dinov2b", 768, 14, (), "DINOv2 ViT-B/14", ""),
            ("dinov2b-reg", "dinov2b_reg", 768, 14, (), "DINOv2 ViT-B/14 with registers", ""),
            ("clip", "clip", 512, 16, (), "CLIP ViT-B/16", "COCO 53.87 vs bilinear 48.32 at 448 px (LoftUp)"),
            ("siglip", "siglip", 768, 16, (), "SigLIP B/16", ""),
            ("siglip2", "siglip2", 768, 16, (), "SigLIP 2 B/16", ""),
        )
    ],
]

#: ``"kind:variant"`` -> entry.
PUBLISHED: dict[str, PublishedUpsampler] = {row.spec: row for row in _ROWS}


def published_entry(kind: str, variant: str) -> PublishedUpsampler | None:
    """The entry for ``kind:variant``, or None."""
    return PUBLISHED.get(f"{kind}:{variant}")


def variants_of(kind: str) -> list[str]:
    """The published variants of a kind (``jbu``: ``lite0``; bilinear/bilateral: none)."""
    if kind == "jbu":
        return ["lite0"]
    return [row.variant for row in _ROWS if row.kind == kind]


def list_upsamplers() -> list[dict[str, object]]:
    """Every upsampler spec this project runs, as rows: ``spec``, ``kind``, ``variant``, ``file``, ``address``,
    ``licence``, ``source``, ``dim``, ``patch``, ``backbones``, ``probe``, ``summary``.

    ``bilinear``, ``bilateral`` (no file) and ``jbu:lite0`` (shipped in the package) come first, then the published
    checkpoints in :data:`PUBLISHED` order.
    """
    from .defaults import SHIPPED_JBU

    rows: list[dict[str, object]] = []
    for kind in ("bilinear", "bilateral"):
        rows.append(dict(spec=kind, kind=kind, variant=None, file=None, address=None, licence="", source="",
                         dim=None, patch=None, backbones=(), probe="", summary=KINDS[kind].summary))
    rows.append(dict(spec="jbu:lite0", kind="jbu", variant="lite0", file="upsampler.safetensors",
                     address=str(SHIPPED_JBU), licence="MIT", source="this repository (shipped in the package)",
                     dim=None, patch=None, backbones=("efficientnet_lite0",), probe="see docs/upsamplers.md",
                     summary=KINDS["jbu"].summary))
    for row in _ROWS:
        rows.append(dict(spec=row.spec, kind=row.kind, variant=row.variant, file=row.file, address=row.url,
                         licence=row.licence, source=row.source, dim=row.dim, patch=row.patch,
                         backbones=row.backbones, probe=row.probe, summary=KINDS[row.kind].summary))
    return rows
