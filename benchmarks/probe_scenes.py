"""Labelled scenes for the upsampler probe, made offline: each scene is a Voronoi mosaic of regions cut from
different photos, and a region's class is the photo it came from.

Photos: six colour photos shipped inside the scikit-image and scikit-learn wheels (no download), none of which the
shipped JBU checkpoint was trained on (it trains on crops of ``pipeline/samples`` and of three other scikit-image
photos, ``benchmarks/make_train_photos.py``). Each photo is cut in two halves along
its long side: scenes of the probe's training set take their regions from the first halves only, scenes of its test
set from the second halves only, so no test pixel is ever seen by the probe's training.

Everything here is numpy + PIL; the photo loaders import scikit-image / scikit-learn lazily.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: class id -> photo name (the class of a region is the photo it was cut from)
PROBE_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
#: regions per scene (drawn uniformly from this range, inclusive), each from a different photo
REGIONS = (2, 4)
#: the halves are scaled so their short side is this many times the scene side (room for random crops)
CROP_ROOM = 1.15


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


def load_photos(names: Sequence[str] = PROBE_PHOTOS) -> list[np.ndarray]:
    """The named photos as ``(H, W, 3) uint8`` arrays (from the scikit-image / scikit-learn wheels, offline)."""
    unknown = [n for n in names if n not in _LOADERS]
    if unknown:
        raise ValueError(f"unknown probe photo(s) {unknown}; known: {sorted(_LOADERS)}")
    try:
        return [np.ascontiguousarray(_LOADERS[n]()[..., :3]) for n in names]
    except ImportError as e:
        raise SystemExit(f"probe photos need scikit-image and scikit-learn (pip install -e '.[dev]'): {e}") from None


def split_halves(photo: np.ndarray, scene_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``(H, W, 3) uint8`` in two along its long side; scale each half so its short side is
    ``CROP_ROOM * scene_size`` (bicubic). Returns (train half, test half), each ``(h, w, 3) uint8``, h, w >= size."""
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"split_halves: need an (H, W, 3) uint8 photo, got {photo.shape} {photo.dtype}")
    h, w = photo.shape[:2]
    halves = (photo[:, : w // 2], photo[:, w // 2 :]) if w >= h else (photo[: h // 2], photo[h // 2 :])
    out = []
    for half in halves:
        hh, ww = half.shape[:2]
        scale = CROP_ROOM * scene_size / min(hh, ww)
        size = (max(scene_size, round(ww * scale)), max(scene_size, round(hh * scale)))
        out.append(np.asarray(Image.fromarray(half).resize(size, Image.BICUBIC)))
    return out[0], out[1]


def voronoi_regions(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size) int64`` region index in ``[0, n)``: nearest of n random seed points (every region non-empty)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    while True:
        pts = rng.uniform(0, size, size=(n, 2))
        d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
        regions = d.argmin(0)
        if len(np.unique(regions)) == n:
            return regions


def compose_scene(
    sources: Sequence[np.ndarray], size: int, rng: np.random.Generator, regions: tuple[int, int] = REGIONS
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: a Voronoi mosaic whose region r shows a random ``size`` crop of ``sources[c_r]``.

    Args:
        sources: per class, an ``(h, w, 3) uint8`` image with h, w >= size.
        size: scene side in pixels.
        rng: the draws (number of regions, classes, seed points, crop offsets).
        regions: (min, max) regions per scene, each of a different class.

    Returns:
        ``(size, size, 3) uint8`` image and ``(size, size) uint8`` label (class ids).
    """
    if any(s.shape[0] < size or s.shape[1] < size for s in sources):
        raise ValueError(f"compose_scene: every source must be at least {size} px on both sides")
    n = int(rng.integers(regions[0], min(regions[1], len(sources)) + 1))
    classes = rng.choice(len(sources), size=n, replace=False)
    index = voronoi_regions(size, n, rng)
    image = np.zeros((size, size, 3), np.uint8)
    label = np.zeros((size, size), np.uint8)
    for r, c in enumerate(classes):
        src = sources[int(c)]
        y = int(rng.integers(0, src.shape[0] - size + 1))
        x = int(rng.integers(0, src.shape[1] - size + 1))
        mask = index == r
        image[mask] = src[y : y + size, x : x + size][mask]
        label[mask] = c
    return image, label


def make_scenes(
    photos: Sequence[np.ndarray], n_train: int, n_test: int, size: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test scene sets from the photos' first and second halves.

    Returns:
        ``{"train": (images (N, size, size, 3) uint8, labels (N, size, size) uint8), "test": (...)}``.
    """
    halves = [split_halves(p, size) for p in photos]
    out = {}
    for split, n, part in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng([seed, part])
        scenes = [compose_scene([h[part] for h in halves], size, rng) for _ in range(n)]
        out[split] = (np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes]))
    return out


def write_scene_folders(scenes: dict[str, tuple[np.ndarray, np.ndarray]], root: str | Path) -> dict[str, Path]:
    """Write ``root/<split>/<split>_NNNN.png`` images and ``root/labels/<split>_NNNN.png`` index PNGs (class ids),
    the layout ``jobs/featurize.py`` + ``jobs/eval_probe.py --label-kind folder`` read. Returns the folders."""
    root = Path(root)
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    dirs = {"labels": labels}
    for split, (images, labs) in scenes.items():
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labs)):
            Image.fromarray(img).save(d / f"{split}_{i:04d}.png")
            Image.fromarray(lab).save(labels / f"{split}_{i:04d}.png")
        dirs[split] = d
    return dirs
