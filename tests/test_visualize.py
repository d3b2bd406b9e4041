"""Pictures: valid PNGs of the predicted size, one PCA basis shared by low-res and high-res maps."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.evaluate.visualize import PANEL_GAP, feature_picture, fit_pca, pca_rgb, render_image, save_png


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_basis_for_both_maps():
    """The high-res map is the low-res one upsampled: with one basis the colours of matching cells agree."""
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(16, 6, 6, generator=gen)
    high = F.interpolate(low[None], scale_factor=4, mode="nearest")[0]
    low_rgb, high_rgb = pca_rgb([low, high])
    assert low_rgb.shape == (6, 6, 3) and high_rgb.shape == (24, 24, 3) and low_rgb.dtype == np.uint8
    np.testing.assert_array_equal(high_rgb[::4, ::4], low_rgb)
    mean, comps = fit_pca([low, high], 3)
    np.testing.assert_allclose((comps @ comps.T).numpy(), np.eye(3), atol=1e-9)  # orthonormal
    assert mean.shape == (16,)


def test_picture_png_size(tmp_path):
    image = np.zeros((40, 30, 3), np.uint8)
    pic = feature_picture(image, torch.randn(8, 5, 4), torch.randn(8, 40, 30))
    path = save_png(pic, tmp_path / "sub" / "p.png")
    assert _is_png(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 30 + 2 * PANEL_GAP, 40) and im.mode == "RGB"


def test_render_image_with_backbone(tmp_path, samples_dir):
    out = render_image(str(samples_dir / "skate.jpg"), tmp_path / "skate.png", backbone="efficientnet_lite0",
                       weights="random", input_size=64)
    assert _is_png(out)
    with Image.open(out) as im:
        assert im.size == (3 * 64 + 2 * PANEL_GAP, 64)
        px = np.asarray(im)
    assert px[:, 2 * (64 + PANEL_GAP):].std() > 0  # the high-res panel is not blank


def test_render_image_non_square(tmp_path, samples_dir):
    out = render_image(str(samples_dir / "skate.jpg"), tmp_path / "wide.png", backbone="efficientnet_lite0",
                       weights="random", input_size=(64, 96))
    with Image.open(out) as im:
        assert im.size == (3 * 96 + 2 * PANEL_GAP, 64)
