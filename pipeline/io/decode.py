"""Decode one image's bytes into fixed-size RGB uint8 pixels, or say why it cannot be.

What :func:`decode_image` does, in order:

1. Refuses empty input, anything Pillow cannot identify, and images over :data:`MAX_PIXELS` (checked from the
   header, before any pixel is decoded, so a decompression bomb costs nothing).
2. Decodes fully (a truncated or corrupt file fails here, never half-decoded: Pillow's
   ``LOAD_TRUNCATED_IMAGES`` stays off).
3. Applies the EXIF orientation.
4. Converts any mode to RGB: 16-bit and 32-bit integer greyscale are scaled to 8 bits (not clipped), CMYK and YCbCr
   go through Pillow's conversion, palette images are expanded, and images with alpha (RGBA, LA, palette with
   transparency) are composited over :data:`BACKGROUND`.
5. Refuses images whose short side is below ``min_side`` (the backbone stride: no feature cell would fit).
6. Resizes by ``policy``: ``"crop"`` (as FeatUp: scale so the image covers ``size``, then centre crop) or ``"pad"``
   (keep the aspect ratio, scale to fit inside ``size``, pad bottom/right with :data:`BACKGROUND`; the valid region
   is ``pixels[:valid_h, :valid_w]``).
"""
from __future__ import annotations

import errno
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ConfigError, DecodeError, StorageAccessError

if TYPE_CHECKING:
    import torch

__all__ = ["BACKGROUND", "MAX_PIXELS", "Decoded", "ResizePolicy", "decode_image", "normalize", "read_and_decode",
           "check_size", "size_hw"]

#: Largest image accepted, in pixels (width * height): 16384 x 16384 = 268 M pixels. Larger files are refused as
#: decompression bombs (an RGB decode would take > 800 MB of worker memory); the largest photos in COCO, ImageNet
#: and OpenImages are far below this. Pillow's own default (89 M, warning only) is not used.
MAX_PIXELS: int = 16384 * 16384
#: Colour under transparent pixels and in the padding of ``policy="pad"``: the ImageNet mean colour (0.485, 0.456,
#: 0.406) * 255, so such pixels normalise to ~0 for ImageNet-normalised backbones instead of a saturated value.
BACKGROUND: tuple[int, int, int] = (124, 116, 104)
#: Resampling filter for resizing (timm's default interpolation for most pretrained models).
RESAMPLE = Image.Resampling.BICUBIC

ResizePolicy = Literal["crop", "pad"]


@dataclass(frozen=True)
class Decoded:
    """One decoded image.

    Attributes:
        pixels: ``(H, W, 3) uint8`` RGB at the requested size.
        orig_size: ``(h, w)`` of the image after EXIF rotation, before resizing.
        valid_size: ``(h, w)`` of the region of ``pixels`` that holds the image (== ``pixels`` size for "crop").
    """

    pixels: np.ndarray
    orig_size: tuple[int, int]
    valid_size: tuple[int, int]


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        scale = 255.0 / 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) <= 65535) else 255.0 / arr.max()
        grey = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        grey = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@dataclass(frozen=True)
class Geometry:
    """How an ``(h, w)`` source became the ``size`` input: resize to ``resized`` ``(rh, rw)``, then take the window
    starting at ``offset`` ``(top, left)`` (crop policy) or paste at (0, 0) and pad (pad policy; ``valid`` is the
    image's region)."""

    size: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    valid: tuple[int, int]


def resize_geometry(orig_size: tuple[int, int], size: tuple[int, int], policy: str) -> Geometry:
    """The geometry :func:`decode_image` applies for ``policy``: the one definition, shared with label alignment.

    Args:
        orig_size: ``(h, w)`` of the source (after EXIF rotation).
        size: the job's input ``(H, W)``.
        policy: "crop" or "pad".
    """
    out_h, out_w = int(size[0]), int(size[1])
    h, w = int(orig_size[0]), int(orig_size[1])
    if policy == "crop":
        scale = max(out_h / h, out_w / w)
        rw, rh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
        return Geometry((out_h, out_w), (rh, rw), ((rh - out_h) // 2, (rw - out_w) // 2), (out_h, out_w))
    if policy == "pad":
        scale = min(out_h / h, out_w / w)
        rw, rh = min(out_w, max(1, round(w * scale))), min(out_h, max(1, round(h * scale)))
        return Geometry((out_h, out_w), (rh, rw), (0, 0), (rh, rw))
    raise ConfigError(f"unknown resize policy {policy!r}; the store should record 'crop' or 'pad'")


def _resize(img: Image.Image, size: tuple[int, int], policy: str) -> tuple[np.ndarray, tuple[int, int]]:
    w, h = img.size
    g = resize_geometry((h, w), size, policy)
    (rh, rw), (top, left) = g.resized, g.offset
    img = img.resize((rw, rh), RESAMPLE)
    if policy == "crop":
        img = img.crop((left, top, left + g.size[1], top + g.size[0]))
        return np.asarray(img, dtype=np.uint8), g.valid
    canvas = Image.new("RGB", (g.size[1], g.size[0]), BACKGROUND)
    canvas.paste(img, (0, 0))
    return np.asarray(canvas, dtype=np.uint8), g.valid


def check_size(value: int | Sequence[int], flag: str) -> int | tuple[int, int]:
    """A size setting as one int (square) or an ``(H, W)`` pair of ints >= 1 (a flag's one- or two-value list).

    Raises:
        ConfigError: not one or two ints, or a side < 1 (the message names ``flag``).
    """
    sides = [value] if isinstance(value, int) else list(value)
    if len(sides) not in (1, 2) or not all(isinstance(v, int) for v in sides):
        raise ConfigError(f"{flag} takes one side (square) or two (H W), got {value!r}")
    if min(sides) < 1:
        raise ConfigError(f"{flag} must be >= 1, got {' '.join(map(str, sides))}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of a size given as one side (square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode_image(
    data: bytes,
    *,
    size: tuple[int, int],
    policy: ResizePolicy = "crop",
    min_side: int = 1,
    max_pixels: int = MAX_PIXELS,
) -> Decoded:
    """Decode encoded image bytes to ``(H, W, 3) uint8`` RGB at ``size``.

    Args:
        data: the encoded file (JPEG, PNG, WebP, TIFF, ...).
        size: output ``(H, W)``.
        policy: ``"crop"`` (cover then centre crop) or ``"pad"`` (fit, pad bottom/right, record ``valid_size``).
        min_side: smallest accepted short side of the original image (use the backbone stride).
        max_pixels: largest accepted ``width * height`` (decompression-bomb limit).

    Returns:
        A :class:`Decoded`.

    Raises:
        DecodeError: the bytes are not a usable image; ``.reason`` is a short phrase for the store's error column.
        ConfigError: ``policy`` is unknown.
    """
    if policy not in ("crop", "pad"):
        raise ConfigError(f"unknown resize policy {policy!r}; choose 'crop' or 'pad'")
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with _bomb_limit(max_pixels):
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large ({e}; decompression-bomb guard, limit {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not an image (unrecognised format, {len(data)} bytes)") from None
    except Exception as e:
        raise DecodeError(f"unreadable image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels} (decompression-bomb guard)")
    try:
        with _bomb_limit(max_pixels):
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large ({e}; decompression-bomb guard)") from None
    except Exception as e:
        raise DecodeError(f"corrupt or truncated {img.format or 'image'} ({type(e).__name__}: {e})") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise DecodeError(f"image too small: {w}x{h}, short side below {min_side} px (the backbone stride)")
    pixels, valid = _resize(img, size, policy)
    return Decoded(pixels=pixels, orig_size=(h, w), valid_size=valid)


class _bomb_limit:
    """Raise Pillow's own decompression-bomb threshold to ours for the duration of one decode."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __enter__(self) -> None:
        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = self.max_pixels

    def __exit__(self, *exc: object) -> None:
        Image.MAX_IMAGE_PIXELS = self.saved


def normalize(
    pixels: "np.ndarray | torch.Tensor", mean: tuple[float, float, float], std: tuple[float, float, float]
) -> "torch.Tensor":
    """uint8 pixels to the backbone's normalised input.

    Args:
        pixels: ``(B, H, W, 3) uint8`` (numpy or torch).
        mean: per-channel mean in [0, 1] (the backbone's ``.mean``).
        std: per-channel std in [0, 1] (the backbone's ``.std``).

    Returns:
        ``(B, 3, H, W) float32`` torch tensor, ``(pixels / 255 - mean) / std``.
    """
    import torch

    # Arrays from Ray's object store are read-only; torch warns on those, so copy them (uint8: cheap beside the
    # float conversion that follows).
    x = torch.as_tensor(np.require(pixels, requirements="CW") if isinstance(pixels, np.ndarray) else pixels)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


#: errno values of a storage service that is busy or unreachable (s3fs reports ``503 SlowDown`` as EBUSY)
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _transient(exc: BaseException) -> bool:
    """A read error that is the storage's, not the image's: throttling, resets, timeouts, an unreachable endpoint
    (a missing, forbidden or cut-short file is the image's: a failed row)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3")


def read_and_decode(
    uris: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    **decode_kwargs: Any,
) -> Iterator[tuple[int, Decoded | None, str]]:
    """Read and decode images, one ``(index, decoded or None, reason)`` per uri in order: the one loop behind every
    stage that turns uris into pixels. An image that does not exist, may not be read, or does not decode gives
    ``None`` and a one-line reason (a failed row).

    Raises:
        StorageAccessError: a read failed for a reason that is not the image's (throttling, a reset connection,
            a timeout) after the storage client's own retries: the unit fails and stays pending for a rerun
            instead of recording a failed row that no rerun would retry.

    Args:
        uris: local paths or URIs (read concurrently by :func:`pipeline.io.sources.read_many`).
        storage_options: fsspec options.
        decode_kwargs: :func:`decode_image`'s keyword arguments (``size``, ``policy``, ``min_side``, ...).
    """
    from pipeline.io.sources import read_many

    uris = list(uris)
    for i, data in enumerate(read_many(uris, storage_options, return_exceptions=True)):
        if isinstance(data, BaseException):
            text = f"{type(data).__name__}: {' '.join(str(data).split())[:200]}"
            if _transient(data):  # throttled, reset, timed out: not the image's fault
                raise StorageAccessError(
                    f"reading {uris[i]!r} failed after the storage client's retries ({text}); rerun the job to "
                    "resume (this unit stays pending), or raise the retries in --storage-options"
                ) from data
            yield i, None, f"read failed ({text})"
            continue
        try:
            yield i, decode_image(data, **decode_kwargs), ""
        except DecodeError as e:
            yield i, None, e.reason
