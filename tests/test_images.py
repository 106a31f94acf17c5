"""Image checks: bad images are rejected with a reason, odd ones converted, good ones kept byte for byte."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import rejects as R
from data_prep.images import ImageRejected, check_image
from tests.conftest import jpeg_bytes


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_plain_rgb_jpeg_keeps_its_original_bytes():
    raw = jpeg_bytes(40, 30)
    checked = check_image(raw)
    assert checked.data is raw and (checked.width, checked.height) == (40, 30) and checked.changes == []


def test_empty_file_is_rejected():
    with pytest.raises(ImageRejected) as info:
        check_image(b"")
    assert info.value.reason == R.ZERO_SIZE_IMAGE


def test_garbage_is_rejected_as_corrupt():
    with pytest.raises(ImageRejected) as info:
        check_image(b"this is not an image at all" * 10)
    assert info.value.reason == R.CORRUPT_IMAGE


def _noise_jpeg(width: int = 128, height: int = 96) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("verify", [False, True])
def test_truncated_jpeg_is_rejected(verify):
    raw = _noise_jpeg()
    with pytest.raises(ImageRejected) as info:
        check_image(raw[: len(raw) // 2], verify_decode=verify)
    assert info.value.reason == R.TRUNCATED_IMAGE


def test_a_view_of_a_read_buffer_is_checked_like_bytes():
    raw = _noise_jpeg()
    buffer = bytearray(len(raw) + 1000)  # a reused buffer longer than the file, as the shard writer has
    buffer[: len(raw)] = raw
    view = memoryview(buffer)[: len(raw)]
    checked = check_image(view)
    assert checked.data is view and (checked.width, checked.height) == (128, 96)
    padded = memoryview(raw + b"\0" * 300)  # bytes after the end-of-image marker are allowed
    assert check_image(padded).data is padded
    with pytest.raises(ImageRejected) as info:
        check_image(view[: len(raw) // 2])
    assert info.value.reason == R.TRUNCATED_IMAGE


@pytest.mark.parametrize("verify", [False, True])
def test_damage_inside_the_scan_data_is_found_without_a_decode(verify):
    """Header and end marker intact, markers where entropy-coded data should be: the former
    default (an end marker near the end) passed it; the structure walk does not."""
    raw = bytearray(_noise_jpeg(64, 48))
    sos = raw.find(b"\xff\xda")
    raw[sos + 20 : sos + 60] = b"\xff\xc4" * 20  # table markers where entropy-coded data should be
    with pytest.raises(ImageRejected) as info:
        check_image(bytes(raw), verify_decode=verify)
    assert info.value.reason == R.CORRUPT_IMAGE


def _exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An EXIF APP1 payload by hand: a little-endian TIFF header, IFD0 (Orientation 1) and IFD1
    pointing at a JPEG thumbnail (JPEGInterchangeFormat and its length), which follows IFD1."""
    import struct

    ifd1 = 8 + 2 + 12 + 4
    thumb_at = ifd1 + 2 + 3 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0)
    tiff += struct.pack("<I", ifd1) + struct.pack("<H", 3) + struct.pack("<HHIHH", 0x0103, 3, 1, 6, 0)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, thumb_at) + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))
    tiff += struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff + thumbnail


def test_a_truncated_jpeg_with_an_exif_thumbnail_is_truncated_not_complete():
    """The thumbnail's own end marker lies in the last 64 KiB of the cut file: the former default
    took the file for complete and the loader failed on it; the walk wants an end marker after
    the last scan of the image itself."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    thumb = io.BytesIO()
    Image.fromarray(pixels[::4, ::4]).save(thumb, format="JPEG", quality=75)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, exif=_exif_with_thumbnail(thumb.getvalue()))
    raw = out.getvalue()
    thumb_end = raw.find(thumb.getvalue()) + len(thumb.getvalue())
    assert check_image(raw).data is raw  # the whole file is fine, thumbnail and all
    cut = raw[: thumb_end + 5000]
    assert b"\xff\xd9" in cut[-(1 << 16):]  # what fooled the former check
    with pytest.raises(ImageRejected) as info:
        check_image(cut)
    assert info.value.reason == R.TRUNCATED_IMAGE


def test_random_damage_in_the_scan_is_rejected_and_valid_variants_are_kept():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    variants = {}
    for name, options in {"baseline": {}, "progressive": {"progressive": True}, "optimized": {"optimize": True},
                          "restart markers": {"restart_marker_rows": 1}}.items():
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90, **options)
        variants[name] = out.getvalue()
    for mode in ("L", "CMYK"):
        variants[mode] = jpeg_bytes(50, 40, mode=mode)
    for name, raw in variants.items():
        assert check_image(raw).width in (256, 50), name  # kept (grayscale and CMYK: converted)
    raw = variants["baseline"]
    scan = raw.find(b"\xff\xda") + 20
    caught = 0
    for _ in range(20):  # 2 KiB of random bytes hold a marker-like FF xx pair but for ~e^-8 of the time
        bad = bytearray(raw)
        at = int(rng.integers(scan, len(raw) - 2100))
        bad[at : at + 2048] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
        try:
            check_image(bytes(bad))
        except ImageRejected as exc:
            caught += exc.reason == R.CORRUPT_IMAGE
    assert caught == 20


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_are_converted_to_rgb(mode):
    checked = check_image(jpeg_bytes(20, 10, mode=mode))
    assert checked.changes == [R.CONVERTED_MODE]
    assert _decode(checked.data).mode == "RGB" and (checked.width, checked.height) == (20, 10)


def test_png_with_alpha_is_converted_to_rgb_jpeg():
    out = io.BytesIO()
    Image.new("RGBA", (16, 12), (10, 20, 30, 128)).save(out, format="PNG")
    checked = check_image(out.getvalue())
    decoded = _decode(checked.data)
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and R.CONVERTED_MODE in checked.changes


def test_exif_orientation_is_applied_to_the_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    raw = jpeg_bytes(40, 20, exif=exif.tobytes())
    checked = check_image(raw)
    assert checked.changes == [R.EXIF_ROTATED]
    assert (checked.width, checked.height) == (20, 40) == (checked.orig_width, checked.orig_height)
    decoded = _decode(checked.data)
    assert decoded.size == (20, 40) and decoded.getexif().get(0x0112, 1) == 1


def test_optional_resize_bounds_the_short_side():
    checked = check_image(jpeg_bytes(200, 100), resize_short_side=50)
    assert (checked.width, checked.height) == (100, 50) and checked.changes == [R.RESIZED]
    assert (checked.orig_width, checked.orig_height) == (200, 100)
    small = jpeg_bytes(40, 30)
    assert check_image(small, resize_short_side=50).data is small  # never upscales
    capped = check_image(jpeg_bytes(400, 100), resize_short_side=80, resize_max_long_side=200)
    assert (capped.width, capped.height) == (200, 50)


def _claims(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) claims ``width`` x ``height``: a decompression bomb."""
    data = bytearray(jpeg_bytes(16, 16))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("verify", [False, True])
def test_a_decompression_bomb_is_rejected_from_its_header(verify):
    bomb = _claims(60000, 60000)
    assert len(bomb) < 1000
    with pytest.raises(ImageRejected) as info:
        check_image(bomb, verify_decode=verify)
    assert info.value.reason == R.TOO_MANY_PIXELS and "60000x60000" in str(info.value)
    check_image(_claims(16, 16), verify_decode=verify)  # the same file at its real size passes
    with pytest.raises(ImageRejected, match="above prep.max_image_pixels"):
        check_image(_claims(2000, 2000), verify_decode=verify, max_pixels=1_000_000)
