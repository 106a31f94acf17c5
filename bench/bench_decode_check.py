"""Benchmark: what a full check of the entropy-coded data of each JPEG costs at sharding time, and
which damaged images each check catches.

Prep's check used to parse the JPEG markers and look for an end-of-image marker (EOI, FF D9) in
the last ``EOI_SEARCH_WINDOW`` bytes (``former_default`` here); two kinds of damage passed it:
corrupted scan data with header and EOI intact, and a truncated JPEG whose EXIF thumbnail (a
JPEG inside APP1, with its own EOI) lies within the tail window. This benchmark chose its
replacement, the structure walk of ``data_prep.jpeg_structure`` (``check_image``'s default now);
``verify_decode=True`` adds a full Pillow decode.

Generates N photo-like JPEGs in memory (1024x768, 1024x683, 768x1024; quality 90; gradients,
shapes and noise, ~300 KB like OpenImages; every third with an EXIF APP1 whose IFD1 carries a
160x120 JPEG thumbnail, every fourth with restart markers), then, on one core and in one run:
  - times each check over the clean images (ms/image, images/s; rounds in rotated order):
    the former default, ``check_image(raw)``, ``check_image(raw, verify_decode=True)``, the former default
    with its tail EOI required to lie after the first scan header, Pillow's ``Image.verify()``, Pillow's
    full decode with ``LOAD_TRUNCATED_IMAGES`` on, Pillow with ``draft()`` at 1/8 scale (libjpeg
    decodes every Huffman-coded block but skips most of the IDCT; in 'RGB' and in 'L', which skips
    the chroma IDCT too), ``torchvision.io.decode_jpeg`` at full size (the training loader's decoder), the same with the
    warnings libjpeg writes to stderr (fd 2) counted as a rejection, a structural walk of every
    marker segment and of the entropy-coded data (restart markers in sequence, EOI after the last
    scan; no decoding), and that walk followed by the 'L' draft decode;
  - for each kind of damage, ``--trials`` damaged copies (each with its own random image, position
    and seed) and the share that each check rejects: 2 KiB of the scan overwritten with random
    bytes, or with zeros (length and EOI kept); a file with an EXIF thumbnail cut at ~30 %, ~60 %,
    at a uniform point, and at a point that leaves the thumbnail's EOI inside the tail window;
    plain truncation; clean copies as the control (false rejections). For Pillow and torchvision
    it also records which signal fired: an exception, a Python warning, text on fd 2, and counts
    the "loader fails missed": trials where ``decode_jpeg`` (so the training loader) raises but the
    check passes;
  - the cost at OpenImages scale: 1,743,042 train images x ms/image in core-hours, and in minutes
    on one node of 32 or 96 cores, next to reading the 513 GB at 1 GB/s per node.
Prints Markdown tables; writes bench/out/decode_check.json.

    python bench/bench_decode_check.py [--images 96] [--rounds 5] [--trials 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFile, ImageFilter

from data_prep.images import check_image, read_jpeg_header
from data_prep.jpeg_structure import EOI_SEARCH_WINDOW, check_jpeg_structure

REPO = Path(__file__).resolve().parents[1]
OID_TRAIN_IMAGES = 1_743_042
OID_TRAIN_BYTES = 513e9
NODE_READ_BYTES_PER_S = 1e9
NODE_CORES = (32, 96)
SIZES = ((1024, 768), (1024, 683), (768, 1024))
TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


# --- images -------------------------------------------------------------------------------------

def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradients, a few dozen filled shapes, fine and coarse noise, a slight blur:
    compresses like a photo (~300 KB at 1024x768, quality 90), unlike flat colour or pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(-1, 1, 3)
        pixels[..., c] = 128 + 60 * np.sin(6 * fx * x / width + 6 * fy * y / height + 3 * phase)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(40):
        cx, cy, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, 200))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.rectangle((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=colour)
    coarse = rng.normal(128, 40, (height // 2, width // 2, 3)).clip(0, 255).astype(np.uint8)
    coarse = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    pixels = np.asarray(canvas, np.float32) + 0.8 * (coarse - 128) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """The payload of an EXIF APP1 segment, written by hand: 'Exif\\0\\0', a little-endian TIFF
    header, IFD0 (Orientation = 1) and IFD1 (Compression = 6, JPEGInterchangeFormat and
    JPEGInterchangeFormatLength pointing at ``thumbnail``, which follows IFD1)."""
    ifd0_offset = 8
    ifd1_offset = ifd0_offset + 2 + 12 * 1 + 4
    thumbnail_offset = ifd1_offset + 2 + 12 * 3 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0_offset)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0) + struct.pack("<I", ifd1_offset)
    tiff += struct.pack("<H", 3)
    tiff += struct.pack("<HHIHH", 0x0103, 3, 1, 6, 0)  # Compression: JPEG (old-style thumbnail)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, thumbnail_offset)  # JPEGInterchangeFormat
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))  # JPEGInterchangeFormatLength
    tiff += struct.pack("<I", 0)  # no further IFD
    assert len(tiff) == thumbnail_offset
    return b"Exif\x00\x00" + tiff + thumbnail


class Sample:
    """One clean JPEG and where its parts are: ``scan`` is the offset of the first entropy-coded
    byte, ``eoi`` that of the final EOI, ``thumb_end`` the offset just past the thumbnail's EOI."""

    def __init__(self, raw: bytes, thumb_end: int | None, restart: bool) -> None:
        self.raw = raw
        self.thumb_end = thumb_end
        self.restart = restart
        sos = raw.find(b"\xff\xda", 2 if thumb_end is None else thumb_end)
        self.scan = sos + 2 + int.from_bytes(raw[sos + 2 : sos + 4], "big")
        self.eoi = raw.rfind(b"\xff\xd9")
        assert self.eoi == len(raw) - 2


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        width, height = SIZES[k % len(SIZES)]
        image = photo(width, height, rng)
        options: dict = {"quality": 90}
        thumbnail = None
        if k % 3 == 0:
            out = io.BytesIO()
            image.resize((160, 120) if width > height else (120, 160), Image.Resampling.BILINEAR).save(
                out, "JPEG", quality=75)
            thumbnail = out.getvalue()
            options["exif"] = exif_with_thumbnail(thumbnail)
        if k % 4 == 1:
            options["restart_marker_rows"] = 1  # a DRI of one MCU row, as many cameras write
        out = io.BytesIO()
        image.save(out, "JPEG", **options)
        raw = out.getvalue()
        thumb_end = None
        if thumbnail is not None:
            thumb_end = raw.find(thumbnail) + len(thumbnail)
            assert raw[thumb_end - 2 : thumb_end] == b"\xff\xd9"
        samples.append(Sample(raw, thumb_end, k % 4 == 1))
    first = next(s for s in samples if s.thumb_end is not None)  # Pillow reads the hand-made EXIF
    ifd1 = Image.open(io.BytesIO(first.raw)).getexif().get_ifd(ExifTags.IFD.IFD1)
    assert ifd1.get(0x0202) == first.thumb_end - (first.raw.find(b"Exif\x00\x00") + 6 + ifd1[0x0201])
    assert all(s.raw.find(b"\xff\xdd") > 0 for s in samples if s.restart)
    return samples


# --- damage -------------------------------------------------------------------------------------

def corrupt(s: Sample, rng: np.random.Generator, size: int, fill: str) -> bytes:
    """``size`` bytes at a uniform position inside the entropy-coded data overwritten; length, headers
    and EOI kept."""
    start = s.scan + int(rng.integers(0, s.eoi - s.scan - size))
    bad = bytearray(s.raw)
    bad[start : start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes() if fill == "random" else bytes(size)
    return bytes(bad)


def truncate_at(s: Sample, rng: np.random.Generator, fraction: float) -> bytes:
    """Cut at ``fraction`` of the file, +-2 % so that repeated trials on one image differ."""
    return s.raw[: max(s.scan + 1, int(len(s.raw) * (fraction + rng.uniform(-0.02, 0.02))))]


def truncate_uniform(s: Sample, rng: np.random.Generator) -> bytes:
    return s.raw[: int(rng.integers(s.scan + 1, s.eoi))]


def truncate_in_window(s: Sample, rng: np.random.Generator) -> bytes:
    """Cut so that the thumbnail's EOI lies inside the last EOI_SEARCH_WINDOW bytes."""
    assert s.thumb_end is not None
    low, high = max(s.scan + 1, s.thumb_end + 1024), min(s.eoi, s.thumb_end + EOI_SEARCH_WINDOW)
    return s.raw[: int(rng.integers(low, high))]


def thumb_eoi_in_window(s: Sample, damaged: bytes) -> bool:
    return s.thumb_end is not None and len(damaged) - EOI_SEARCH_WINDOW <= s.thumb_end - 2


# name -> (which samples, damage); the damage draws its position and bytes from its own generator
CASES: dict[str, tuple[Callable[[Sample], bool], Callable[[Sample, np.random.Generator, int], bytes]]] = {
    "clean": (lambda s: True, lambda s, rng, k: s.raw),
    "corrupt_random": (lambda s: True, lambda s, rng, k: corrupt(s, rng, k, "random")),
    "corrupt_zeros": (lambda s: True, lambda s, rng, k: corrupt(s, rng, k, "zeros")),
    "trunc_thumb_30pct": (lambda s: s.thumb_end is not None, lambda s, rng, k: truncate_at(s, rng, 0.3)),
    "trunc_thumb_60pct": (lambda s: s.thumb_end is not None, lambda s, rng, k: truncate_at(s, rng, 0.6)),
    "trunc_thumb_uniform": (lambda s: s.thumb_end is not None, lambda s, rng, k: truncate_uniform(s, rng)),
    "trunc_thumb_in_window": (lambda s: s.thumb_end is not None, lambda s, rng, k: truncate_in_window(s, rng)),
    "trunc_plain_uniform": (lambda s: s.thumb_end is None, lambda s, rng, k: truncate_uniform(s, rng)),
}


# --- checks -------------------------------------------------------------------------------------

def walk_markers(raw) -> None:
    """The structure walk prep runs on every JPEG (``data_prep.jpeg_structure``)."""
    check_jpeg_structure(raw)


def former_default(raw) -> None:
    """Prep's check before the walk: the header's markers (``check_image``'s fast path) and an
    end-of-image marker somewhere in the last ``EOI_SEARCH_WINDOW`` bytes."""
    if read_jpeg_header(raw) is None:
        raise ValueError("no readable JPEG header")
    if bytes(raw[max(0, len(raw) - EOI_SEARCH_WINDOW) :]).rfind(b"\xff\xd9") < 0:
        raise ValueError("no end-of-image marker in the tail window")


def tail_eoi_after_scan(raw) -> None:
    """The default's tail check, moved past the headers: an EOI in the last EOI_SEARCH_WINDOW bytes
    that lies after the start of the first scan (an EXIF thumbnail's EOI lies before it)."""
    i, n = 2, len(raw)
    while i + 4 <= n and raw[i] == 0xFF:
        if raw[i + 1] == 0xDA:
            break
        i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    else:
        raise ValueError("no scan")
    former_default(raw)
    if bytes(raw[max(i, n - EOI_SEARCH_WINDOW) :]).rfind(b"\xff\xd9") < 0:
        raise ValueError(f"no end-of-image marker after the first scan (offset {i})")


def _pil_draft(mode: str) -> Callable[[bytes], None]:
    def check(raw) -> None:
        with Image.open(io.BytesIO(raw)) as image:
            image.draft(mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    return check


def pil_verify(raw) -> None:
    with Image.open(io.BytesIO(raw)) as image:
        image.verify()


def pil_load_truncated_ok(raw) -> None:
    """Pillow's full decode with ``ImageFile.LOAD_TRUNCATED_IMAGES`` on (the usual escape hatch for
    damaged files; shows that the flag hides damage rather than reporting it)."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


class Fd2:
    """Captures what C code writes to file descriptor 2 (libjpeg's default ``output_message``) while
    active; ``text`` afterwards. Process-wide: not for a prep worker with other threads."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.text = b""

    def __enter__(self) -> Fd2:
        sys.stderr.flush()
        fd = self.file.fileno()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # fd 2 will share this offset
        self.saved = os.dup(2)
        os.dup2(fd, 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.text = os.pread(self.file.fileno(), 4096, 0)


def make_checks() -> dict[str, tuple[str, Callable[[bytes], None]]]:
    import torch

    fd2 = Fd2()  # its own: detect() captures fd 2 around every check as well

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.io import ImageReadMode, decode_jpeg

    def tv_decode(raw) -> None:
        decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def tv_decode_strict(raw) -> None:
        with fd2:
            tv_decode(raw)
        if fd2.text:
            raise ValueError(f"libjpeg warned: {fd2.text.decode(errors='replace').strip()}")

    draft_l = _pil_draft("L")

    def walk_then_draft_l(raw) -> None:
        walk_markers(raw)
        draft_l(raw)

    return {
        "former_default": ("markers + EOI in the tail window (prep's check before the walk)", former_default),
        "default": ("check_image(raw): prep's default, the structure walk", check_image),
        "verify_decode": ("check_image(raw, verify_decode=True): full Pillow decode",
                          lambda raw: check_image(raw, verify_decode=True)),
        "tail_eoi_after_scan": ("the former default + the tail EOI must lie after the first SOS", tail_eoi_after_scan),
        "pil_verify": ("Image.open() + Image.verify()", pil_verify),
        "pil_load_truncated_ok": ("Pillow load() with LOAD_TRUNCATED_IMAGES=True", pil_load_truncated_ok),
        "pil_draft_rgb_1_8": ("Pillow draft('RGB', 1/8) + load()", _pil_draft("RGB")),
        "pil_draft_l_1_8": ("Pillow draft('L', 1/8) + load()", draft_l),
        "tv_decode": ("torchvision decode_jpeg, full size RGB (the loader's decoder)", tv_decode),
        "tv_decode_strict": ("decode_jpeg + reject on libjpeg warnings on fd 2", tv_decode_strict),
        "marker_walk": ("walk every segment and the scan data (stray markers, RST order, scans vs frame, "
                        "EOI after the last scan); no decode", walk_markers),
        "marker_walk+draft_l": ("marker_walk, then draft('L', 1/8) + load()", walk_then_draft_l),
    }


# --- measurement --------------------------------------------------------------------------------

def time_checks(checks: dict, raws: list[bytes], rounds: int) -> dict[str, dict]:
    for _, fn in checks.values():  # warm up: imports, first-call costs
        for raw in raws[:4]:
            fn(raw)
    wall: dict[str, list[float]] = {name: [] for name in checks}
    cpu: dict[str, list[float]] = {name: [] for name in checks}
    names = list(checks)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = checks[name][1]
            t0, c0 = time.perf_counter(), time.thread_time()
            for raw in raws:
                fn(raw)
            wall[name].append((time.perf_counter() - t0) / len(raws) * 1e3)
            cpu[name].append((time.thread_time() - c0) / len(raws) * 1e3)
    # ms: the mean per image of the best round (other processes on a small machine inflate the rest)
    return {name: {"ms": min(wall[name]), "ms_median_round": statistics.median(wall[name]),
                   "ms_mean_all_rounds": statistics.fmean(wall[name]),
                   "cpu_ms_median_round": statistics.median(cpu[name]), "images_per_s": 1e3 / min(wall[name])}
            for name in checks}


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\b[0-9A-F]{2}\b|\b\d+\b")  # offsets, counts, marker codes


def detect(checks: dict, samples: list[Sample], trials: int, corrupt_bytes: int, seed: int, fd2: Fd2) -> dict:
    results: dict = {}
    for case, (eligible, damage) in CASES.items():
        pool = [s for s in samples if eligible(s)]
        rows = {name: {"raised": [], "python_warning": [], "fd2_text": [], "messages": Counter()} for name in checks}
        sizes, in_window = [], []
        for t in range(trials):
            s = pool[t % len(pool)]
            damaged = damage(s, np.random.default_rng([seed, t, len(results)]), corrupt_bytes)
            sizes.append(len(damaged) / len(s.raw))
            in_window.append(thumb_eoi_in_window(s, damaged))
            for name, (_, fn) in checks.items():
                raised = None
                with warnings.catch_warnings(record=True) as caught, fd2:
                    warnings.simplefilter("always")
                    try:
                        fn(damaged)
                    except Exception as exc:  # any rejection counts
                        text = re.sub(r"^decode_jpeg, \S+:\d+, ", "", str(exc))  # torchvision's source location
                        raised = f"{type(exc).__name__}: {_NUMBERS.sub('N', text)[:100]}"
                caught = [w for w in caught if not str(w.message).startswith(TORCHVISION_DEPRECATION)]
                row = rows[name]
                row["raised"].append(raised is not None)
                row["python_warning"].append(bool(caught))
                row["fd2_text"].append(bool(fd2.text))
                if raised:
                    row["messages"][raised] += 1
                elif fd2.text:
                    text = fd2.text.decode(errors="replace").strip()
                    row["messages"]["(passed) fd 2: " + _NUMBERS.sub("N", text)[:100]] += 1
        loader_fails = rows["tv_decode"]["raised"]
        results[case] = {
            "trials": trials, "mean_kept_fraction": round(statistics.fmean(sizes), 3),
            "thumb_eoi_in_tail_window": round(statistics.fmean(in_window), 3),
            "loader_would_fail": round(statistics.fmean(loader_fails), 3),
            "checks": {
                name: {
                    "detected": round(statistics.fmean(row["raised"]), 4),
                    "python_warning": round(statistics.fmean(row["python_warning"]), 4),
                    "fd2_text": round(statistics.fmean(row["fd2_text"]), 4),
                    "misses_loader_failures": sum(f and not d for f, d in zip(loader_fails, row["raised"], strict=True)),
                    "messages": dict(row["messages"].most_common(8)),
                }
                for name, row in rows.items()
            },
        }
    return results


def scale(timing: dict) -> dict:
    read_min = OID_TRAIN_BYTES / NODE_READ_BYTES_PER_S / 60
    out = {"read_513GB_at_1GBps_min": round(read_min, 1)}
    for name, t in timing.items():
        core_h = OID_TRAIN_IMAGES * t["ms"] / 3.6e6
        out[name] = {"core_hours": round(core_h, 2),
                     **{f"node_{c}_cores_min": round(core_h * 60 / c, 1) for c in NODE_CORES}}
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="distinct generated JPEGs (timing set and damage pool)")
    parser.add_argument("--rounds", type=int, default=5, help="timing passes over all images, per check")
    parser.add_argument("--trials", type=int, default=400, help="damaged copies per kind of damage")
    parser.add_argument("--corrupt-bytes", type=int, default=2048, help="bytes of scan data overwritten")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    fd2 = Fd2()
    checks = make_checks()

    t0 = time.perf_counter()
    samples = make_samples(args.images, args.seed)
    gen_s = time.perf_counter() - t0
    raws = [s.raw for s in samples]
    kb = [len(r) / 1e3 for r in raws]
    print(f"{len(raws)} JPEGs in {gen_s:.1f} s: mean {statistics.fmean(kb):.0f} KB (min {min(kb):.0f}, "
          f"max {max(kb):.0f}); {sum(s.thumb_end is not None for s in samples)} with an EXIF thumbnail "
          f"(its EOI at ~{statistics.fmean(s.thumb_end for s in samples if s.thumb_end):.0f} B), "
          f"{sum(s.restart for s in samples)} with restart markers; OID's mean is "
          f"{OID_TRAIN_BYTES / OID_TRAIN_IMAGES / 1e3:.0f} KB\n", flush=True)

    t0 = time.perf_counter()
    timing = time_checks(checks, raws, args.rounds)
    time_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    detection = detect(checks, samples, args.trials, args.corrupt_bytes, args.seed, fd2)
    detect_s = time.perf_counter() - t0
    at_scale = scale(timing)

    base = timing["default"]["ms"]
    print(f"## Cost per image, one core ({len(raws)} clean images x {args.rounds} rounds; ms/image: mean over "
          f"the images of the best round, wall clock; CPU: thread time, median round)\n")
    print("| check | what | ms/image | ms/image (median round) | CPU ms/image | images/s | x default |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (what, _) in checks.items():
        t = timing[name]
        print(f"| {name} | {what} | {t['ms']:.3f} | {t['ms_median_round']:.3f} | {t['cpu_ms_median_round']:.3f} "
              f"| {t['images_per_s']:,.0f} | {t['ms'] / base:,.0f} |")

    print(f"\n## Detection rate ({args.trials} damaged copies per column, each with its own image, "
          f"position and seed; corruption: {args.corrupt_bytes} bytes of scan data; \"loader fails missed\": "
          f"decode_jpeg raised, the check passed)\n")
    cases = list(CASES)
    print("| check | " + " | ".join(cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for name in checks:
        cells = []
        for case in cases:
            c = detection[case]["checks"][name]
            cell = pct(c["detected"])
            if c["misses_loader_failures"]:
                cell += f" ({c['misses_loader_failures']} loader fails missed)"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| *loader would fail (decode_jpeg raises)* | "
          + " | ".join(pct(detection[c]["loader_would_fail"]) for c in cases) + " |")
    print("| *thumbnail EOI inside the tail window* | "
          + " | ".join(pct(detection[c]["thumb_eoi_in_tail_window"]) if c.startswith("trunc_thumb") else "-"
                       for c in cases) + " |")
    print("| *mean kept fraction of the file* | "
          + " | ".join(f"{detection[c]['mean_kept_fraction']:.2f}" for c in cases) + " |")
    print("\nOther signals (share of trials): Python warnings / text on fd 2 (libjpeg's messages)\n")
    print("| check | " + " | ".join(cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for name in checks:
        print(f"| {name} | " + " | ".join(
            f"{pct(detection[c]['checks'][name]['python_warning'])} / {pct(detection[c]['checks'][name]['fd2_text'])}"
            for c in cases) + " |")

    print(f"\n## At OpenImages scale: {OID_TRAIN_IMAGES:,} train images ({OID_TRAIN_BYTES / 1e9:.0f} GB); "
          f"reading them at 1 GB/s per node takes {at_scale['read_513GB_at_1GBps_min']} min\n")
    print("| check | core-hours | min on a 32-core node | min on a 96-core node | node time vs reading at 1 GB/s |")
    print("|---|---:|---:|---:|---|")
    read_min = at_scale["read_513GB_at_1GBps_min"]
    for name in checks:
        a = at_scale[name]
        print(f"| {name} | {a['core_hours']:.2f} | {a['node_32_cores_min']:.1f} | {a['node_96_cores_min']:.1f} "
              f"| {a['node_32_cores_min'] / read_min:.2f}x / {a['node_96_cores_min'] / read_min:.2f}x |")
    print(f"\n(generation {gen_s:.0f} s, timing {time_s:.0f} s, detection {detect_s:.0f} s)")

    result = {
        "machine": f"{platform.machine()}, 1 thread, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"Pillow {Image.__version__}, torch {torch.__version__}",
        "command": " ".join(["python", *sys.argv]),
        "args": vars(args),
        "images": {"count": len(raws), "mean_kb": round(statistics.fmean(kb), 1), "min_kb": round(min(kb), 1),
                   "max_kb": round(max(kb), 1), "with_exif_thumbnail": sum(s.thumb_end is not None for s in samples),
                   "with_restart_markers": sum(s.restart for s in samples), "sizes": [list(s) for s in SIZES]},
        "checks": {name: what for name, (what, _) in checks.items()},
        "timing_ms": {name: {k: round(v, 4) for k, v in t.items()} for name, t in timing.items()},
        "detection": detection,
        "oid_scale": at_scale,
        "seconds": {"generation": round(gen_s, 1), "timing": round(time_s, 1), "detection": round(detect_s, 1)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
