"""decode_image: every mode to RGB, EXIF orientation, resize policies, and each bad-input kind -> DecodeError."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.io.decode import BACKGROUND, MAX_PIXELS, decode_image, normalize
from pipeline.errors import DecodeError, PipelineError

SIZE = (32, 32)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height with almost no pixel data (a decompression-bomb stand-in)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A real PNG whose compressed pixel data is overwritten with garbage (header intact)."""
    data = bytearray(encode(Image.fromarray(gradient()), "PNG", compress_level=0))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 600] = bytes((i * 37) % 251 for i in range(590))
    return bytes(data)


@pytest.fixture(scope="module")
def photo(samples_dir) -> bytes:
    return (samples_dir / "plant.jpg").read_bytes()


def gradient(w: int = 48, h: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda photo: b"", "empty"),
        (lambda photo: b"just some text, not an image\n" * 4, "not an image"),
        (lambda photo: corrupt_png(), "corrupt"),
        (lambda photo: photo[: len(photo) // 2], "truncated"),
        (lambda photo: encode(Image.new("RGB", (4, 4)), "PNG"), "too small"),
        (lambda photo: png_header_only(100_000, 100_000), "too large"),
    ],
    ids=["empty", "text", "corrupt", "truncated-jpeg", "tiny-4x4", "huge"],
)
def test_bad_inputs_raise_decode_error_with_reason(photo, make, reason):
    with pytest.raises(DecodeError) as e:
        decode_image(make(photo), size=SIZE, min_side=16)
    assert reason in e.value.reason
    assert isinstance(e.value, PipelineError) and isinstance(e.value, ValueError)


def test_huge_limit_is_checked_from_the_header_before_decoding():
    w, h = 20_000, 14_000  # 280 M pixels > MAX_PIXELS; only the 33-byte header exists
    assert w * h > MAX_PIXELS
    with pytest.raises(DecodeError, match="decompression-bomb"):
        decode_image(png_header_only(w, h), size=SIZE)


def test_rgb_crop_keeps_content_and_sizes():
    arr = gradient(64, 32)
    d = decode_image(encode(Image.fromarray(arr), "PNG"), size=SIZE, policy="crop")
    assert d.pixels.shape == (32, 32, 3) and d.pixels.dtype == np.uint8
    assert d.orig_size == (32, 64) and d.valid_size == (32, 32)
    # centre crop of an unscaled image: columns 16..48 of the original
    np.testing.assert_allclose(d.pixels.astype(int), arr[:, 16:48].astype(int), atol=3)


def test_pad_policy_keeps_aspect_and_records_valid_size():
    arr = gradient(64, 32)
    d = decode_image(encode(Image.fromarray(arr), "PNG"), size=SIZE, policy="pad")
    assert d.valid_size == (16, 32)
    assert (d.pixels[16:] == np.array(BACKGROUND, dtype=np.uint8)).all()
    assert d.pixels[:16].std() > 10


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "YCbCr"])
def test_modes_convert_to_rgb(mode):
    rgb = Image.fromarray(gradient())
    img = rgb.convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    d = decode_image(encode(img, fmt), size=(40, 48), policy="crop")
    expect = np.asarray(img.convert("RGB"))
    assert d.pixels.shape == (40, 48, 3)
    tol = 12 if fmt == "JPEG" else 1
    assert np.abs(d.pixels.astype(int) - expect.astype(int)).mean() < tol


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 65535 // (40 * 48 - 1)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    data = encode(img, "PNG")
    d = decode_image(data, size=(40, 48))
    expect = np.rint(arr / 65535 * 255).astype(int)
    assert np.abs(d.pixels[..., 0].astype(int) - expect).max() <= 1
    assert (d.pixels[..., 0] == d.pixels[..., 2]).all()
    assert d.pixels.max() == 255 and d.pixels.min() == 0


def test_rgba_composited_over_documented_background():
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[..., 0] = 255
    arr[:, :16, 3] = 255  # left half opaque red, right half fully transparent
    d = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), size=SIZE)
    assert tuple(d.pixels[5, 3]) == (255, 0, 0)
    assert tuple(d.pixels[5, 28]) == BACKGROUND


def test_exif_orientation_applied():
    arr = gradient(48, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    d = decode_image(encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95), size=(48, 24), policy="pad")
    assert d.orig_size == (48, 24)  # (h, w) after rotation
    plain = decode_image(encode(Image.fromarray(arr), "JPEG", quality=95), size=(48, 24), policy="pad")
    assert plain.orig_size == (24, 48)


def test_normalize_shape_and_values():
    px = np.full((2, 4, 5, 3), 255, dtype=np.uint8)
    x = normalize(px, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert tuple(x.shape) == (2, 3, 4, 5)
    assert x[0, 0, 0, 0].item() == pytest.approx(2.0) and x[0, 2, 0, 0].item() == pytest.approx(0.5)
