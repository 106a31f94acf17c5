"""Checking and normalising one image before it goes into a shard.

Cheap by default, so that sharding runs at close to ``tar`` speed: the JPEG header is parsed
(size, mode, EXIF) and the file's structure walked (``data_prep.jpeg_structure``: segments,
scans, the entropy-coded data's markers, the end marker after the last scan), which catches
empty, corrupt and truncated files, an EXIF thumbnail's end marker included, without decoding
the pixels. ``verify_decode`` adds a full decode (``bench/bench_decode_check.py``: it catches
nothing more, at 30 times the cost). Images are re-encoded only when they must change:
non-RGB modes (grayscale, CMYK, palette, alpha) are converted to RGB, an EXIF orientation is
applied to the pixels, an optional resize bounds the short side. Everything else keeps its
original bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from data_prep import rejects as R
from data_prep.jpeg_structure import JpegStructureError, check_jpeg_structure

EXIF_ORIENTATION = 0x0112
JPEG_SOI = b"\xff\xd8"


class ImageRejected(Exception):
    """The image cannot be used; ``reason`` is one of the reject reasons of ``rejects``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class CheckedImage:
    data: bytes | memoryview  # JPEG bytes to store (``raw`` itself when unchanged)
    width: int
    height: int
    orig_width: int
    orig_height: int
    changes: list[str] = field(default_factory=list)


def _target_size(width: int, height: int, short_side: int | None, max_long: int | None) -> tuple[int, int]:
    scale = 1.0
    if short_side is not None and min(width, height) > short_side:
        scale = short_side / min(width, height)
    if max_long is not None and max(width, height) * scale > max_long:
        scale = max_long / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    orientation: int


def read_jpeg_header(raw: bytes) -> JpegHeader | None:
    """Size, components and EXIF orientation from the JPEG markers, without Pillow.

    Walks the marker segments up to the first start-of-frame (tens of microseconds). Returns None
    for anything it does not fully understand; the caller then asks Pillow.
    """
    if raw[:2] != JPEG_SOI:
        return None
    i, n, orientation = 2, len(raw), 1
    while i + 4 <= n:
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        if marker == 0xE1 and raw[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(raw, i + 10, i + 2 + length)
            if orientation is None:
                return None
        elif marker in _SOF_MARKERS:
            if length < 8:
                return None
            return JpegHeader(
                width=int.from_bytes(raw[i + 7 : i + 9], "big"),
                height=int.from_bytes(raw[i + 5 : i + 7], "big"),
                components=raw[i + 9],
                precision=raw[i + 4],
                orientation=orientation,
            )
        i += 2 + length
    return None


def _exif_orientation(raw: bytes, start: int, end: int) -> int | None:
    """The orientation tag (0x0112) of IFD0 in a TIFF block; 1 when absent, None when unreadable."""
    order = raw[start : start + 2]
    if order not in (b"II", b"MM"):
        return None
    endian = "little" if order == b"II" else "big"

    def u(offset: int, size: int) -> int:
        return int.from_bytes(raw[start + offset : start + offset + size], endian)

    ifd = u(4, 4)
    if start + ifd + 2 > end:
        return None
    for k in range(u(ifd, 2)):
        entry = ifd + 2 + 12 * k
        if start + entry + 12 > end:
            return None
        if u(entry, 2) == EXIF_ORIENTATION:
            return u(entry + 8, 2)
    return 1


def _check_structure(raw) -> None:
    """``check_jpeg_structure`` as a reject: truncated, or corrupt."""
    try:
        check_jpeg_structure(raw)
    except JpegStructureError as exc:
        reason = R.TRUNCATED_IMAGE if exc.truncated else R.CORRUPT_IMAGE
        raise ImageRejected(reason, f"JPEG of {len(raw):,} bytes: {exc}") from None


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(R.TOO_MANY_PIXELS, f"the header says {width}x{height} = {width * height / 1e6:,.0f} Mpx, "
                                               f"above prep.max_image_pixels ({max_pixels / 1e6:,.0f} Mpx): a "
                                               f"decompression bomb, or an image the loader cannot hold")


def check_image(
    raw: bytes | memoryview,
    resize_short_side: int | None = None,
    resize_max_long_side: int | None = None,
    jpeg_quality: int = 90,
    verify_decode: bool = False,
    max_pixels: int | None = 100_000_000,
) -> CheckedImage:
    """Validate ``raw`` image bytes (any bytes-like object: bytes, a memoryview of a read buffer)
    and return what to store; raises ``ImageRejected``. When the image can be stored unchanged,
    ``data`` is ``raw`` itself. An image whose header claims more than ``max_pixels`` is rejected
    before anything is decoded."""
    if len(raw) == 0:
        raise ImageRejected(R.ZERO_SIZE_IMAGE, "the file is empty (0 bytes)")
    header = None if verify_decode else read_jpeg_header(raw)
    if header is not None and header.components == 3 and header.precision == 8 and header.orientation == 1:
        # The common case, decided from the markers alone: a baseline/progressive RGB JPEG, upright.
        if header.width == 0 or header.height == 0:
            raise ImageRejected(R.ZERO_SIZE_IMAGE, f"image has size {header.width}x{header.height}")
        _check_pixels(header.width, header.height, max_pixels)
        _check_structure(raw)
        target = _target_size(header.width, header.height, resize_short_side, resize_max_long_side)
        if target == (header.width, header.height):
            return CheckedImage(raw, header.width, header.height, header.width, header.height, [])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit decides, below
            try:
                image = Image.open(io.BytesIO(raw))
                image.size  # noqa: B018 - header parsed by open()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except Exception as exc:  # PIL raises many types for unreadable headers
        raise ImageRejected(
            R.CORRUPT_IMAGE, f"cannot read the image header ({type(exc).__name__}: {exc})"
        ) from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageRejected(R.ZERO_SIZE_IMAGE, f"image has size {width}x{height}")
    _check_pixels(width, height, max_pixels)
    is_jpeg = image.format == "JPEG"
    if is_jpeg:
        _check_structure(raw)

    changes: list[str] = []
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if is_jpeg else 1
    target = _target_size(width, height, resize_short_side, resize_max_long_side)
    must_convert = image.mode != "RGB" or not is_jpeg
    must_rotate = orientation not in (1, None)
    must_resize = target != (width, height) and not must_rotate
    if not (must_convert or must_rotate or must_resize or verify_decode):
        return CheckedImage(raw, width, height, width, height, changes)

    try:
        image.load()
    except Exception as exc:
        reason = R.TRUNCATED_IMAGE if "truncated" in str(exc).lower() else R.CORRUPT_IMAGE
        raise ImageRejected(reason, f"cannot decode the pixels ({type(exc).__name__}: {exc})") from None
    if not (must_convert or must_rotate or must_resize):
        return CheckedImage(raw, width, height, width, height, changes)

    if must_rotate:
        image = ImageOps.exif_transpose(image)
        changes.append(R.EXIF_ROTATED)
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:  # L, I;16, CMYK (Pillow already undoes Adobe's inverted CMYK), P without alpha
            image = image.convert("RGB")
        changes.append(R.CONVERTED_MODE)
    elif not is_jpeg:
        changes.append(R.CONVERTED_MODE)
    orig_w, orig_h = image.size  # after orientation: the frame the annotations refer to
    target = _target_size(orig_w, orig_h, resize_short_side, resize_max_long_side)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        changes.append(R.RESIZED)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return CheckedImage(out.getvalue(), image.size[0], image.size[1], orig_w, orig_h, changes)
