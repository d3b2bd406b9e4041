"""Write the training folder of the shipped JBU checkpoint: square crops of offline colour photos, none of them a
probe photo.

The training job decodes every image with one Resize + CenterCrop (FeatUp's transform), so a folder of whole photos
gives it one view per photo (plus the jitters). This script cuts each training photo into several square crops at
three scales (the whole short side, 0.65 and 0.45 of it), so the job sees more, and differently scaled, content.

Photos (all offline, none of them one of the probe's six ``benchmarks.probe_scenes.PROBE_PHOTOS``):
- the 6 training photos of ``pipeline/samples`` (bird_full, bird_left, bird_right, cones2, cones3, dog_man_1_crop);
- 3 colour photos shipped inside the scikit-image wheel: ``stereo_motorcycle`` (left view), ``retina``,
  ``immunohistochemistry``.
The 2 held-out sample photos (plant, skate) are written whole, last in name order (``v_*``), so the job's
``--val-images 2`` holds out exactly them.

    python benchmarks/make_train_photos.py --out runs/train_photos     # 83 files, ~1 s
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "pipeline" / "samples"
#: training photos from pipeline/samples (the two held-out ones, plant and skate, are written whole as v_*)
SAMPLE_TRAIN = ("bird_full", "bird_left", "bird_right", "cones2", "cones3", "dog_man_1_crop")
SAMPLE_VAL = ("plant", "skate")
#: colour photos in the scikit-image wheel that are not probe photos
SKIMAGE_TRAIN = ("stereo_motorcycle", "retina", "immunohistochemistry")
#: crop side as a fraction of the photo's short side, and crops per scale (centre, then corners / random)
SCALES = ((1.0, 1), (0.65, 4), (0.45, 4))
#: side of the written crops (the job resizes them to --input-size)
OUT_SIDE = 320


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    return np.ascontiguousarray(img[..., :3])


def _crops(photo: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = photo.shape[:2]
    short = min(h, w)
    out = []
    for frac, n in SCALES:
        side = int(round(frac * short))
        if n == 1:
            offsets = [((h - side) // 2, (w - side) // 2)]
        else:
            corners = [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
            offsets = corners if frac > 0.5 else [
                (int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))) for _ in range(n)]
        out.extend(photo[y : y + side, x : x + side] for y, x in offsets)
    return out


def _save(arr: np.ndarray, path: Path) -> None:
    img = Image.fromarray(arr)
    if min(img.size) > OUT_SIDE:
        scale = OUT_SIDE / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
    img.save(path, quality=95)


def write_train_photos(out: str | Path, seed: int = 0) -> list[Path]:
    """Write the crops (``t_<photo>_<k>.jpg``) and the held-out photos (``v_<photo>.jpg``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [(n, np.asarray(Image.open(SAMPLES / f"{n}.jpg").convert("RGB"))) for n in SAMPLE_TRAIN]
    photos += [(n, _skimage_photo(n)) for n in SKIMAGE_TRAIN]
    written = []
    for name, photo in photos:
        for k, crop in enumerate(_crops(photo, rng)):
            written.append(out / f"t_{name}_{k:02d}.jpg")
            _save(crop, written[-1])
    for name in SAMPLE_VAL:
        written.append(out / f"v_{name}.jpg")
        _save(np.asarray(Image.open(SAMPLES / f"{name}.jpg").convert("RGB")), written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="draws of the random small crops (default 0)")
    args = p.parse_args(argv)
    files = write_train_photos(args.out, args.seed)
    print(f"{len(files)} images in {args.out} ({sum(f.name.startswith('t_') for f in files)} training crops, "
          f"{sum(f.name.startswith('v_') for f in files)} held out, last in name order)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
