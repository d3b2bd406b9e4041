"""Label maps joined to store rows, aligned pixel for pixel with the image the featurize job saw.

Sources (all local or ``s3://``):

- COCO-Stuff 164k ``stuffthingmaps`` PNGs (``<root>/<12-digit COCO id>.png``; values 0-181 = fine class id - 1,
  255 = unlabelled), mapped to the 27 coarse classes with :data:`COCO_STUFF_FINE_TO_COARSE` (``kind="coco-stuff-27"``),
  or to the 171 fine classes that occur, renumbered 0-170 (``kind="coco-stuff-171"``).
- Folders of index PNGs, one per image (``kind="folder"``): Pascal VOC ``SegmentationClass`` (palette PNGs whose
  indices are the classes, 255 = boundary/ignore), ADE20K ``annotations`` (0 = other, kept, 151 classes as in the
  shared protocol; pass ``reduce_zero_label=True`` for the 150-class convention), Cityscapes ``*_labelTrainIds.png``
  (19 classes, 255 ignore; set ``suffix="_gtFine_labelTrainIds.png"``). An optional ``lookup`` table remaps values.
- Depth PNGs (``kind="depth"``): 16-bit integers times ``depth_scale`` (e.g. 1/1000 for millimetres), 0 = invalid;
  aligned the same way, returned as float32.

Alignment: labels are resized with nearest neighbour (pixel-centre sampling, like torchvision's NEAREST_EXACT) and
cropped or padded with exactly the geometry :func:`pipeline.io.decode.decode_image` applied to the image: policy
"crop" scales to cover the input size and centre-crops; policy "pad" scales to fit and pads bottom/right, where
labels get the ignore value (255; depth 0). The geometry is :func:`resize_geometry`; ``tests/test_dataset.py``
checks it against ``decode_image`` itself on a synthetic image.
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.io.decode import Geometry, resize_geometry
from pipeline.errors import ConfigError, InputNotFoundError, PipelineError

__all__ = [
    "COCO_STUFF_FINE_TO_COARSE",
    "COCO_STUFF_UNUSED_FINE_IDS",
    "COCO_STUFF_COARSE_CLASSES",
    "IGNORE_INDEX",
    "LabelKind",
    "LabelSource",
    "LabelMismatchError",
    "Geometry",
    "resize_geometry",
    "align_label",
]

IGNORE_INDEX = 255
"""Label value for unlabelled and padded pixels; excluded from probe loss and metrics."""

# COCO-Stuff 164k fine -> coarse (27 classes) map, as data: index = fine id (0-181, i.e. the stuffthingmaps PNG value,
# which is the COCO-Stuff label id minus 1), value = coarse id (0-26: 12 "thing" super-categories 0-11, then 15
# "stuff" super-categories 12-26). Source: the table used by the unsupervised-segmentation line of work that FeatUp's
# COCO-Stuff probe follows (IIC -> PiCIE -> STEGO ``src/data.py`` ``Coco.fine_to_coarse``, reused verbatim in FeatUp
# ``featup/datasets/COCO.py``); it follows the official COCO-Stuff hierarchy (cocostuff ``labels.md``). Unused fine
# ids (:data:`COCO_STUFF_UNUSED_FINE_IDS`) keep the table's entry but never occur in the PNGs.
COCO_STUFF_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 80-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24,  # 180-181
)

# The 11 COCO "thing" ids that COCO 2017 never uses (1-based 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91: street
# sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush), as 0-based PNG values.
# 182 - 11 = the 171 fine classes.
COCO_STUFF_UNUSED_FINE_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# Coarse class names in coarse-id order (STEGO/FeatUp order: things 0-11, stuff 12-26).
COCO_STUFF_COARSE_CLASSES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material",
    "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)

LabelKind = Literal["coco-stuff-27", "coco-stuff-171", "folder", "depth"]
_KINDS = ("coco-stuff-27", "coco-stuff-171", "folder", "depth")


class LabelMismatchError(PipelineError, ValueError):
    """A label map does not belong to the row it was joined to (its size differs from the image's)."""


def _lookup_coarse() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    table[: len(COCO_STUFF_FINE_TO_COARSE)] = COCO_STUFF_FINE_TO_COARSE
    return table


def _lookup_fine171() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_FINE_IDS]
    table[used] = np.arange(len(used))
    return table


def _nearest_index(n_out: int, n_in: int, start: int, count: int) -> np.ndarray:
    """Source index of output pixels ``start .. start+count-1`` of an ``n_in -> n_out`` nearest resize (centres)."""
    pos = (np.arange(start, start + count, dtype=np.float64) + 0.5) * (n_in / n_out)
    return np.minimum(np.floor(pos).astype(np.int64), n_in - 1)


def align_label(
    label: np.ndarray, size: tuple[int, int], policy: str, *, fill: int | float = IGNORE_INDEX
) -> np.ndarray:
    """Resize (nearest) and crop/pad a label map exactly as the image was.

    Args:
        label: ``(h, w)`` map at the source image's resolution (any dtype).
        size: the job's input ``(H, W)``.
        policy: "crop" or "pad".
        fill: value of padded pixels.

    Returns:
        ``(H, W)`` map, same dtype as ``label``.
    """
    g = resize_geometry(label.shape[:2], size, policy)
    (rh, rw), (top, left) = g.resized, g.offset
    if policy == "crop":
        ys = _nearest_index(rh, label.shape[0], top, g.size[0])
        xs = _nearest_index(rw, label.shape[1], left, g.size[1])
        return label[ys[:, None], xs[None, :]]
    out = np.full(g.size, fill, dtype=label.dtype)
    ys = _nearest_index(rh, label.shape[0], 0, rh)
    xs = _nearest_index(rw, label.shape[1], 0, rw)
    out[:rh, :rw] = label[ys[:, None], xs[None, :]]
    return out


@dataclass(frozen=True)
class LabelSource:
    """Label PNGs in a folder or prefix, looked up by image id; pickle-safe (paths and options only).

    Attributes:
        root: folder or ``s3://`` prefix holding the PNGs.
        kind: "coco-stuff-27", "coco-stuff-171", "folder" or "depth".
        suffix: file name ending added to the id's stem (default ".png").
        lookup: optional 256-entry remap of raw values (e.g. Cityscapes labelIds -> trainIds); not for depth.
        reduce_zero_label: ADE20K's 150-class convention (0 -> 255, others - 1).
        depth_scale: depth units per PNG integer (depth kind).
        num_classes: classes of the result (27/171 for COCO-Stuff; must be given for "folder" to size a probe).
        storage_options: fsspec options for s3://.
    """

    root: str
    kind: LabelKind = "coco-stuff-27"
    suffix: str = ".png"
    lookup: tuple[int, ...] | None = None
    reduce_zero_label: bool = False
    depth_scale: float = 1.0 / 1000.0
    num_classes: int | None = None
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"unknown label kind {self.kind!r}; choose one of {', '.join(_KINDS)}")
        if self.lookup is not None and len(self.lookup) != 256:
            raise ConfigError("LabelSource.lookup must have 256 entries (one per 8-bit label value)")
        if self.num_classes is None:
            n = {"coco-stuff-27": 27, "coco-stuff-171": 171}.get(self.kind)
            object.__setattr__(self, "num_classes", n)

    @property
    def is_depth(self) -> bool:
        return self.kind == "depth"

    def candidates(self, image_id: str, uri: str | None = None) -> list[str]:
        """File names tried for a row, in order: the id's stem (ids may be relative paths), the 12-digit zero-padded
        COCO file name for numeric ids, and the stem of the row's source file."""
        names = []
        stem = posixpath.splitext(image_id)[0]
        names.append(stem + self.suffix)
        if image_id.isdigit():
            names.append(f"{int(image_id):012d}{self.suffix}")
        if uri:
            base = uri.split("#", 1)[0].rsplit("/", 1)[-1]
            names.append(posixpath.splitext(base)[0] + self.suffix)
        return list(dict.fromkeys(names))

    def _fs(self) -> tuple[Any, str]:
        from pipeline.io.storage import filesystem

        return filesystem(self.root, self.storage_options)

    def read(self, image_id: str, uri: str | None = None) -> np.ndarray:
        """The raw label map of one image, ``(h, w)``: int64 classes (mapped per ``kind``; 255 = ignore) or float32
        depth (0 = invalid)."""
        from pipeline.io.storage import access_errors

        with access_errors(f"labels {self.root!r}"):
            fs, base = self._fs()
            data = None
            for name in self.candidates(image_id, uri):
                path = posixpath.join(base, name) if "://" in self.root else f"{base.rstrip('/')}/{name}"
                try:
                    with fs.open(path, "rb") as f:
                        data = f.read()
                    break
                except FileNotFoundError:
                    continue
            if data is None and not fs.exists(base):
                raise InputNotFoundError(f"labels {self.root!r} do not exist; check --labels")
        if data is None:
            tried = ", ".join(self.candidates(image_id, uri))
            raise InputNotFoundError(
                f"no label for image {image_id!r} under {self.root} (tried {tried}); check --labels"
            )
        with Image.open(io.BytesIO(data)) as im:
            raw = np.asarray(im)  # palette PNGs give their indices, 16-bit PNGs their integers
        if raw.ndim == 3:
            raise LabelMismatchError(f"label for {image_id!r} is a colour image; expected one index per pixel")
        if self.is_depth:
            return raw.astype(np.float32) * np.float32(self.depth_scale)
        return self._classes(raw)

    def _classes(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype != np.uint8 and raw.max(initial=0) > 255:
            raise LabelMismatchError(f"label values up to {int(raw.max())} do not fit 8-bit class maps")
        raw = raw.astype(np.int64)
        if self.kind == "coco-stuff-27":
            return _lookup_coarse()[raw]
        if self.kind == "coco-stuff-171":
            return _lookup_fine171()[raw]
        if self.lookup is not None:
            raw = np.asarray(self.lookup, dtype=np.int64)[raw]
        if self.reduce_zero_label:
            raw = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)
        return raw

    def aligned(
        self,
        image_id: str,
        *,
        size: tuple[int, int],
        policy: str,
        orig_size: tuple[int, int] | None = None,
        uri: str | None = None,
    ) -> np.ndarray:
        """The label of one row aligned with the store's input: ``(H, W)`` int64 (255 ignore) or float32 depth.

        Args:
            image_id: the row's image id.
            size: the store's input ``(H, W)``.
            policy: the store's resize policy.
            orig_size: the row's recorded source size; a label of another size is refused.
            uri: the row's source uri (its file stem is one of the names tried).
        """
        raw = self.read(image_id, uri)
        if orig_size is not None and tuple(int(v) for v in orig_size) != raw.shape[:2]:
            raise LabelMismatchError(
                f"label for {image_id!r} is {raw.shape[0]}x{raw.shape[1]} but the image was "
                f"{orig_size[0]}x{orig_size[1]}; wrong label folder or an EXIF-rotated image"
            )
        fill = 0.0 if self.is_depth else IGNORE_INDEX
        return align_label(raw, size, policy, fill=fill)
