"""Pictures of features: PCA to RGB with one basis per image, side by side with the image, written as PNG.

The low-res and high-res maps of an image are projected with ONE PCA basis fitted jointly on both, and coloured with
one shared scale, so a colour means the same feature direction in both panels and the pictures show what the
upsampler changed, not what a second basis would. Panels: ``[image | low-res | high-res]``, each shown at the
image's size (feature maps enlarged with nearest neighbour, so patches stay visible).

Two sources: rows of a feature store (:func:`render_store_rows`), and one image run through a backbone and an
upsampler (:func:`render_image`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from featup_ops.pca import fit_pca_maps
from pipeline.cli import flag
from pipeline.errors import ConfigError

PCA_MAX_PIXELS = 50_000
"""At most this many pixels (drawn evenly from all maps) fit the basis: enough for 3 stable components, cheap."""

COLOR_QUANTILES = (0.01, 0.99)
"""Each component is scaled so these quantiles (over all maps of the image) map to 0 and 255; outliers clip."""

PANEL_GAP = 4
"""White pixels between panels."""


def fit_pca(
    maps: Sequence[torch.Tensor], k: int = 3, *, max_pixels: int = PCA_MAX_PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PCA basis over the maps of one image (:func:`featup_ops.pca.fit_pca_maps`): ``(mean, components)``
    float64, each map contributing equally, components' signs fixed (deterministic colours)."""
    return fit_pca_maps(maps, k, max_pixels=max_pixels)


def pca_rgb(maps: Sequence[torch.Tensor], *, max_pixels: int = PCA_MAX_PIXELS) -> list[np.ndarray]:
    """Colour feature maps by their first 3 principal components, with one basis and one scale for all of them.

    Args:
        maps: feature maps ``(C, H_i, W_i)`` of the same image (e.g. low-res and high-res).

    Returns:
        One ``(H_i, W_i, 3) uint8`` picture per map.
    """
    mean, comps = fit_pca(maps, 3, max_pixels=max_pixels)
    projected = [
        torch.einsum("kc,chw->khw", comps, m.detach().to(torch.float64) - mean[:, None, None]) for m in maps
    ]
    flat = torch.cat([p.reshape(3, -1) for p in projected], 1)
    if flat.shape[1] > max_pixels:
        flat = flat[:, torch.linspace(0, flat.shape[1] - 1, max_pixels).round().long()]
    lo = torch.quantile(flat, COLOR_QUANTILES[0], dim=1)[:, None, None]
    hi = torch.quantile(flat, COLOR_QUANTILES[1], dim=1)[:, None, None]
    scale = (hi - lo).clamp_min(1e-12)
    out = []
    for p in projected:
        rgb = ((p - lo) / scale).clamp(0, 1).mul(255).round().to(torch.uint8)
        out.append(rgb.permute(1, 2, 0).contiguous().numpy())
    return out


def side_by_side(panels: Sequence[np.ndarray], size: tuple[int, int], *, gap: int = PANEL_GAP) -> Image.Image:
    """Lay ``(h, w, 3) uint8`` panels left to right, each resized (nearest) to ``size = (H, W)``.

    Returns:
        An RGB image of height H and width ``len(panels) * W + (len(panels) - 1) * gap``.
    """
    h, w = int(size[0]), int(size[1])
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h), (255, 255, 255))
    for i, p in enumerate(panels):
        im = Image.fromarray(np.ascontiguousarray(p, dtype=np.uint8), "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.NEAREST)
        canvas.paste(im, (i * (w + gap), 0))
    return canvas


def feature_picture(
    image: np.ndarray | None,
    lowres: torch.Tensor,
    hires: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """``[image | low-res | high-res]`` with one PCA basis for both feature maps.

    Args:
        image: ``(H, W, 3) uint8`` pixels the features were computed from, or None (a grey panel instead).
        lowres: ``(C, h, w)`` features.
        hires: ``(C, Hf, Wf)`` features.
        size: panel size ``(H, W)``; default: the image's size, else the high-res map's.

    Returns:
        The picture (PIL RGB image).
    """
    low_rgb, high_rgb = pca_rgb([lowres, hires])
    if size is None:
        size = tuple(image.shape[:2]) if image is not None else tuple(hires.shape[-2:])
    if image is None:
        image = np.full((*size, 3), 128, np.uint8)
    return side_by_side([image, low_rgb, high_rgb], size)


def save_png(picture: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``picture`` as PNG (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return keep.strip("._")[:80] or "image"


def render_store_rows(
    store: str,
    rows: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    array: str = "hires",
    storage_options: dict[str, Any] | None = None,
) -> list[Path]:
    """Write one picture per store row: the decoded source image (as the featurize job saw it), ``lowres`` and
    ``array`` (default ``hires``), coloured with one PCA basis per row.

    Args:
        store: store URI (local path or s3://).
        rows: manifest row numbers; each must be complete (status 1).
        out_dir: folder for ``row<NNNNNN>_<image_id>.png``.
        array: the high-res array to show (``hires`` or ``implicit``).
        storage_options: fsspec options for the store and the source images.

    Returns:
        The written paths, in the order of ``rows``.
    """
    from pipeline.read.dataset import FeatureDataset
    from pipeline.errors import StoreError

    low_ds = FeatureDataset(store, "lowres", storage_options=storage_options)
    high_ds = FeatureDataset(store, array, storage_options=storage_options)
    written = []
    for row in rows:
        try:
            low, high = low_ds[low_ds.index_of_row(int(row))], high_ds[high_ds.index_of_row(int(row))]
        except KeyError:
            raise StoreError(
                f"row {row} of {store!r} has no complete {array!r} features (failed, or not written yet); complete "
                f"rows: {_row_list(high_ds.rows)}"
            ) from None
        image = low_ds.source_pixels(int(row))
        pic = feature_picture(image, low["features"], high["features"])
        name = f"row{int(row):06d}_{_safe_name(str(low['image_id']))}.png"
        written.append(save_png(pic, Path(out_dir) / name))
    return written


def _row_list(rows: np.ndarray, most: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:most])
    return (shown + f", ... ({len(rows)} in all)") if len(rows) > most else (shown or "none")


@torch.no_grad()
def render_image(
    image: str,
    out: str | os.PathLike[str],
    *,
    backbone: str,
    weights: str | None = None,
    upsampler: str | None = None,
    input_size: int | Sequence[int] = 224,
    policy: str = "crop",
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Run one image through a backbone and an upsampler and write ``[image | low-res | high-res]`` as PNG.

    Args:
        image: image file (local or s3://).
        out: PNG path to write.
        backbone: ``featup_ops`` backbone preset name.
        weights: backbone weights (None = timm pretrained from the local cache, a file, or "random").
        upsampler: an upsampler spec (``featup_ops.load_upsampler``); None = the backbone's default.
        input_size: input size in pixels, one side (square) or ``(H, W)``; multiples of the backbone stride.
        policy: resize policy, "crop" or "pad", as in the featurize job.
        storage_options: fsspec options for s3:// inputs.

    Returns:
        The written path.
    """
    import featup_ops
    from pipeline.io.decode import check_size, decode_image, size_hw
    from pipeline.errors import DecodeError
    from pipeline.io.sources import read_bytes
    from pipeline.io.storage import access_errors

    from pipeline.featurize.stages import featurize_pixels

    model = featup_ops.load_backbone(backbone, weights).eval()
    up = featup_ops.load_upsampler(upsampler or featup_ops.default_upsampler_for(backbone),
                                   storage_options=storage_options, backbone=backbone)
    with access_errors(f"image {image!r}"):
        data = read_bytes(image, storage_options)
    try:
        decoded = decode_image(data, size=size_hw(check_size(input_size, "--input-size")), policy=policy)
    except DecodeError as e:
        raise DecodeError(f"image {image!r}: {e.reason}") from e
    pixels = np.asarray(decoded.pixels)
    low, high = featurize_pixels(pixels[None], model, up, output_size=pixels.shape[:2], batch_size=1)
    pic = feature_picture(pixels, low[0], high[0])
    return save_png(pic, out)


@dataclass(frozen=True)
class VisualizeConfig:
    """Settings of ``jobs/visualize.py`` (its flags are these fields): rows of a store (``store`` + ``rows``) or
    one image through a backbone (``image`` + ``backbone``)."""

    out: str = flag(help="output folder", path="output")
    store: str | None = flag(None, "feature store (local or s3://); with --rows", path="input")
    image: str | None = flag(None, "one image file (local or s3://); with --backbone", path="input")
    rows: tuple[int, ...] = flag((0,), "store rows to draw")
    array: Literal["hires", "implicit"] = flag("hires", "store array shown as high-res")
    backbone: str | None = flag(None, "featup_ops backbone preset (with --image)")
    weights: str | None = flag(None, "backbone weights: file, s3:// URI or 'random'", path="input")
    upsampler: str | None = flag(None, "upsampler spec (KIND[:VARIANT][=PATH], a checkpoint dir or .ckpt); "
                                       "default: the backbone's (featup_ops.default_upsampler_for)", path="input")
    input_size: int | tuple[int, int] = flag(
        224, "input: one side (square) or H W, multiples of the stride (with --image)", metavar="SIDE")
    policy: Literal["crop", "pad"] = flag("crop", "resize policy (with --image)")
    storage_options: dict[str, Any] | None = flag(
        None, 'fsspec options as JSON for the store, image, weights and checkpoint, e.g. \'{"anon": true}\'',
        compare=False)

    def __post_init__(self) -> None:
        if (self.store is None) == (self.image is None):
            raise ConfigError("give one of --store (with --rows) or --image (with --backbone)")
        if self.image is not None and not self.backbone:
            raise ConfigError("--image needs --backbone (e.g. --backbone efficientnet_lite0)")


def run_visualize(cfg: VisualizeConfig) -> list[Path]:
    """The pictures ``cfg`` asks for; returns their paths."""
    if cfg.store is not None:
        return render_store_rows(cfg.store, cfg.rows, cfg.out, array=cfg.array, storage_options=cfg.storage_options)
    stem = Path(str(cfg.image).split("?")[0]).stem
    return [render_image(str(cfg.image), Path(cfg.out) / f"{stem}_{cfg.backbone}.png", backbone=str(cfg.backbone),
                         weights=cfg.weights, upsampler=cfg.upsampler, input_size=cfg.input_size, policy=cfg.policy,
                         storage_options=cfg.storage_options)]
