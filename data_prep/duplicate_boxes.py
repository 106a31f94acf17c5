"""Exact duplicate boxes: the rows that repeat (image, class, box, group-of) of an earlier row.

A file may hold some (one merged from several, say); a duplicate box would count twice in
training and as an extra ground truth in evaluation, so readers keep the first and reject the
rest. Rows are found by a sort of 64-bit keys (image code high, a hash of the rest low) and
compared exactly, so a hash collision never drops a row. ``StreamingDuplicates`` checks a file grouped by image (the
official files are sorted by ImageID) image by image as its batches arrive, so that the reader
neither holds a key per row to the end (98 MB for the 12.2M-row train file) nor sorts them all
after the parse, when the parser threads have finished and one core would wait.
"""

from __future__ import annotations

import numpy as np

from data_prep.growing_columns import GrowingColumns


def duplicate_key(img: np.ndarray, lab: np.ndarray, box: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per row: the image code in the high 32 bits, the top of a hash of (class, box, group-of) below.

    Rows grouped by image give nearly sorted keys, which the stable sort (timsort) exploits --
    several times faster than sorting the hash alone.
    """
    bits = np.ascontiguousarray(box).view(np.uint64)  # (x1, y1) and (x2, y2) as two 64-bit words per row
    with np.errstate(over="ignore"):
        h = (
            (img.astype(np.uint64) << np.uint64(20))
            ^ lab.astype(np.uint64)
            ^ (group.astype(np.uint64) << np.uint64(16))
        )
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= bits[:, 0] * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= bits[:, 1]
        h ^= h >> np.uint64(32)
    return (img.astype(np.uint64) << np.uint64(32)) | (h >> np.uint64(32))


DUPLICATE_CHECK_ROWS = 1 << 20  # rows sorted at a time when they are grouped by image


def first_of_duplicates(img: np.ndarray, lab: np.ndarray, box: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Mask keeping the first of rows that repeat (image, class, box, group-of) exactly.

    A sort of the rows' ``duplicate_key`` finds candidate runs of equal keys; inside a run rows
    are compared exactly in row order, so a hash collision never drops a row. Rows in image order
    (what the readers hand over) are sorted in slices of whole images, ~1M rows each: duplicates
    never cross an image, and the sort's index and sorted keys then take ~17 MB instead of 17
    bytes per row at once (0.2 GiB for the 12.2M-row train file).
    """
    key = duplicate_key(img, lab, box, group)
    n = len(key)
    if n <= DUPLICATE_CHECK_ROWS or not bool((img[1:] >= img[:-1]).all()):
        return _first_of_duplicates_in(img, lab, box, group, key)
    keep = np.empty(n, dtype=bool)
    start = 0
    while start < n:
        end = start + DUPLICATE_CHECK_ROWS
        if end < n:  # back to the start of the image the cut fell in, or past it if it began the slice
            cut = int(np.searchsorted(img, img[end], side="left"))
            end = cut if cut > start else int(np.searchsorted(img, img[end], side="right"))
        end = min(end, n)
        keep[start:end] = _first_of_duplicates_in(img[start:end], lab[start:end], box[start:end], group[start:end],
                                                  key[start:end])
        start = end
    return keep


def _first_of_duplicates_in(img: np.ndarray, lab: np.ndarray, box: np.ndarray, group: np.ndarray,
                            key: np.ndarray) -> np.ndarray:
    """``first_of_duplicates`` over rows sorted in one go."""
    order = np.argsort(key, kind="stable")
    hs = key[order]
    keep = np.ones(len(key), dtype=bool)
    same = np.flatnonzero(hs[1:] == hs[:-1])  # position j: sorted rows j and j + 1 share a hash
    run_start = None
    for k, j in enumerate(same):
        if run_start is None:
            run_start = j
        if k + 1 < len(same) and same[k + 1] == j + 1:
            continue  # the run goes on
        rows = np.sort(order[run_start : j + 2])
        kept: list[int] = []
        for r in rows:
            if any(
                img[r] == img[q]
                and lab[r] == lab[q]
                and group[r] == group[q]
                and np.array_equal(box[r], box[q])
                for q in kept
            ):
                keep[r] = False
            else:
                kept.append(int(r))
        run_start = None
    return keep


class StreamingDuplicates:
    """Drops duplicate rows from ``columns`` (with ``img``, ``lab``, ``box`` and, if present, the
    ``group`` column) as batches are appended, while the rows stay grouped by image.

    After each append, ``check_complete_images`` checks the images that can have no more rows:
    all but the last one seen. ``finish`` checks the last. Rows of an image that reappears later
    (a file not grouped by image) make ``grouped`` False; from then on nothing is checked here,
    and the caller checks the whole file with ``first_of_duplicates`` once the rows are grouped
    (the rows checked so far hold no duplicates among themselves, so the result is the same).
    ``removed_rows`` and ``removed_images`` hold the dropped rows' ``row`` values and image codes,
    in file order.
    """

    def __init__(self, columns: GrowingColumns, group: str | None) -> None:
        self.columns, self.group = columns, group
        self.grouped = True
        self.checked = 0  # rows [0, checked) are free of duplicates
        self._seen = 0  # rows whose grouping has been looked at
        self.removed_rows: list[np.ndarray] = []
        self.removed_images: list[np.ndarray] = []

    def check_complete_images(self) -> None:
        if not self.grouped or self.columns.rows == self._seen:
            return
        img = self.columns.column("img")
        new = img[max(self._seen - 1, 0) :]
        if not bool((new[1:] >= new[:-1]).all()):  # an image's rows are not contiguous, or a code from an earlier file
            self.grouped = False
            return
        self._seen = len(img)
        last_image_start = self.checked + int(np.searchsorted(img[self.checked :], img[-1], side="left"))
        self._check(last_image_start)

    def finish(self) -> None:
        self.check_complete_images()
        if self.grouped:
            self._check(self.columns.rows)

    def _check(self, stop: int) -> None:
        start = self.checked
        if stop <= start:
            return
        view = {name: self.columns.column(name)[start:stop] for name in ("img", "lab", "box", "row")}
        group = (self.columns.column(self.group)[start:stop] if self.group
                 else np.full(stop - start, -1, dtype=np.int8))
        keep = first_of_duplicates(view["img"], view["lab"], view["box"], group)
        dropped = ~keep
        if dropped.any():
            self.removed_rows.append(view["row"][dropped].copy())
            self.removed_images.append(view["img"][dropped].copy())
            self.columns.keep(start, stop, keep)
            self._seen -= int(dropped.sum())
            stop -= int(dropped.sum())
        self.checked = stop
