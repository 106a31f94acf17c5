"""Readers for the official OpenImages annotation CSVs, built to scale to the 12.2M-row train file.

Both box layouts (the 13-column train file and the short challenge-validation file) and both
image-level label layouts are read by header name, streamed block by block with pyarrow into
compact numpy arrays (int32 image code, int16 class, float32 box, int8 flags: ~27 bytes a row),
never row by row in Python. Rows that cannot be used are rejected with file, line and reason.

Boxes come out in the project's convention, normalized ``(x1, y1, x2, y2)``; the CSVs' own
``XMin, XMax, YMin, YMax`` order is handled here and nowhere else (see ``boxes.py`` for pixels).
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_prep import rejects as R
from data_prep.csv_ranges import line_ranges, lines_before, parallel_batches
from data_prep.duplicate_boxes import StreamingDuplicates, first_of_duplicates
from data_prep.errors import InputError
from data_prep.growing_columns import GrowingColumns
from data_prep.labels import LabelSpace
from data_prep.rejects import Reject, RejectLog
from data_prep.storage import is_s3, open_source

BOX_REQUIRED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
BOX_FLAGS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
LABEL_REQUIRED = ("ImageID", "LabelName", "Confidence")
BLOCK_SIZE = 16 << 20
PARALLEL_RANGE_BYTES = 64 << 20  # a large file is parsed in ranges of this size, one per core at a time
PARALLEL_MIN_BYTES = 64 << 20  # smaller files are parsed by one reader
_NUMBER_RE = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


class ImageCoder:
    """Maps ImageID strings to dense int32 codes, shared by every file of a split.

    The official files are sorted by ImageID; while every block seen so far continues one
    ascending run, new ids get codes without any per-id Python work (the id -> code dictionary
    is then built only if something asks for it). Unsorted input takes the dictionary path.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._code: dict[str, int] = {}
        self._ascending = True  # self.ids is strictly ascending

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self) -> dict[str, int]:
        if len(self._code) != len(self.ids):
            for i in range(len(self._code), len(self.ids)):
                self._code[self.ids[i]] = i
        return self._code

    def get(self, image_id: str, default: int = -1) -> int:
        return self._index().get(image_id, default)

    def code(self, image_id: str) -> int:
        """The code of ``image_id``, assigning the next one if it is new."""
        index = self._index()
        code = index.get(image_id)
        if code is None:
            if self.ids and image_id <= self.ids[-1]:
                self._ascending = False
            code = index[image_id] = len(self.ids)
            self.ids.append(image_id)
        return code

    def truncate(self, n: int) -> None:
        """Forget the codes from ``n`` on (undo a failed read)."""
        del self.ids[n:]
        self._code = {}
        self._ascending = n == 0

    def encode(self, column: pa.Array) -> np.ndarray:
        """Codes for a block's ImageID column; new ids get new codes in order of first appearance."""
        if isinstance(column, pa.DictionaryArray):  # the parser's per-block dictionary: first-appearance order
            uniques, local = column.dictionary, column.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        else:
            uniques = pc.unique(column)
            local = pc.index_in(column, value_set=uniques).to_numpy(zero_copy_only=False).astype(np.int32)
        new = uniques.to_pylist()
        if not new:
            return local
        grouped = len(local) < 2 or not bool((local[1:] < local[:-1]).any())  # each id's rows contiguous
        if self._ascending and grouped and (not self.ids or new[0] >= self.ids[-1]) and _is_sorted(uniques):
            continues = bool(self.ids) and new[0] == self.ids[-1]
            start = len(self.ids) - 1 if continues else len(self.ids)
            self.ids.extend(new[1:] if continues else new)
            return local + np.int32(start)
        self._ascending = False
        index = self._index()
        mapping = np.empty(len(new), dtype=np.int32)
        for k, image_id in enumerate(new):
            code = index.get(image_id)
            if code is None:
                code = index[image_id] = len(self.ids)
                self.ids.append(image_id)
            mapping[k] = code
        return mapping[local]


def _is_sorted(values: pa.Array) -> bool:
    """Strictly ascending (the uniques of a block, in order of first appearance)."""
    if len(values) < 2:
        return True
    return bool(pc.all(pc.less(values.slice(0, len(values) - 1), values.slice(1))).as_py())


@dataclass
class _LineMap:
    """Turns the index of a parsed data row back into its physical 1-based line number."""

    skipped: list[int] = field(default_factory=list)  # physical lines dropped by the parser
    # a row the parser made of several lines: a stray quote opened a value that ran on (the
    # official files never break a line inside a value); the file is then read again quote-blind
    swallowed_lines: bool = False

    def line(self, data_row: int) -> int:
        line = data_row + 2  # header is line 1
        for s in self.skipped:  # sorted; few
            if s <= line:
                line += 1
            else:
                break
        return line


def _record_invalid(line_map: _LineMap, log: RejectLog, uri: str, line: int | None, expected: int, actual: int,
                    text: str) -> None:
    """Reject a row the parser could not split into the header's columns (and keep its line)."""
    if "\n" in text or "\r" in text:
        line_map.swallowed_lines = True
    if line is not None:
        bisect.insort(line_map.skipped, line)
    log.add(Reject(R.MALFORMED_ROW, uri, f"expected {expected} columns, got {actual}: {text[:120]!r}", line=line))


def _csv_options(types: dict[str, pa.DataType], on_invalid, header: list[str], has_header_line: bool = True,
                 quoting: bool = True):
    """Parser options; the column names are always ``header`` (its quotes removed by ``_header``),
    and the file's own header line, when this reader's bytes start with it, is skipped.

    The fast path parses quotes as CSV does (a file quoted throughout reads at full speed); the
    slow path (``quoting=False``) treats a quote as a plain character, so that a stray one costs
    its own row (``_text_columns``) instead of opening a value that runs on for many lines."""
    return {
        "read_options": pacsv.ReadOptions(block_size=BLOCK_SIZE, use_threads=False, column_names=header,
                                          skip_rows=1 if has_header_line else 0),
        "parse_options": pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False,
                                            quote_char='"' if quoting else False),
        "convert_options": pacsv.ConvertOptions(
            column_types=types,
            include_columns=list(types),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    }


def _parse_workers(uri: str, typed: bool) -> int:
    """How many byte ranges to parse at once: one per core for a large local file on the fast path."""
    if not typed or is_s3(uri) or os.path.getsize(uri) < PARALLEL_MIN_BYTES:
        return 1
    return min(len(os.sched_getaffinity(0)), 8)


def _open_reader(
    uri: str,
    header: list[str],
    types: dict[str, pa.DataType],
    line_map: _LineMap,
    log: RejectLog,
    endpoint_url: str | None,
    typed: bool,
):
    """The file's record batches in order: one streaming reader, or one per byte range in parallel."""
    workers = _parse_workers(uri, typed)
    if workers > 1:
        parts = max(workers, -(-os.path.getsize(uri) // PARALLEL_RANGE_BYTES))
        return _parallel_reader(uri, header, types, line_map, log, line_ranges(uri, parts), workers)

    def on_invalid(row) -> str:
        _record_invalid(line_map, log, uri, row.number, row.expected_columns, row.actual_columns, row.text)
        return "skip"

    stream = open_source(uri, endpoint_url)
    try:
        return pacsv.open_csv(stream, **_csv_options(types, on_invalid, header, quoting=typed))
    except pa.ArrowInvalid as exc:
        if typed:
            raise _SlowPath() from None
        raise _unreadable(uri, exc) from None


def _unreadable(uri: str, exc: pa.ArrowInvalid) -> InputError:
    """The one row the quote-blind reader cannot skip: a wrong number of columns *and* bytes that
    are not UTF-8 (pyarrow cannot hand such a row to the invalid-row handler). Name its line."""
    found = re.search(r"Row #(\d+)", str(exc))
    where = f"{uri}:{found.group(1)}" if found else uri
    return InputError(f"{where}: cannot read as CSV ({exc}); a row with the wrong number of columns that is "
                      "also not UTF-8 stops the reader: fix or delete that line")


def _parallel_reader(uri: str, header: list[str], types: dict[str, pa.DataType], line_map: _LineMap,
                     log: RejectLog, ranges: list[tuple[int, int]], workers: int):
    """Batches of every range in file order, ``workers`` ranges parsed at a time; malformed rows
    are recorded at the end, with the file's line numbers (a range's reader counts from its own
    first line)."""
    deferred: list[list[tuple]] = [[] for _ in ranges]

    def open_range(k: int, stream):
        def on_invalid(row) -> str:
            deferred[k].append((row.number, row.expected_columns, row.actual_columns, row.text))
            if "\n" in row.text or "\r" in row.text:
                line_map.swallowed_lines = True
            return "skip"

        return pacsv.open_csv(stream, **_csv_options(types, on_invalid, header, has_header_line=k == 0))

    yield from parallel_batches(uri, ranges, open_range, window=workers)
    for k, rows in enumerate(deferred):
        base = lines_before(uri, ranges[k][0]) if rows and k > 0 else 0
        for number, expected, actual, text in rows:
            _record_invalid(line_map, log, uri, None if number is None else base + number, expected, actual, text)


def _header(uri: str, endpoint_url: str | None) -> list[str]:
    with open_source(uri, endpoint_url) as f:
        first = f.readline() if hasattr(f, "readline") else f.read(4096).split(b"\n")[0]
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}:1: the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return [c.strip().strip('"') for c in text.strip().split(",")]


def _check_columns(uri: str, header: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{uri}: missing column(s) {missing}; header is {header}")


class _SlowPath(Exception):
    """A numeric column holds a non-number: re-read the file with string columns, cell by cell."""


def _numbers(column: pa.Array, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float32 values of a column (NaN where unusable) and a mask of the malformed cells.

    Typed columns (the fast path) are already numbers. String columns (the slow path, taken only
    when a file has a malformed cell) are matched against a number pattern; empty cells are
    malformed unless ``allow_empty``.
    """
    if not pa.types.is_string(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        missing = np.isnan(values)
        return values, (missing if not allow_empty else np.zeros(len(values), dtype=bool))
    trimmed = pc.utf8_trim_whitespace(column)
    ok = pc.fill_null(pc.match_substring_regex(trimmed, _NUMBER_RE), False).to_numpy(zero_copy_only=False)
    cleaned = pc.if_else(pa.array(ok), trimmed, pa.scalar(None, pa.string()))
    values = pc.cast(cleaned, pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bad = ~ok
    if allow_empty:
        bad &= pc.fill_null(pc.not_equal(trimmed, ""), True).to_numpy(zero_copy_only=False)
    return values, bad


def _codes_in(column: pa.Array, values: pa.Array) -> np.ndarray:
    """Each cell's index in ``values`` (-1 when absent); on a dictionary column only its uniques are looked up."""
    if isinstance(column, pa.DictionaryArray):
        found = pc.fill_null(pc.index_in(column.dictionary, value_set=values), -1).to_numpy(zero_copy_only=False)
        return found[column.indices.to_numpy(zero_copy_only=False)]
    return pc.fill_null(pc.index_in(column, value_set=values), -1).to_numpy(zero_copy_only=False)


def _empty_cells(column: pa.Array) -> np.ndarray:
    """Mask of the empty strings of a text column."""
    if isinstance(column, pa.DictionaryArray):
        empty = pc.equal(pc.utf8_length(column.dictionary), 0).to_numpy(zero_copy_only=False)
        if not empty.any():  # the usual case: no per-row lookup
            return np.zeros(len(column), dtype=bool)
        return empty[column.indices.to_numpy(zero_copy_only=False)]
    return pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)


def rows_of(offsets: np.ndarray, code: int) -> slice:
    """Rows of the image with ``code``; empty for images first seen in a later file."""
    if code + 1 >= len(offsets):
        return slice(0, 0)
    return slice(int(offsets[code]), int(offsets[code + 1]))


@dataclass
class BoxTable:
    """All valid boxes of one file, grouped per image.

    Row arrays are ordered by image code (stable: file order within an image); the boxes of the
    image with code ``c`` are rows ``offsets[c]:offsets[c + 1]``.
    """

    image_code: np.ndarray  # int32 [N]
    label: np.ndarray  # int16 [N]
    boxes: np.ndarray  # float32 [N, 4], normalized x1, y1, x2, y2
    flags: dict[str, np.ndarray]  # BOX_FLAGS -> int8 [N]; -1 = unknown / column absent
    line: np.ndarray  # int32 [N] physical line in the source file
    offsets: np.ndarray  # int64 [num_images + 1]
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.label)

    def rows_of(self, code: int) -> slice:
        return rows_of(self.offsets, code)

    def select(self, keep: np.ndarray) -> int:
        """Keep the rows where ``keep`` is True (in place, grouping kept); returns how many went."""
        dropped = int(len(keep) - keep.sum())
        if dropped:
            self.image_code, self.label, self.boxes = self.image_code[keep], self.label[keep], self.boxes[keep]
            self.flags = {k: v[keep] for k, v in self.flags.items()}
            self.line = self.line[keep]
            self.offsets = _regroup(self.image_code, len(self.offsets) - 1)
        return dropped


@dataclass
class ImageLabelTable:
    """Verified image-level labels grouped per image; ``positive`` is ``int(float(Confidence)) == 1``."""

    image_code: np.ndarray  # int32 [M]
    label: np.ndarray  # int16 [M]
    positive: np.ndarray  # bool [M]
    offsets: np.ndarray  # int64 [num_images + 1]
    rows_read: int = 0

    def rows_of(self, code: int) -> slice:
        return rows_of(self.offsets, code)

    def select(self, keep: np.ndarray) -> int:
        """Keep the rows where ``keep`` is True (in place, grouping kept); returns how many went."""
        dropped = int(len(keep) - keep.sum())
        if dropped:
            self.image_code, self.label, self.positive = self.image_code[keep], self.label[keep], self.positive[keep]
            self.offsets = _regroup(self.image_code, len(self.offsets) - 1)
        return dropped


def _regroup(codes: np.ndarray, num_images: int) -> np.ndarray:
    """The offsets of rows still grouped by image code after some were removed."""
    order, offsets = group_offsets(codes, num_images)
    assert order is None, "rows must stay grouped by image"
    return offsets


def pad_offsets(offsets: np.ndarray, num_images: int) -> np.ndarray:
    """Offsets extended to ``num_images + 1`` entries: images first seen in a later file have no rows."""
    return np.pad(offsets, (0, max(0, num_images + 1 - len(offsets))), mode="edge")


def group_offsets(codes: np.ndarray, num_images: int) -> tuple[np.ndarray | None, np.ndarray]:
    """A stable order that groups rows by code (None when they are already grouped, as in the
    official files), and the ``[num_images + 1]`` offsets of each code's rows in that order."""
    order = None
    if len(codes) > 1 and bool((codes[1:] < codes[:-1]).any()):
        order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=num_images)
    offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


def _read_with_fallback(read_once, uri: str, images: ImageCoder, log: RejectLog):
    """Run ``read_once(typed)`` on typed columns; on a malformed number, redo it on string columns."""
    n_images = len(images)
    attempt = RejectLog(log.max_records_per_reason)
    try:
        result = read_once(True, attempt)
    except _SlowPath:
        images.truncate(n_images)
        attempt = RejectLog(log.max_records_per_reason)
        result = read_once(False, attempt)
    log.merge(attempt)
    return result


@dataclass
class _TextFaults:
    """The rows of a block with a text cell that is not UTF-8 or holds a stray quote: a mask, and
    for each such row what is wrong with its first such cell (faulty rows are rare, so a dict)."""

    mask: np.ndarray  # bool [n]
    details: dict[int, str] = field(default_factory=dict)  # row -> "what in which column"

    def note(self, rows: np.ndarray, column: str, problem: str) -> None:
        """Record ``problem`` in ``column`` for the rows of the mask ``rows`` not yet faulty."""
        new = rows & ~self.mask
        for i in np.flatnonzero(new):
            self.details[int(i)] = f"{problem} in {column}"
        self.mask |= new


def _text_columns(cols: dict[str, pa.Array], text: tuple[str, ...], typed: bool) -> _TextFaults:
    """Make every column of a block usable text, in place, and name the cells that are not.

    On the fast path a line break inside a text cell (a stray quote whose value ran on over the
    following lines) sends the file to the slow path; per-block dictionaries make this check cheap.
    On the slow path, read quote-blind, every column arrives as bytes: cells
    that are not UTF-8 become empty and are named, a cell quoted whole (``"img1"``, from a
    quote-everything writer) loses its quotes, and a quote left in a text column (a stray one:
    the official files quote nothing) is named. Numbers are checked later by ``_numbers``.
    """
    n = len(next(iter(cols.values()))) if cols else 0
    faults = _TextFaults(np.zeros(n, dtype=bool))
    if typed:
        for name in text:
            col = cols[name]
            if _holds_line_break(col.dictionary if isinstance(col, pa.DictionaryArray) else col):
                raise _SlowPath()
        return faults
    for name, col in cols.items():
        not_utf8 = _not_utf8(col)
        if not_utf8.any():
            col = pc.if_else(pa.array(not_utf8), pa.scalar(b"", pa.binary()), col)
            faults.note(not_utf8, name, "bytes that are not UTF-8")
        strings = col.cast(pa.string())
        if pc.any(pc.match_substring(strings, '"')).as_py():
            trimmed = pc.utf8_trim_whitespace(strings)
            whole = pc.and_(pc.starts_with(trimmed, '"'), pc.ends_with(trimmed, '"'))
            whole = pc.and_(whole, pc.greater_equal(pc.utf8_length(trimmed), 2))
            strings = pc.if_else(whole, pc.utf8_slice_codeunits(trimmed, 1, -1), strings)
        if name in text:
            quoted = pc.fill_null(pc.match_substring(strings, '"'), False).to_numpy(zero_copy_only=False)
            if quoted.any():
                strings = pc.if_else(pa.array(quoted), pa.scalar("", pa.string()), strings)
                faults.note(quoted, name, "a stray quote (\")")
        cols[name] = strings
    return faults


def _holds_line_break(strings: pa.Array) -> bool:
    """Whether a string column's cells hold a CR or LF: one byte search over the bytes they span
    (a regex per cell took ~10 % of reading the train box file)."""
    if len(strings) == 0:
        return False
    _, offsets_buf, data_buf = strings.buffers()
    if data_buf is None:
        return False
    width = np.int64 if pa.types.is_large_string(strings.type) or pa.types.is_large_binary(strings.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=width)[strings.offset : strings.offset + len(strings) + 1]
    data = bytes(memoryview(data_buf)[offsets[0] : offsets[-1]])
    return b"\n" in data or b"\r" in data


def _not_utf8(column: pa.Array) -> np.ndarray:
    """Mask of the cells of a binary column that are not valid UTF-8. Only cells holding a byte
    >= 0x80 (none in the official files, whose ids and MIDs are ASCII) are decoded in Python."""
    n = len(column)
    bad = np.zeros(n, dtype=bool)
    _, offsets_buf, data_buf = column.buffers()
    if data_buf is None or n == 0:
        return bad
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[column.offset : column.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    high = np.flatnonzero(data >= 0x80) + offsets[0]
    if len(high) == 0:
        return bad
    for row in np.unique(np.searchsorted(offsets, high, side="right") - 1):
        value = column[int(row)].as_py()
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            bad[row] = True
    return bad


def _iter_batches(reader, uri: str, typed: bool, line_map: _LineMap):
    """The reader's batches; on the fast path, a malformed number, bytes that are not UTF-8 or a
    row made of several lines (a stray quote) send the file to the slow path."""
    try:
        for batch in reader:
            if typed and line_map.swallowed_lines:
                raise _SlowPath()
            yield batch
    except pa.ArrowInvalid as exc:
        if typed:
            raise _SlowPath() from None
        raise _unreadable(uri, exc) from None
    if typed and line_map.swallowed_lines:
        raise _SlowPath()


def _column_types(columns: tuple[str, ...], numeric: tuple[str, ...], typed: bool,
                  small_ints: tuple[str, ...] = ()) -> dict[str, pa.DataType]:
    """Types of the columns to read (the others are skipped by the parser). On the fast path the
    0/1 flag columns are parsed straight into int8 and the text columns (ImageID, LabelName) into
    per-block dictionaries, so that the parser threads, not the consumer, find each block's uniques.
    The slow path reads every column as bytes, for ``_text_columns`` to check cell by cell."""
    def kind(c: str) -> pa.DataType:
        if not typed:
            return pa.binary()  # bytes: the slow path finds the cells that are not UTF-8 itself
        if c in small_ints:
            return pa.int8()
        return pa.float32() if c in numeric else pa.dictionary(pa.int32(), pa.string())

    return {c: kind(c) for c in columns}


def read_boxes(
    uri: str,
    labels: LabelSpace,
    images: ImageCoder,
    log: RejectLog,
    endpoint_url: str | None = None,
    drop_duplicates: bool = True,
) -> BoxTable:
    """Read, validate and group a box CSV (either official layout)."""
    header = _header(uri, endpoint_url)
    _check_columns(uri, header, BOX_REQUIRED)
    return _read_with_fallback(
        lambda typed, attempt_log: _read_boxes_once(
            uri, header, labels, images, attempt_log, endpoint_url, drop_duplicates, typed
        ),
        uri,
        images,
        log,
    )


def _read_boxes_once(
    uri: str,
    header: list[str],
    labels: LabelSpace,
    images: ImageCoder,
    log: RejectLog,
    endpoint_url: str | None,
    drop_duplicates: bool,
    typed: bool,
) -> BoxTable:
    coords = ("XMin", "XMax", "YMin", "YMax")
    flags_present = [f for f in BOX_FLAGS if f in header]
    line_map = _LineMap()
    reader = _open_reader(
        uri,
        header,
        _column_types(("ImageID", "LabelName", *coords, *flags_present), coords, typed, tuple(flags_present)),
        line_map,
        log,
        endpoint_url,
        typed,
    )
    mids = pa.array(labels.mids)

    specs = {"img": (np.int32, ()), "lab": (np.int16, ()), "box": (np.float32, (4,)), "row": (np.int32, ()),
             **{f: (np.int8, ()) for f in flags_present}}
    kept = GrowingColumns(specs, _rows_estimate(uri))  # the valid rows, batch by batch
    duplicates = StreamingDuplicates(kept, "IsGroupOf" if "IsGroupOf" in flags_present else None)
    rows = 0
    bad_rows: list[tuple[int, str, str, str]] = []  # (data row, reason, image id, detail)
    for batch in _iter_batches(reader, uri, typed, line_map):
        n = batch.num_rows
        cols = {name: batch.column(name) for name in batch.schema.names}
        text = _text_columns(cols, ("ImageID", "LabelName"), typed)
        img = images.encode(cols["ImageID"])
        lab = _codes_in(cols["LabelName"], mids)
        box = np.empty((n, 4), dtype=np.float32)
        malformed = _empty_cells(cols["ImageID"]) | text.mask
        out_of_range = np.zeros(n, dtype=bool)  # per column: contiguous compares, not an any() over box rows
        # CSV order XMin, XMax, YMin, YMax -> project order x1, y1, x2, y2
        for src, dst in zip(coords, (0, 2, 1, 3), strict=True):
            values, bad = _numbers(cols[src])
            box[:, dst] = values
            malformed |= bad
            out_of_range |= (values < 0) | (values > 1)
        flag_values = {}
        bad_flag = np.zeros(n, dtype=bool)
        bad_flag_name: dict[int, str] = {}
        for f in flags_present:
            # a flag is 0, 1 or -1 (unknown), nothing else (np.isin sorts, 5x slower here)
            if pa.types.is_int8(cols[f].type):  # fast path: empty cells are nulls -> -1 (unknown)
                raw = pc.fill_null(cols[f], -1).to_numpy(zero_copy_only=False)
                wrong = raw.view(np.uint8) + np.uint8(1) > 2  # -1, 0, 1 -> 0, 1, 2 (uint8 wraps)
                value = raw  # a wrong one rejects its row
            else:
                v, bad = _numbers(cols[f], allow_empty=True)
                malformed |= bad
                raw = np.where(np.isnan(v) & ~bad, -1.0, np.nan_to_num(v, nan=0.0))
                wrong = ~((raw == 0) | (raw == 1) | (raw == -1))
                value = np.clip(raw, -1, 1).astype(np.int8)
            wrong &= ~malformed
            for i in np.flatnonzero(wrong & ~bad_flag):
                bad_flag_name[int(i)] = f"{f}={raw[i]:g}"
            bad_flag |= wrong
            flag_values[f] = value
        unknown = (lab < 0) & ~malformed & ~bad_flag
        outside = ~malformed & out_of_range
        degenerate = ~malformed & ~outside & ((box[:, 0] >= box[:, 2]) | (box[:, 1] >= box[:, 3]))
        bad_mask = malformed | unknown | outside | degenerate | bad_flag
        for i in np.flatnonzero(bad_mask):
            if i in text.details:
                reason, detail = R.MALFORMED_ROW, text.details[i]
            elif malformed[i]:
                reason, detail = R.MALFORMED_ROW, "empty ImageID, or a coordinate/flag that is not a number"
            elif bad_flag[i]:
                reason, detail = R.BAD_FLAG, f"{bad_flag_name[int(i)]}: a flag is 0, 1 or -1 (unknown)"
            elif unknown[i]:
                reason, detail = (
                    R.UNKNOWN_MID,
                    f"LabelName {cols['LabelName'][i].as_py()!r} is not in the label space",
                )
            elif outside[i]:
                reason, detail = R.BOX_OUTSIDE_IMAGE, f"box {_fmt(box[i])} (x1,y1,x2,y2) is outside [0,1]"
            else:
                reason, detail = R.DEGENERATE_BOX, f"box {_fmt(box[i])} (x1,y1,x2,y2) has min >= max"
            bad_rows.append((rows + int(i), reason, cols["ImageID"][i].as_py(), detail))
        data_row = np.arange(rows, rows + n, dtype=np.int32)
        if bad_mask.any():
            keep = ~bad_mask
            img, lab, box, data_row = img[keep], lab[keep], box[keep], data_row[keep]
            flag_values = {f: v[keep] for f, v in flag_values.items()}
        kept.append({"img": img, "lab": lab, "box": box, "row": data_row, **flag_values})
        if drop_duplicates:  # here, where the consumer would otherwise wait for the parsers
            duplicates.check_complete_images()
        rows += n
    if drop_duplicates:
        duplicates.finish()

    for data_row, reason, image_id, detail in bad_rows:
        log.add(Reject(reason, uri, detail, line=line_map.line(data_row), image_id=image_id))

    img, lab, box, data_row = kept.pop("img"), kept.pop("lab"), kept.pop("box"), kept.pop("row")
    flags = {f: (kept.pop(f) if f in flags_present else np.full(len(lab), -1, np.int8)) for f in BOX_FLAGS}

    order, offsets = group_offsets(img, len(images))
    if order is not None:
        img, lab, box, data_row = img[order], lab[order], box[order], data_row[order]
        flags = {k: v[order] for k, v in flags.items()}

    removed_rows, removed_images = duplicates.removed_rows, duplicates.removed_images
    if drop_duplicates and not duplicates.grouped and len(lab):  # the whole file at once, now grouped
        keep = first_of_duplicates(img, lab, box, flags["IsGroupOf"])
        if not keep.all():
            removed_rows, removed_images = [*removed_rows, data_row[~keep]], [*removed_images, img[~keep]]
            img, lab, box, data_row = img[keep], lab[keep], box[keep], data_row[keep]
            flags = {k: v[keep] for k, v in flags.items()}
            _, offsets = group_offsets(img, len(images))
    if removed_rows:
        for row, code in zip(np.concatenate(removed_rows).tolist(), np.concatenate(removed_images).tolist(),
                             strict=True):
            log.add(Reject(R.DUPLICATE_BOX, uri, "same image, class, box and group-of flag as an earlier row",
                           line=line_map.line(row), image_id=images.ids[code]))

    lines = data_row + np.int32(2)
    if line_map.skipped:
        lines = np.array([line_map.line(int(r)) for r in data_row], dtype=np.int32)
    return BoxTable(img, lab, box, flags, lines, offsets, rows_read=rows)


def _rows_estimate(uri: str) -> int:
    """More rows than a local box or label file can hold (no row is shorter than ~40 bytes); 1M
    elsewhere (the columns grow as needed)."""
    if is_s3(uri):
        return 1 << 20
    try:
        return os.path.getsize(uri) // 40 + 1024
    except OSError:
        return 1 << 20


def read_image_labels(
    uri: str, labels: LabelSpace, images: ImageCoder, log: RejectLog, endpoint_url: str | None = None
) -> ImageLabelTable:
    """Read and group an image-level label CSV (with or without the ``Source`` column)."""
    header = _header(uri, endpoint_url)
    _check_columns(uri, header, LABEL_REQUIRED)
    return _read_with_fallback(
        lambda typed, attempt_log: _read_image_labels_once(
            uri, header, labels, images, attempt_log, endpoint_url, typed
        ),
        uri,
        images,
        log,
    )


def _read_image_labels_once(
    uri: str,
    header: list[str],
    labels: LabelSpace,
    images: ImageCoder,
    log: RejectLog,
    endpoint_url: str | None,
    typed: bool,
) -> ImageLabelTable:
    line_map = _LineMap()
    reader = _open_reader(
        uri, header, _column_types(LABEL_REQUIRED, ("Confidence",), typed), line_map, log, endpoint_url, typed
    )
    mids = pa.array(labels.mids)
    kept = GrowingColumns({"img": (np.int32, ()), "lab": (np.int16, ()), "pos": (np.bool_, ())},
                          _rows_estimate(uri))  # the valid rows, batch by batch
    rows = 0
    bad_rows: list[tuple[int, str, str, str]] = []
    for batch in _iter_batches(reader, uri, typed, line_map):
        cols = {name: batch.column(name) for name in batch.schema.names}
        text = _text_columns(cols, ("ImageID", "LabelName"), typed)
        img = images.encode(cols["ImageID"])
        lab = _codes_in(cols["LabelName"], mids)
        conf, bad = _numbers(cols["Confidence"])
        bad |= _empty_cells(cols["ImageID"]) | text.mask
        unknown = (lab < 0) & ~bad
        for i in np.flatnonzero(bad | unknown):
            if i in text.details:
                reason, detail = R.MALFORMED_ROW, text.details[i]
            elif bad[i]:
                reason, detail = (
                    R.MALFORMED_ROW,
                    f"empty ImageID or Confidence {cols['Confidence'][i].as_py()!r}",
                )
            else:
                reason, detail = (
                    R.UNKNOWN_MID,
                    f"LabelName {cols['LabelName'][i].as_py()!r} is not in the label space",
                )
            bad_rows.append((rows + int(i), reason, cols["ImageID"][i].as_py(), detail))
        keep = ~(bad | unknown)
        # The official rule: positive iff int(float(Confidence)) == 1; anything else is negative.
        kept.append({"img": img[keep], "lab": lab[keep], "pos": np.trunc(conf[keep]) == 1})
        rows += batch.num_rows
    for data_row, reason, image_id, detail in bad_rows:
        log.add(Reject(reason, uri, detail, line=line_map.line(data_row), image_id=image_id))
    img, lab, pos = kept.pop("img"), kept.pop("lab"), kept.pop("pos")
    order, offsets = group_offsets(img, len(images))
    if order is not None:
        img, lab, pos = img[order], lab[order], pos[order]
    return ImageLabelTable(img, lab, pos, offsets, rows_read=rows)


def _fmt(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in box) + "]"
