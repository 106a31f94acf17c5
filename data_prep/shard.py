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

import base64
import hashlib
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep import rejects as R
from data_prep.boxes import normalized_to_pixels
from data_prep.errors import InputError
from data_prep.images import ImageRejected, check_image
from data_prep.index import INDEX_COLUMNS
from data_prep.rejects import Reject
from data_prep.storage import FILE_MODE, LocalStorage, Storage

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
    max_image_pixels: int = 100_000_000


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
    # the index rows of the written samples as columns (INDEX_COLUMNS): a few lists cross from the
    # task to the driver ~4x faster than one dict per sample (~2 ms per shard task)
    index_columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in INDEX_COLUMNS})
    rejects: list[dict] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    box_counts: dict[str, int] = field(default_factory=dict)  # class index -> boxes written (expanded)
    annotated_boxes: int = 0  # boxes written that came from the CSV (not added for an ancestor class)
    skipped: bool = False  # found complete from an earlier run
    # whole-file CRC32 (base64, S3's spelling), computed while writing when the output keeps checksums
    # (S3): the upload is checked against it and `tsd prep --verify` compares it with one HEAD request
    crc32: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.index_columns["key"])


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


_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(tarfile.RECORDSIZE)


class _TarStream:
    """A reproducible USTAR archive written to a file descriptor through one buffer, and its sha256.

    A sample's members are assembled in the buffer, a local source file read straight into its
    member's place (``_SourceReader.read_into``); then the sample is hashed and written in one go,
    while it is still in the CPU caches: its bytes are copied once on the way in and once on the
    way out, with one hash update and one write per sample. (Gathering ~1 MiB before writing
    saves system calls but costs more: by then the first samples have left the L2 cache.)
    Members get fixed metadata (mtime 0, mode 0444, uid/gid 0, no user names); the archive ends
    with two zero blocks padded to a 10 KiB record, like GNU tar and Python's tarfile.
    """

    def __init__(self, fd: int, capacity: int = 1 << 20, crc32: bool = False) -> None:
        self._fd = fd
        self._buffer = bytearray(capacity)
        self._pending = 0  # bytes of the sample being assembled
        self._written = 0  # bytes written to the file
        self.sha256 = hashlib.sha256()
        self._crc32 = 0 if crc32 else None  # zlib's CRC32, updated per sample with the sha256

    @property
    def crc32(self) -> str | None:
        """The archive's CRC32 as S3 spells it (base64 of 4 big-endian bytes); None when not kept."""
        if self._crc32 is None:
            return None
        return base64.b64encode(self._crc32.to_bytes(4, "big")).decode()

    @property
    def offset(self) -> int:
        """The size of the archive so far (where the next member's header goes)."""
        return self._written + self._pending

    def data_area(self, size: int, keep: int = 0) -> memoryview:
        """Room for the data of the next member: ``size`` bytes after its header. The first
        ``keep`` bytes already put in an earlier area of this member are kept."""
        need = self._pending + 2 * _BLOCK + size  # header, data, padding
        if need > len(self._buffer):  # a new buffer: views of the old one may still be held
            grown = bytearray(max(need, 2 * len(self._buffer)))
            used = self._pending + _BLOCK + keep
            grown[:used] = memoryview(self._buffer)[:used]
            self._buffer = grown
        start = self._pending + _BLOCK
        return memoryview(self._buffer)[start : start + size]

    def add_in_place(self, name: str, size: int) -> tuple[int, int]:
        """Finish a member whose ``size`` bytes of data were put in ``data_area``; returns the
        offset of its data in the archive, and its size."""
        buffer, start = self._buffer, self._pending
        buffer[start : start + _BLOCK] = ustar_header(name, size)
        end = start + _BLOCK + size
        pad = -size % _BLOCK
        buffer[end : end + pad] = _ZEROS[:pad]
        self._pending = end + pad
        return self._written + start + _BLOCK, size

    def add(self, name: str, data) -> tuple[int, int]:
        """Append a member (``data``: any bytes-like object)."""
        self.data_area(len(data))[:] = data
        return self.add_in_place(name, len(data))

    def end_sample(self) -> None:
        """Hash and write the members added since the last call."""
        view = memoryview(self._buffer)[: self._pending]
        self.sha256.update(view)
        if self._crc32 is not None:
            self._crc32 = zlib.crc32(view, self._crc32)
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += self._pending
        self._pending = 0

    def close(self) -> None:
        """End the archive and write everything out (the file descriptor stays open)."""
        end = self.offset + 2 * _BLOCK
        tail = 2 * _BLOCK + (-end % tarfile.RECORDSIZE)
        self.data_area(tail)  # room for it
        self._buffer[self._pending : self._pending + tail] = bytes(tail)
        self._pending += tail
        self.end_sample()


class _SourceReader:
    """Reads source images into the member that will hold them (local files), or as bytes (S3)."""

    def __init__(self, images: Storage) -> None:
        self._images = images
        self._local = isinstance(images, LocalStorage)

    def read_into(self, source: str, tar: _TarStream):
        """The bytes of ``source``; a local file is read into ``tar.data_area`` and the returned
        view stays valid until the next member is added."""
        if not self._local:
            return self._images.read_bytes(source)
        path = self._images.local_path(source)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        try:
            size = os.fstat(fd).st_size
            area, filled = tar.data_area(size + 1), 0  # one spare byte: a file that grew is read to its end
            while True:
                n = os.readv(fd, [area[filled:]])
                filled += n
                if n == 0 or filled == size:  # the end, or a short read that brought what fstat said
                    return area[:filled]
                if filled == len(area):  # more than fstat said (a file still being written, /proc)
                    area = tar.data_area(2 * len(area), keep=filled)
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
    index_columns = [result.index_columns[name] for name in INDEX_COLUMNS]
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".tmp", dir=out.staging_dir())
    os.fchmod(fd, FILE_MODE)  # readable as any file the user writes, not mkstemp's 0600
    try:
        try:
            tar = _TarStream(fd, crc32=out.keeps_checksums)
            reader = _SourceReader(images)
            b1 = l1 = 0
            for i, (image_id, source) in enumerate(zip(spec.image_ids, spec.sources, strict=True)):
                b0, b1, l0, l1 = b1, box_ends[i], l1, label_ends[i]
                try:
                    raw = reader.read_into(source, tar)
                    checked = check_image(raw, settings.resize_short_side,
                                          settings.resize_max_long_side, settings.jpeg_quality,
                                          settings.verify_decode, settings.max_image_pixels)
                except ImageRejected as exc:
                    result.rejects.append(asdict(Reject(exc.reason, images.uri(source), exc.detail,
                                                        image_id=image_id)))
                    continue
                except (OSError, InputError) as exc:
                    result.rejects.append(asdict(Reject(R.MISSING_IMAGE, images.uri(source), str(exc),
                                                        image_id=image_id)))
                    continue
                if checked.data is raw and isinstance(raw, memoryview):  # already in its member's place
                    jpg_offset, jpg_size = tar.add_in_place(f"{image_id}.jpg", len(raw))
                else:
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
                tar.end_sample()
                written[i] = True
                for column, value in zip(index_columns, (image_id, jpg_offset, jpg_size, json_offset, json_size,
                                                         width, height, sorted(set(labels)), len(labels)),
                                         strict=True):
                    column.append(value)
            tar.close()
            result.sha256 = tar.sha256.hexdigest()
            result.crc32 = tar.crc32
            result.bytes = tar.offset
        finally:
            os.close(fd)
        out.put_file(spec.name, tmp, crc32=result.crc32)
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
