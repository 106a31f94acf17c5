"""Kaggle submission files of the Open Images detection challenge: writing and validating.

Format: header ``ImageId,PredictionString``; one row per image (empty string when nothing was
detected); each detection is ``LabelName Confidence XMin YMin XMax YMax`` with coordinates
normalized and clipped to [0, 1] (note the x, y, x, y order, unlike the annotation CSVs).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_prep.errors import InputError

HEADER = ["ImageId", "PredictionString"]
QUOTED_LINE_BREAK = "a line break inside a quoted field (a PredictionString is one line)"


def quoted_line_break(text: str) -> int | None:
    """The file line where the first row with a line break inside a quoted field starts, or None.
    One rule for the validator and the scorer (whose fast CSV reader splits rows at every line break)."""
    if '"' not in text:
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    for row in reader:
        if any("\n" in field or "\r" in field for field in row):
            return start
        start = reader.line_num + 1
    return None


def _num(v: float, digits: int) -> str:
    text = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def prediction_string(mids: list[str], scores: np.ndarray, boxes: np.ndarray, max_detections: int | None = None) -> str:
    """Tokens of one image, best score first; ``boxes`` normalized x1, y1, x2, y2 (clipped here)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:max_detections]
    boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    parts = []
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        parts.append(f"{mids[i]} {_num(float(scores[i]), 5)} {_num(x1, 5)} {_num(y1, 5)} {_num(x2, 5)} {_num(y2, 5)}")
    return " ".join(parts)


def write_submission(path: str | Path, rows: Iterable[tuple[str, str]]) -> int:
    """Write ``(ImageId, PredictionString)`` rows atomically; returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    n = 0
    for image_id, text in rows:
        writer.writerow([image_id, text])
        n += 1
    from pipeline.files import write_text_atomic

    write_text_atomic(path, out.getvalue())  # a unique temp name, fsync, rename
    return n


def expected_image_ids(source: str, endpoint_url: str | None = None) -> set[str]:
    """The ImageIDs a submission must list: from a directory or ``s3://`` prefix of images, or from a
    file that lists them (a CSV with an ``ImageID``/``ImageId`` column, e.g. the challenge's image
    list, or one id per line)."""
    from data_prep.prep import list_images
    from data_prep.rejects import RejectLog
    from data_prep.storage import is_s3, open_storage

    local = Path(source)
    if not is_s3(source) and local.is_file():
        lines = local.read_text(encoding="utf-8-sig").splitlines()
        header = next(csv.reader(lines[:1]), [])
        column = next((i for i, name in enumerate(header) if name.strip() in ("ImageID", "ImageId")), None)
        if column is None:
            return {line.strip() for line in lines if line.strip()}
        return {row[column].strip() for row in csv.reader(lines[1:]) if len(row) > column and row[column].strip()}
    found = list_images(open_storage(source if is_s3(source) else str(local.resolve()), endpoint_url), RejectLog())
    if not found:
        raise InputError(f"{source}: no images (.jpg, .jpeg, .png) found and not a list of ImageIDs")
    return set(found)


def check_submission(path: str | Path, known_mids: set[str] | None = None, expected_images: set[str] | None = None,
                     max_errors: int = 20) -> dict:
    """Validate a submission; raises ``InputError`` naming the first bad lines, returns counts if valid."""
    errors: list[str] = []
    seen: set[str] = set()
    detections = 0

    def bad(line: int, text: str) -> None:
        errors.append(f"{path}:{line}: {text}")

    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # a BOM (what Excel writes) is not data
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != HEADER:
            raise InputError(f"{path}:1: header must be {','.join(HEADER)}, got {header}")
        next_line = reader.line_num + 1
        for row in reader:
            line, next_line = next_line, reader.line_num + 1  # the file line the row starts on
            if len(errors) >= max_errors:
                break
            if any("\n" in field or "\r" in field for field in row):
                bad(line, QUOTED_LINE_BREAK)
                continue
            if len(row) != 2:
                bad(line, f"expected 2 fields, got {len(row)}")
                continue
            image_id, text = row[0].strip(), row[1].strip()
            if not image_id:
                bad(line, "empty ImageId")
                continue
            if image_id in seen:
                bad(line, f"duplicate ImageId {image_id}")
            seen.add(image_id)
            tokens = text.split()
            if len(tokens) % 6:
                bad(line, f"{len(tokens)} tokens is not a multiple of 6 (LabelName Confidence XMin YMin XMax YMax)")
                continue
            for k in range(0, len(tokens), 6):
                mid, *values = tokens[k : k + 6]
                if known_mids is not None and mid not in known_mids:
                    bad(line, f"unknown LabelName {mid!r} (detection {k // 6 + 1})")
                    break
                try:
                    score, x1, y1, x2, y2 = (float(v) for v in values)
                except ValueError:
                    bad(line, f"non-numeric value in {' '.join(values)!r} (detection {k // 6 + 1})")
                    break
                if not all(math.isfinite(v) for v in (score, x1, y1, x2, y2)):
                    bad(line, f"non-finite value (detection {k // 6 + 1})")
                    break
                if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
                    bad(line, f"coordinates {x1} {y1} {x2} {y2} outside [0,1] (detection {k // 6 + 1})")
                    break
                if x1 > x2 or y1 > y2:
                    bad(line, f"min > max in {x1} {y1} {x2} {y2} (detection {k // 6 + 1})")
                    break
                detections += 1
    if expected_images is not None and len(errors) < max_errors:
        missing = sorted(expected_images - seen)
        if missing:
            errors.append(f"{path}: {len(missing)} expected images are missing (every test image needs a row, "
                          f"with an empty PredictionString when nothing was detected), e.g. {', '.join(missing[:3])}")
        extra = sorted(seen - expected_images)
        if extra:
            errors.append(f"{path}: {len(extra)} images are not in the expected set, e.g. {', '.join(extra[:3])}")
    if errors:
        more = " (and more)" if len(errors) >= max_errors else ""
        raise InputError(f"{errors[0]}{more}" + ("" if len(errors) == 1 else f"; {len(errors) - 1} more problem(s): "
                                                  + " | ".join(errors[1:4])))
    return {"images": len(seen), "detections": detections}
