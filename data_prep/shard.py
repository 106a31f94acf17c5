"""Writing one webdataset shard: the unit of work of a prep task.

A shard is a plain tar of samples keyed by ImageID, each a ``.jpg`` member followed by a
``.json`` member (boxes normalized and in pixels, class indices, OID flags, image-level labels,
sizes). Tars are reproducible: members are written in plan order with fixed mtime, mode and
owner, and the JSON is canonical, so a re-run produces byte-identical files. A shard is written
to a temporary file and published atomically (rename, or one S3 upload completed at the end);
then its report (sample offsets for the index, rejects, sha256) is published next to it. A shard
counts as done only when both exist and the report's plan fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep import rejects as R
from data_prep.boxes import normalized_to_pixels
from data_prep.errors import InputError
from data_prep.images import ImageRejected, check_image
from data_prep.rejects import Reject
from data_prep.storage import LocalStorage, Storage

REPORT_DIR = "_shards"
TAR_MTIME = 0
FLAG_KEYS = ("is_occluded", "is_truncated", "is_group_of", "is_depiction", "is_inside")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def report_name(split: str, index: int) -> str:
    return f"{REPORT_DIR}/{split}-{index:06d}.json"


@dataclass
class ImageSettings:
    """What decides the bytes of a stored image (part of every shard's fingerprint)."""

    resize_short_side: int | None = None
    resize_max_long_side: int | None = None
    jpeg_quality: int = 90
    verify_decode: bool = False
    expand_labels: bool = True


@dataclass
class ShardSpec:
    """Everything one task needs to write one shard, as compact arrays (cheap to ship to a worker).

    Per image ``i`` (plan order): ``image_ids[i]``, ``sources[i]`` (object name in the image
    storage), its ``box_counts[i]`` rows of the box arrays and ``label_counts[i]`` rows of the
    image-level label arrays, both concatenated in image order.
    """

    split: str
    index: int
    image_ids: list[str]
    sources: list[str]
    box_counts: np.ndarray  # int32 [n]
    box_label: np.ndarray  # int16 [B]
    box_norm: np.ndarray  # float32 [B, 4] normalized x1, y1, x2, y2
    box_flags: np.ndarray  # int8 [B, 5] in FLAG_KEYS order; -1 unknown
    label_counts: np.ndarray  # int32 [n]
    image_label: np.ndarray  # int16 [L]
    image_label_positive: np.ndarray  # bool [L]
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def compute_fingerprint(self, settings: ImageSettings, source_sizes: list[int]) -> str:
        h = hashlib.sha256()
        h.update(
            json.dumps(
                [self.split, self.index, self.image_ids, self.sources, source_sizes, asdict(settings)]
            ).encode()
        )
        for arr in (
            self.box_counts,
            self.box_label,
            self.box_norm,
            self.box_flags,
            self.label_counts,
            self.image_label,
            self.image_label_positive,
        ):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


@dataclass
class ShardResult:
    """What a task reports back (and publishes as the shard's report)."""

    split: str
    index: int
    name: str
    fingerprint: str
    sha256: str
    bytes: int
    samples: list[dict] = field(default_factory=list)  # one index row per written sample
    rejects: list[dict] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    box_counts: dict[str, int] = field(default_factory=dict)  # class index -> boxes written (expanded)
    annotated_boxes: int = 0  # boxes written that came from the CSV (not added for an ancestor class)
    skipped: bool = False  # found complete from an earlier run


@dataclass
class _Targets:
    """The training targets of every image of a shard, concatenated in image order."""

    counts: np.ndarray  # boxes per image (after expansion)
    labels: np.ndarray
    boxes: np.ndarray  # normalized x1, y1, x2, y2
    flags: np.ndarray  # [B, 5] in FLAG_KEYS order
    added: np.ndarray  # 1 for boxes added for an ancestor class


def _box_targets(spec: ShardSpec, up: np.ndarray | None) -> _Targets:
    """Boxes of the whole shard, expanded with one box per ancestor class when ``up`` is given.

    Done once per shard with array operations. An added box that repeats an existing (class, box,
    group-of) of its image is dropped; originals come first within each image, in file order.
    """
    labels, boxes, flags = spec.box_label, spec.box_norm, spec.box_flags
    if up is None or len(labels) == 0:
        return _Targets(spec.box_counts, labels, boxes, flags, np.zeros(len(labels), np.int8))
    image = np.repeat(np.arange(len(spec.box_counts), dtype=np.int32), spec.box_counts)
    rows, classes = np.nonzero(up[labels.astype(np.int64)])
    added = (classes != labels[rows]).astype(np.int8)
    order = np.lexsort((np.arange(len(rows)), added, image[rows]))  # image, originals first, position
    rows, classes, added = rows[order], classes[order], added[order]
    key = np.zeros(len(rows), dtype=[("image", "<i4"), ("cls", "<i4"), ("box", "<f4", (4,)), ("group", "i1")])
    key["image"], key["cls"], key["box"], key["group"] = image[rows], classes, boxes[rows], flags[rows, 2]
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    rows, classes, added = rows[keep], classes[keep], added[keep]
    counts = np.bincount(image[rows], minlength=len(spec.box_counts)).astype(np.int32)
    return _Targets(counts, classes.astype(np.int16), boxes[rows], flags[rows], added)


def _pixel_boxes(norm: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Normalized boxes ``[n, 4]`` in pixels of a ``width`` x ``height`` image, 2 decimals."""
    if len(norm) == 0:
        return []
    return np.round(normalized_to_pixels(norm, width, height).astype(np.float64), 2).tolist()


def _image_labels(spec: ShardSpec, l0: int, l1: int, up: np.ndarray | None) -> tuple[list[int], list[int]]:
    """Verified positives (expanded up) and negatives (expanded down) of one image."""
    if l0 == l1:
        return [], []
    labels, positive = spec.image_label[l0:l1].astype(np.int64), spec.image_label_positive[l0:l1]
    pos, neg = labels[positive], labels[~positive]
    if up is None:
        return np.unique(pos).tolist(), np.unique(neg).tolist()
    pos = np.flatnonzero(up[pos].any(axis=0)) if len(pos) else pos
    neg = np.flatnonzero(up[:, neg].any(axis=1)) if len(neg) else neg
    return pos.tolist(), neg.tolist()


class _HashingWriter:
    """A write-only file wrapper that computes the sha256 of everything written through it."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._f.write(data)


_USTAR_FIXED = b"0000444\0" b"0000000\0" b"0000000\0"  # mode 0444, uid 0, gid 0
_USTAR_MTIME = b"%011o\0" % TAR_MTIME
_USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247  # type, link name, magic, rest
# The checksum counts its own 8 bytes as spaces; everything but the name and size is fixed.
_USTAR_FIXED_SUM = sum(_USTAR_FIXED) + sum(_USTAR_MTIME) + 8 * 32 + sum(_USTAR_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file with our fixed metadata (mode 0444, uid/gid 0,
    no user names, mtime ``TAR_MTIME``): byte for byte what ``tarfile`` writes, ten times faster
    (two headers per sample). Long or non-ASCII names and huge sizes go through ``tarfile``."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_USTAR_FIXED_SUM + sum(raw) + sum(size_field))
    return raw.ljust(100, b"\0") + _USTAR_FIXED + size_field + _USTAR_MTIME + checksum + _USTAR_TAIL


_SMALL_MEMBER = 1 << 16
_ZEROS = bytes(tarfile.BLOCKSIZE)


class _TarWriter:
    """A minimal reproducible USTAR writer that knows where each member's data starts.

    Members get fixed metadata (mtime 0, mode 0444, uid/gid 0, no user names); the archive ends
    with two zero blocks padded to a 10 KiB record, like GNU tar and Python's tarfile.
    """

    def __init__(self, f: _HashingWriter) -> None:
        self._f = f
        self.offset = 0

    def add(self, name: str, data) -> tuple[int, int]:
        """Append a member (``data``: any bytes-like object); returns its data offset and size."""
        header = ustar_header(name, len(data))
        pad = -len(data) % tarfile.BLOCKSIZE
        if len(data) < _SMALL_MEMBER:  # one write (and one hash update) for a small member
            self._f.write(b"".join((header, data, _ZEROS[:pad])))
        else:
            self._f.write(header)
            self._f.write(data)
            self._f.write(_ZEROS[:pad])
        data_offset = self.offset + len(header)
        self.offset = data_offset + len(data) + pad
        return data_offset, len(data)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self._f.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


class _SourceReader:
    """Reads source images; local files go into one reused buffer.

    Reading every file of a shard into the same buffer keeps the pages warm in the CPU caches
    between the read, the header check, the checksum and the write, and saves a page fault per
    4 KiB that a fresh ``bytes`` (or an mmap) of each file costs. The view returned by ``read``
    is valid until the next call.
    """

    def __init__(self, images: Storage, initial_bytes: int = 1 << 20) -> None:
        self._images = images
        self._local = isinstance(images, LocalStorage)
        self._buffer = bytearray(initial_bytes)

    def read(self, source: str):
        if not self._local:
            return self._images.read_bytes(source)
        path = self._images.local_path(source)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        try:
            size = os.fstat(fd).st_size
            if size + 1 > len(self._buffer):  # one spare byte: a file that grew is read to its end
                self._buffer = bytearray(max(size + 1, 2 * len(self._buffer)))
            view, filled = memoryview(self._buffer), 0
            while True:
                n = os.readv(fd, [view[filled:]])
                if n == 0:
                    return view[:filled]
                filled += n
                if filled == len(view):  # more than fstat said (a file still being written, /proc)
                    grown = bytearray(2 * len(view))  # a new buffer: views of the old one may live on
                    grown[:filled] = view
                    self._buffer, view = grown, memoryview(grown)
        finally:
            os.close(fd)


def write_shard(
    spec: ShardSpec, images: Storage, out: Storage, settings: ImageSettings, up: np.ndarray | None
) -> ShardResult:
    """Write, publish and report one shard. Bad images are skipped and reported, never fatal.

    Per image only the file I/O, the header check and the JSON are done: the targets of the whole
    shard are converted to Python lists once, and the counts are taken over the shard at the end.
    """
    up = up if settings.expand_labels else None
    targets = _box_targets(spec, up)
    box_ends = np.cumsum(targets.counts).tolist()
    label_ends = np.cumsum(spec.label_counts).tolist()
    labels_all = targets.labels.tolist()
    norm_all = np.round(targets.boxes.astype(np.float64), 6).tolist()
    added_all = targets.added.tolist()
    flags_all = targets.flags.T.tolist()  # one list per flag, over all boxes
    written = np.zeros(len(spec.image_ids), bool)
    result = ShardResult(spec.split, spec.index, spec.name, spec.fingerprint, "", 0)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".tmp", dir=out.staging_dir())
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            tar = _TarWriter(writer)
            reader = _SourceReader(images)
            b1 = l1 = 0
            for i, (image_id, source) in enumerate(zip(spec.image_ids, spec.sources, strict=True)):
                b0, b1, l0, l1 = b1, box_ends[i], l1, label_ends[i]
                try:
                    checked = check_image(reader.read(source), settings.resize_short_side,
                                          settings.resize_max_long_side, settings.jpeg_quality,
                                          settings.verify_decode)
                except ImageRejected as exc:
                    result.rejects.append(asdict(Reject(exc.reason, images.uri(source), exc.detail,
                                                        image_id=image_id)))
                    continue
                except (OSError, InputError) as exc:
                    result.rejects.append(asdict(Reject(R.MISSING_IMAGE, images.uri(source), str(exc),
                                                        image_id=image_id)))
                    continue
                jpg_offset, jpg_size = tar.add(f"{image_id}.jpg", checked.data)
                for change in checked.changes:
                    result.changes[change] = result.changes.get(change, 0) + 1
                width, height = checked.width, checked.height
                labels = labels_all[b0:b1]
                pos, neg = _image_labels(spec, l0, l1, up)
                sample = {
                    "image_id": image_id,
                    "width": width,
                    "height": height,
                    "orig_width": checked.orig_width,
                    "orig_height": checked.orig_height,
                    "boxes": _pixel_boxes(targets.boxes[b0:b1], width, height),
                    "boxes_norm": norm_all[b0:b1],
                    "labels": labels,
                    "is_expanded": added_all[b0:b1],
                    "image_labels_pos": pos,
                    "image_labels_neg": neg,
                    "changes": checked.changes,
                }
                for key, values in zip(FLAG_KEYS, flags_all, strict=True):
                    sample[key] = values[b0:b1]
                meta = json.dumps(sample, sort_keys=True, separators=(",", ":")).encode()
                json_offset, json_size = tar.add(f"{image_id}.json", meta)
                written[i] = True
                result.samples.append(
                    {
                        "key": image_id,
                        "shard": spec.name,
                        "jpg_offset": jpg_offset,
                        "jpg_size": jpg_size,
                        "json_offset": json_offset,
                        "json_size": json_size,
                        "width": width,
                        "height": height,
                        "labels": sorted(set(labels)),
                        "num_boxes": len(labels),
                    }
                )
            tar.close()
            result.sha256 = writer.sha256.hexdigest()
            f.flush()
            result.bytes = f.tell()
        out.put_file(spec.name, tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    kept = np.repeat(written, targets.counts)
    per_class = np.bincount(targets.labels[kept].astype(np.int64))
    result.box_counts = {str(c): int(n) for c, n in enumerate(per_class.tolist()) if n}
    result.annotated_boxes = int((targets.added[kept] == 0).sum())
    out.put_bytes(report_name(spec.split, spec.index), json.dumps(vars(result), sort_keys=True).encode())
    return result


def load_complete(spec: ShardSpec, out: Storage) -> ShardResult | None:
    """The published result of a shard if it is complete and was written from the same plan."""
    name = report_name(spec.split, spec.index)
    if not out.exists(name):
        return None
    try:
        data = json.loads(out.read_bytes(name))
        result = ShardResult(**data)
    except (ValueError, TypeError):
        return None
    if (
        result.fingerprint != spec.fingerprint
        or not out.exists(spec.name)
        or out.size(spec.name) != result.bytes
    ):
        return None
    result.skipped = True
    return result
