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


def test_damage_inside_the_data_is_found_with_verify_decode():
    raw = bytearray(_noise_jpeg(64, 48))
    sos = raw.find(b"\xff\xda")
    raw[sos + 20 : sos + 60] = b"\xff\xc4" * 20  # table markers where entropy-coded data should be
    raw = bytes(raw)
    assert check_image(raw).data == raw  # the cheap header check cannot see it
    with pytest.raises(ImageRejected) as info:
        check_image(raw, verify_decode=True)
    assert info.value.reason == R.CORRUPT_IMAGE


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
