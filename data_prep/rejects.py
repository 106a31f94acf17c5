"""Reject bookkeeping: every input that is dropped or changed is recorded with where and why.

Nothing disappears silently. Each reject names the file, the 1-based line (CSV inputs) or the
image, a machine-readable reason and a human-readable detail. Counts per reason go to the
manifest; so do the individual records, up to a cap per reason so that a systematically broken
input cannot blow up memory (the count stays exact past the cap).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

# Reasons (stable strings: they are manifest keys that users grep for).
MALFORMED_ROW = "malformed_row"
UNKNOWN_MID = "unknown_mid"
BOX_OUTSIDE_IMAGE = "box_outside_image"
DEGENERATE_BOX = "degenerate_box"
BAD_FLAG = "bad_flag"  # IsGroupOf & co. outside {0, 1, -1}
DUPLICATE_BOX = "duplicate_box"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
ZERO_SIZE_IMAGE = "zero_size_image"
TOO_MANY_PIXELS = "too_many_pixels"  # above prep.max_image_pixels: a decompression bomb, or too big to load
BAD_IMAGE_ID = "bad_image_id"
UNREADABLE_PATH = "unreadable_path"  # a link loop, a dangling link, a directory that cannot be listed

# Changes that keep the sample (counted, not rejected).
CONVERTED_MODE = "converted_to_rgb"
EXIF_ROTATED = "exif_orientation_applied"
RESIZED = "resized"


@dataclass(frozen=True)
class Reject:
    reason: str
    file: str
    detail: str
    line: int | None = None
    image_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        who = f" [{self.image_id}]" if self.image_id else ""
        return f"{where}{who}: {self.reason}: {self.detail}"


class RejectLog:
    """Collects rejects; exact counts per reason, records kept up to ``max_records_per_reason``."""

    def __init__(self, max_records_per_reason: int = 10_000) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[Reject] = []
        self._kept: Counter[str] = Counter()
        self.max_records_per_reason = max_records_per_reason

    def add(self, reject: Reject) -> None:
        self.counts[reject.reason] += 1
        if self._kept[reject.reason] < self.max_records_per_reason:
            self._kept[reject.reason] += 1
            self.records.append(reject)

    def extend(self, rejects: list[Reject]) -> None:
        for r in rejects:
            self.add(r)

    def merge(self, other: RejectLog) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
        for r in other.records:
            if self._kept[r.reason] < self.max_records_per_reason:
                self._kept[r.reason] += 1
                self.records.append(r)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {
            "counts": dict(sorted(self.counts.items())),
            "records": [asdict(r) for r in self.records],
            "records_truncated": any(self.counts[k] > self._kept[k] for k in self.counts),
        }
