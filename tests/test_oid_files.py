"""The official CSV readers: both layouts, header-order independence, and every bad-row case."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import rejects as R
from data_prep.errors import InputError
from data_prep.labels import LabelSpace
from data_prep.oid_files import ImageCoder, read_boxes, read_image_labels
from data_prep.rejects import RejectLog

LABELS = LabelSpace.from_pairs([("/m/a", "A"), ("/m/b", "B"), ("/m/c", "C")])
TRAIN_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _read(path: str, **kw):
    coder, log = ImageCoder(), RejectLog()
    return read_boxes(path, LABELS, coder, log, **kw), coder, log


def test_train_layout_is_parsed_into_xyxy_and_grouped(tmp_path):
    path = _write(tmp_path, "train.csv", "\n".join([
        TRAIN_HEADER,
        "img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,1,0,0,0,0",
        "img2,xclick,/m/b,1,0.0,1.0,0.0,1.0,0,1,1,0,1",
        "img1,xclick,/m/c,1,0.3,0.4,0.35,0.45,0,0,0,1,0",
    ]) + "\n")
    table, coder, log = _read(path)
    assert len(log) == 0 and table.rows_read == 3
    assert coder.ids == ["img1", "img2"]
    img1 = table.rows_of(coder.get("img1"))
    np.testing.assert_allclose(table.boxes[img1], [[0.1, 0.2, 0.5, 0.6], [0.3, 0.35, 0.4, 0.45]], rtol=1e-6)
    assert table.label[img1].tolist() == [0, 2]  # file order within an image
    assert table.flags["IsOccluded"][img1].tolist() == [1, 0]
    assert table.flags["IsDepiction"][img1].tolist() == [0, 1]
    img2 = table.rows_of(coder.get("img2"))
    assert table.flags["IsGroupOf"][img2].tolist() == [1] and table.flags["IsInside"][img2].tolist() == [1]
    assert table.line[img1].tolist() == [2, 4]


def test_validation_layout_any_column_order_missing_flags_are_unknown(tmp_path):
    path = _write(tmp_path, "val.csv", "LabelName,XMax,ImageID,YMin,XMin,YMax,IsGroupOf\n/m/b,0.9,v1,0.2,0.1,0.8,1\n")
    table, coder, log = _read(path)
    np.testing.assert_allclose(table.boxes, [[0.1, 0.2, 0.9, 0.8]], rtol=1e-6)
    assert table.label.tolist() == [1]
    assert table.flags["IsGroupOf"].tolist() == [1]
    assert table.flags["IsOccluded"].tolist() == [-1]


def test_missing_column_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "bad.csv", "ImageID,LabelName,XMin,XMax,YMin\nx,/m/a,0,1,0\n")
    with pytest.raises(InputError, match=r"bad.csv: missing column\(s\) \['YMax'\]"):
        _read(path)


@pytest.mark.parametrize("row, reason", [
    ("img1,xclick,/m/zzz,1,0.1,0.5,0.2,0.6,0,0,0,0,0", R.UNKNOWN_MID),
    ("img1,xclick,/m/a,1,0.1,1.5,0.2,0.6,0,0,0,0,0", R.BOX_OUTSIDE_IMAGE),
    ("img1,xclick,/m/a,1,-0.1,0.5,0.2,0.6,0,0,0,0,0", R.BOX_OUTSIDE_IMAGE),
    ("img1,xclick,/m/a,1,0.5,0.5,0.2,0.6,0,0,0,0,0", R.DEGENERATE_BOX),
    ("img1,xclick,/m/a,1,0.1,0.5,0.7,0.6,0,0,0,0,0", R.DEGENERATE_BOX),
    ("img1,xclick,/m/a,1,abc,0.5,0.2,0.6,0,0,0,0,0", R.MALFORMED_ROW),
    ("img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,yes,0,0", R.MALFORMED_ROW),
    ("img1,xclick,/m/a,1,0.1,0.5,0.2", R.MALFORMED_ROW),
    (",xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0", R.MALFORMED_ROW),
    ("img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0", R.DUPLICATE_BOX),
    ("img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,7,0,0", R.BAD_FLAG),  # IsGroupOf=7
    ("img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,-3,0,0,0,0", R.BAD_FLAG),
    ("img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0.5,0,0", R.BAD_FLAG),
])
def test_bad_rows_are_rejected_with_file_and_line_and_the_rest_kept(tmp_path, row, reason):
    path = _write(tmp_path, "boxes.csv", "\n".join([
        TRAIN_HEADER,
        "img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0",
        row,
        "img2,xclick,/m/b,1,0.2,0.4,0.2,0.4,0,0,0,0,0",
    ]) + "\n")
    table, coder, log = _read(path)
    assert dict(log.counts) == {reason: 1}
    (reject,) = log.records
    assert reject.line == 3 and reject.file == path and reason in str(reject)
    if reason == R.BAD_FLAG:
        assert "a flag is 0, 1 or -1" in reject.detail and ("=7" in reject.detail or "=-3" in reject.detail
                                                           or "=0.5" in reject.detail)
    assert len(table) == 2  # the good rows around it survive
    assert table.line.tolist() == [2, 4]


def test_line_numbers_stay_right_after_a_short_row(tmp_path):
    path = _write(tmp_path, "boxes.csv", "\n".join([
        TRAIN_HEADER,
        "img1,xclick",
        "img1,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0",
        "img1,xclick,/m/zzz,1,0.1,0.5,0.2,0.6,0,0,0,0,0",
    ]) + "\n")
    _, _, log = _read(path)
    lines = sorted((r.reason, r.line) for r in log.records)
    assert lines == [(R.MALFORMED_ROW, 2), (R.UNKNOWN_MID, 4)]


def test_many_blocks_and_many_images(tmp_path, monkeypatch):
    import data_prep.oid_files as oid_files

    monkeypatch.setattr(oid_files, "BLOCK_SIZE", 4096)  # force many streaming blocks
    rng = np.random.default_rng(0)
    n = 5000
    image_of_row = np.sort(rng.integers(0, 800, n))
    rows = [TRAIN_HEADER] + [
        f"i{k:05d},xclick,/m/{'abc'[k % 3]},1,0.1,0.{5 + r % 4},0.2,0.6,0,0,0,0,0"
        for r, k in enumerate(image_of_row)
    ]
    rows[1234] = rows[1234].replace("/m/", "/m/zz")
    path = _write(tmp_path, "big.csv", "\n".join(rows) + "\n")
    table, coder, log = _read(path, drop_duplicates=False)
    assert table.rows_read == n and len(table) == n - 1
    assert log.records[0].line == 1235
    counts = np.diff(table.offsets)
    expected = np.bincount(image_of_row, minlength=800)
    expected[image_of_row[1233]] -= 1
    assert counts.tolist() == expected[np.unique(image_of_row)].tolist()


def test_image_labels_both_layouts_and_the_official_positive_rule(tmp_path):
    long = _write(tmp_path, "labels.csv", "ImageID,Source,LabelName,Confidence\n"
                  "i1,verification,/m/a,1\ni1,verification,/m/b,0\ni2,crowdsource,/m/c,0.9\n"
                  "i2,verification,/m/a,1.0\ni3,verification,/m/q,1\ni3,verification,/m/b,x\n")
    short = _write(tmp_path, "labels_val.csv", "ImageID,LabelName,Confidence\ni1,/m/a,1\ni1,/m/b,0.5\n")
    for path, n_rejects in ((long, 2), (short, 0)):
        coder, log = ImageCoder(), RejectLog()
        table = read_image_labels(path, LABELS, coder, log)
        assert len(log) == n_rejects
        i1 = table.rows_of(coder.get("i1"))
        assert table.label[i1].tolist() == [0, 1] and table.positive[i1].tolist() == [True, False]
    coder, log = ImageCoder(), RejectLog()
    table = read_image_labels(long, LABELS, coder, log)
    i2 = table.rows_of(coder.get("i2"))
    assert table.positive[i2].tolist() == [False, True]  # 0.9 is not a verified positive
    assert dict(log.counts) == {R.UNKNOWN_MID: 1, R.MALFORMED_ROW: 1}
    assert sorted(r.line for r in log.records) == [6, 7]


def test_files_share_one_image_coder(tmp_path):
    boxes = _write(tmp_path, "b.csv", TRAIN_HEADER + "\nimg1,x,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0\n")
    labels = _write(tmp_path, "l.csv", "ImageID,LabelName,Confidence\nimg2,/m/a,1\nimg1,/m/b,0\n")
    coder, log = ImageCoder(), RejectLog()
    box_table = read_boxes(boxes, LABELS, coder, log)
    label_table = read_image_labels(labels, LABELS, coder, log)
    assert coder.ids == ["img1", "img2"]
    assert box_table.rows_of(coder.get("img2")) == slice(0, 0)  # seen first in the later file
    assert label_table.label[label_table.rows_of(coder.get("img1"))].tolist() == [1]


@pytest.mark.parametrize("slice_rows, image_order", [(1 << 20, True), (1000, True), (3, True), (1000, False)])
def test_duplicate_detection_matches_a_plain_python_reference(monkeypatch, slice_rows, image_order):
    """In one sort, in slices of whole images (slices shorter than an image included), and for
    rows not in image order (one sort)."""
    import data_prep.duplicate_boxes as duplicate_boxes
    from data_prep.duplicate_boxes import first_of_duplicates

    monkeypatch.setattr(duplicate_boxes, "DUPLICATE_CHECK_ROWS", slice_rows)
    rng = np.random.default_rng(0)
    n = 20_000
    img = rng.integers(0, 3000, n).astype(np.int32)
    img = np.sort(img) if image_order else img
    lab = rng.integers(0, 5, n).astype(np.int16)
    box = rng.integers(0, 3, (n, 4)).astype(np.float32) / 4
    group = rng.integers(0, 2, n).astype(np.int8)
    seen, expected = set(), np.ones(n, dtype=bool)
    for i in range(n):
        key = (img[i], lab[i], group[i], *box[i].tolist())
        expected[i] = key not in seen
        seen.add(key)
    assert (~expected).sum() > 10  # the data has duplicates, some of them triples
    np.testing.assert_array_equal(first_of_duplicates(img, lab, box, group), expected)


@pytest.mark.parametrize("layout", ["sorted", "grouped, not sorted", "not grouped", "codes from an earlier file"])
def test_duplicates_dropped_batch_by_batch_are_those_of_a_plain_python_reference(tmp_path, monkeypatch, layout):
    """The reader checks a file grouped by image image by image as its batches arrive (an image's
    rows and its duplicates spanning several batches included); other files at the end. Either
    way: the first of each repeated (image, class, box, group-of) kept, the rest rejected by line."""
    import data_prep.oid_files as oid_files

    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 120, 60)  # some images longer than a batch (~60 rows)
    images = [f"i{k:03d}" for k in range(len(sizes))]
    if layout == "grouped, not sorted":
        images = images[::-1]
    rows = []
    for image, size in zip(images, sizes, strict=True):
        for _ in range(size):  # coarse values, so that exact repeats are common, far apart too
            x1, y1 = rng.integers(0, 3, 2) / 10
            rows.append(f"{image},xclick,/m/{'ab'[rng.integers(0, 2)]},1,{x1},{x1 + 0.5},{y1},{y1 + 0.5},0,0,"
                        f"{rng.integers(0, 2)},0,0")
    if layout == "not grouped":
        rows = [rows[i] for i in rng.permutation(len(rows))]
    path = _write(tmp_path, "dups.csv", "\n".join([TRAIN_HEADER, *rows]) + "\n")
    seen, expected_lines, kept_rows = set(), [], {}
    for line, row in enumerate(rows, start=2):
        cells = row.split(",")
        key = (cells[0], cells[2], *map(float, cells[4:8]), cells[10])
        if key in seen:
            expected_lines.append(line)
        else:
            seen.add(key)
            kept_rows.setdefault(cells[0], []).append(line)
    assert len(expected_lines) > 100

    monkeypatch.setattr(oid_files, "BLOCK_SIZE", 4096)  # ~60 rows a batch
    coder, log = ImageCoder(), RejectLog()
    if layout == "codes from an earlier file":  # an image-level file read first gave the codes in reverse order
        labels = _write(tmp_path, "l.csv", "ImageID,LabelName,Confidence\n" + "".join(f"{i},/m/a,1\n" for i in images[::-1]))
        read_image_labels(labels, LABELS, coder, RejectLog())
    table = read_boxes(path, LABELS, coder, log)
    assert sorted(r.line for r in log.records if r.reason == R.DUPLICATE_BOX) == expected_lines
    assert len(log) == len(expected_lines) and table.rows_read == len(rows)
    assert {image: table.line[table.rows_of(coder.get(image))].tolist() for image in kept_rows} == kept_rows
    assert all(r.image_id == rows[r.line - 2].split(",")[0] for r in log.records)


@pytest.mark.parametrize("workers, range_bytes", [(2, 1 << 30), (3, 1 << 30), (2, 40_000)])
def test_parallel_byte_ranges_give_exactly_the_sequential_result(tmp_path, monkeypatch, workers, range_bytes):
    """One range per worker, and many small ranges parsed ``workers`` at a time (as the 1 GB file
    is, in ranges of 64 MB): the same table, rejects and line numbers as one sequential reader."""
    import data_prep.oid_files as oid_files

    rng = np.random.default_rng(1)
    n = 6000
    image_of_row = np.sort(rng.integers(0, 900, n))
    rows = [TRAIN_HEADER] + [
        f"i{k:05d},xclick,/m/{'abc'[r % 3]},1,0.1,0.{5 + r % 4},0.2,0.6,{r % 2},0,{r % 3 == 0:d},0,0"
        for r, k in enumerate(image_of_row)
    ]
    rows[40] = rows[40].replace("/m/", "/m/zz")  # unknown class, first range
    rows[4500] = "short,row"  # malformed, a later range
    rows[5200] = rows[5200].replace(",0.2,", ",1.7,")  # outside [0, 1], a later range
    rows[5900] = rows[5899]  # an exact duplicate near the end
    rows.insert(3000, "another,short,row")  # a second malformed line, near a cut
    path = _write(tmp_path, "big.csv", "\n".join(rows) + "\n")
    monkeypatch.setattr(oid_files, "BLOCK_SIZE", 8192)
    sequential = _read(path)
    labels_seq = read_image_labels(path, LABELS, ImageCoder(), RejectLog())
    monkeypatch.setattr(oid_files, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(oid_files, "PARALLEL_RANGE_BYTES", range_bytes)
    monkeypatch.setattr(oid_files, "_parse_workers", lambda uri, typed: workers if typed else 1)
    parallel = _read(path)
    labels_par = read_image_labels(path, LABELS, ImageCoder(), RejectLog())
    (t1, c1, l1), (t2, c2, l2) = sequential, parallel
    assert c1.ids == c2.ids and t1.rows_read == t2.rows_read == n - 1  # n + 1 lines, 2 malformed
    for name in ("image_code", "label", "boxes", "line", "offsets"):
        np.testing.assert_array_equal(getattr(t1, name), getattr(t2, name))
    for flag in t1.flags:
        np.testing.assert_array_equal(t1.flags[flag], t2.flags[flag])
    key = lambda log: sorted((r.reason, r.line, r.detail) for r in log.records)  # noqa: E731
    assert key(l1) == key(l2)
    assert {(r.reason, r.line) for r in l2.records} >= {(R.MALFORMED_ROW, 3001), (R.MALFORMED_ROW, 4502),
                                                          (R.UNKNOWN_MID, 41), (R.BOX_OUTSIDE_IMAGE, 5202)}
    np.testing.assert_array_equal(labels_seq.image_code, labels_par.image_code)
    np.testing.assert_array_equal(labels_seq.label, labels_par.label)


def test_a_non_number_in_a_later_range_falls_back_to_the_cell_by_cell_path(tmp_path, monkeypatch):
    import data_prep.oid_files as oid_files

    rows = [TRAIN_HEADER] + [f"i{k:05d},xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0" for k in range(3000)]
    rows[2500] = rows[2500].replace(",0.1,", ",abc,")
    path = _write(tmp_path, "bad.csv", "\n".join(rows) + "\n")
    monkeypatch.setattr(oid_files, "BLOCK_SIZE", 8192)
    monkeypatch.setattr(oid_files, "_parse_workers", lambda uri, typed: 2 if typed else 1)
    table, coder, log = _read(path)
    assert len(table) == 2999 and len(coder) == 3000
    assert [(r.reason, r.line) for r in log.records] == [(R.MALFORMED_ROW, 2501)]


def _rows(n: int) -> list[str]:
    return [f"img{i:02d},xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0" for i in range(n)]


@pytest.mark.parametrize("bad, reason, detail", [
    ('img10,"xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0', None, None),  # in a column prep does not read: costs nothing
    ('"img10,xclick,/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0', R.MALFORMED_ROW, 'a stray quote (") in ImageID'),
    ('img10,xclick,"/m/a,1,0.1,0.5,0.2,0.6,0,0,0,0,0', R.MALFORMED_ROW, 'a stray quote (") in LabelName'),
    ('img10,xclick,/m/a",1,0.1,0.5,0.2,0.6,0,0,0,0,0', R.UNKNOWN_MID, """'/m/a"' is not in the label space"""),
    ('img10,xclick,/m/a,1,"0.1,0.5,0.2,0.6,0,0,0,0,0', R.MALFORMED_ROW, "not a number"),
])
def test_a_stray_quote_costs_its_own_row_only(tmp_path, bad, reason, detail):
    rows = _rows(40)
    rows[10] = bad  # line 12
    table, coder, log = _read(_write(tmp_path, "boxes.csv", "\n".join([TRAIN_HEADER, *rows]) + "\n"))
    assert table.rows_read == 40
    if detail is None:
        assert len(log) == 0 and len(table) == 40
        return
    (reject,) = log.records
    assert reject.line == 12 and reject.reason == reason and detail in reject.detail
    assert len(table) == 39 and 12 not in table.line.tolist() and table.line.tolist()[-1] == 41


def test_a_file_quoted_throughout_reads_as_the_plain_one(tmp_path):
    rows = _rows(5)
    quoted = [",".join(f'"{cell}"' for cell in row.split(",")) for row in [TRAIN_HEADER, *rows]]
    plain, _, _ = _read(_write(tmp_path, "plain.csv", "\n".join([TRAIN_HEADER, *rows]) + "\n"))
    table, coder, log = _read(_write(tmp_path, "quoted.csv", "\n".join(quoted) + "\n"))
    assert len(log) == 0 and coder.ids == [f"img{i:02d}" for i in range(5)]
    np.testing.assert_array_equal(table.boxes, plain.boxes)
    assert table.label.tolist() == plain.label.tolist()


def test_bytes_that_are_not_utf8_cost_their_own_row_only(tmp_path):
    data = ("\n".join([TRAIN_HEADER, *_rows(40)]) + "\n").encode()
    data = data.replace(b"img10,", b"img1\xff0,").replace(b"img20,xclick,/m/a", b"img20,xclick,/m/\xc3\xa9")
    path = tmp_path / "boxes.csv"
    path.write_bytes(data)
    table, coder, log = _read(str(path))
    assert dict(log.counts) == {R.MALFORMED_ROW: 1, R.UNKNOWN_MID: 1}  # valid UTF-8 that is no class: unknown
    by_line = {r.line: r for r in log.records}
    assert "not UTF-8 in ImageID" in by_line[12].detail and "'/m/é'" in by_line[22].detail
    assert len(table) == 38 and "img20" in coder.ids


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow, fast path
def test_image_label_files_get_the_same_rules(tmp_path):
    lines = ["ImageID,Source,LabelName,Confidence"] + [f"img{i:02d},verification,/m/b,1" for i in range(20)]
    lines[5] = 'img04,verification,"/m/b,1'
    data = ("\n".join(lines) + "\n").encode().replace(b"img09,", b"img\xfe09,")
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    coder, log = ImageCoder(), RejectLog()
    table = read_image_labels(str(path), LABELS, coder, log)
    assert table.rows_read == 20 and len(table.label) == 18
    assert sorted(r.line for r in log.records) == [6, 11]


def test_a_header_that_is_not_utf8_is_refused_naming_line_1(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_bytes(TRAIN_HEADER.replace("Source", "Sour\xffce").encode("latin-1") + b"\n" + _rows(1)[0].encode())
    with pytest.raises(InputError, match=r"boxes.csv:1: the header is not UTF-8"):
        _read(str(path))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow, fast path
def test_a_short_row_that_is_not_utf8_either_is_refused_naming_its_line(tmp_path):
    data = ("\n".join([TRAIN_HEADER, *_rows(5)]) + "\n").encode() + b"img\xff9,xclick\n"
    path = tmp_path / "boxes.csv"
    path.write_bytes(data)
    with pytest.raises(InputError, match=r"boxes.csv:7: cannot read as CSV .*fix or delete that line"):
        _read(str(path))


def test_parallel_batches_parse_at_most_a_window_of_ranges_at_once(tmp_path):
    """Range k + window starts only when the consumer has finished range k: only the window's
    ranges hold parsed batches, whatever the file's size; the order stays the file's."""
    import threading
    import time

    from data_prep.csv_ranges import parallel_batches

    path = _write(tmp_path, "r.csv", "x\n" * 10)
    ranges = [(k, k + 1) for k in range(10)]
    running, peak, lock = set(), [0], threading.Lock()

    def open_reader(k, stream):
        with lock:
            running.add(k)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.05)  # a parse takes a while: ranges started together overlap
        yield from (f"{k}.{j}" for j in range(3))
        with lock:
            running.discard(k)

    got = list(parallel_batches(str(path), ranges, open_reader, window=3))
    assert got == [f"{k}.{j}" for k in range(10) for j in range(3)]
    assert peak[0] == 3
