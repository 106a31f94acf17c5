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

import contextlib
import hashlib
import json
import mmap
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


def _image_labels(spec: ShardSpec, l0: int, l1: int, up: np.ndarray | None) -> tuple[list[int], list[int]]:
    """Verified positives (expanded up) and negatives (expanded down) of one image."""
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

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def send_file(self, fd: int, content) -> None:
        """Append the whole file ``fd`` (whose bytes are ``content``) without copying it through Python."""
        self.sha256.update(content)
        self._f.flush()
        out, offset, size = self._f.fileno(), 0, len(content)
        while offset < size:
            sent = os.sendfile(out, fd, offset, size - offset)
            if sent == 0:
                raise OSError(f"sendfile stopped at {offset} of {size} bytes")
            offset += sent


_USTAR_FIXED = b"0000444\0" b"0000000\0" b"0000000\0"  # mode 0444, uid 0, gid 0


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
    header = bytearray(tarfile.BLOCKSIZE)
    header[: len(raw)] = raw
    header[100:124] = _USTAR_FIXED
    header[124:148] = b"%011o\0%011o\0" % (size, TAR_MTIME)
    header[148:157] = b"        0"  # checksum counted as spaces; type: regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class _TarWriter:
    """A minimal reproducible USTAR writer that knows where each member's data starts.

    Members get fixed metadata (mtime 0, mode 0444, uid/gid 0, no user names); the archive ends
    with two zero blocks padded to a 10 KiB record, like GNU tar and Python's tarfile.
    """

    def __init__(self, f: _HashingWriter) -> None:
        self._f = f
        self.offset = 0

    def add(self, name: str, data, source_fd: int | None = None) -> tuple[int, int]:
        """Append a member; with ``source_fd`` (a file whose whole content is ``data``, e.g. its mmap)
        the bytes are hashed from ``data`` and copied by the kernel (``os.sendfile``)."""
        header = ustar_header(name, len(data))
        pad = -len(data) % tarfile.BLOCKSIZE
        self._f.write(header)
        if source_fd is None:
            self._f.write(data)
        else:
            self._f.send_file(source_fd, data)
        if pad:
            self._f.write(b"\0" * pad)
        data_offset = self.offset + len(header)
        self.offset = data_offset + len(data) + pad
        return data_offset, len(data)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self._f.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


@contextlib.contextmanager
def _open_source(images: Storage, source: str):
    """``(content, fd)`` of an image: a read-only mmap and its descriptor for local files (no copy),
    the bytes and None otherwise (S3, empty files)."""
    if isinstance(images, LocalStorage):
        fd = os.open(images.local_path(source), os.O_RDONLY)
        try:
            if os.fstat(fd).st_size > 0:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                    yield mm, fd
                    return
        finally:
            os.close(fd)
    yield images.read_bytes(source), None


def write_shard(
    spec: ShardSpec, images: Storage, out: Storage, settings: ImageSettings, up: np.ndarray | None
) -> ShardResult:
    """Write, publish and report one shard. Bad images are skipped and reported, never fatal."""
    up = up if settings.expand_labels else None
    targets = _box_targets(spec, up)
    box_ends = np.cumsum(targets.counts)
    label_ends = np.cumsum(spec.label_counts)
    result = ShardResult(spec.split, spec.index, spec.name, spec.fingerprint, "", 0)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".tmp", dir=out.staging_dir())
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            tar = _TarWriter(writer)
            for i, (image_id, source) in enumerate(zip(spec.image_ids, spec.sources, strict=True)):
                try:
                    with _open_source(images, source) as (raw, fd):
                        checked = check_image(raw, settings.resize_short_side, settings.resize_max_long_side,
                                              settings.jpeg_quality, settings.verify_decode)
                        if checked.data is raw and fd is not None:  # unchanged local file: no copy
                            jpg_offset, jpg_size = tar.add(f"{image_id}.jpg", raw, fd)
                        else:  # re-encoded bytes, or the original bytes read from S3
                            jpg_offset, data = None, checked.data
                except ImageRejected as exc:
                    result.rejects.append(asdict(Reject(exc.reason, images.uri(source), exc.detail,
                                                        image_id=image_id)))
                    continue
                except (OSError, InputError) as exc:
                    result.rejects.append(asdict(Reject(R.MISSING_IMAGE, images.uri(source), str(exc),
                                                        image_id=image_id)))
                    continue
                if jpg_offset is None:
                    jpg_offset, jpg_size = tar.add(f"{image_id}.jpg", data)
                for change in checked.changes:
                    result.changes[change] = result.changes.get(change, 0) + 1
                b1, l1 = int(box_ends[i]), int(label_ends[i])
                b0, l0 = b1 - int(targets.counts[i]), l1 - int(spec.label_counts[i])
                labels = targets.labels[b0:b1].tolist()
                norm = targets.boxes[b0:b1]
                pixels = normalized_to_pixels(norm, checked.width, checked.height)
                pos, neg = _image_labels(spec, l0, l1, up)
                sample = {
                    "image_id": image_id,
                    "width": checked.width,
                    "height": checked.height,
                    "orig_width": checked.orig_width,
                    "orig_height": checked.orig_height,
                    "boxes": np.round(pixels.astype(np.float64), 2).tolist(),
                    "boxes_norm": np.round(norm.astype(np.float64), 6).tolist(),
                    "labels": labels,
                    "is_expanded": targets.added[b0:b1].tolist(),
                    "image_labels_pos": pos,
                    "image_labels_neg": neg,
                    "changes": checked.changes,
                }
                flags = targets.flags[b0:b1].T.tolist()
                for k, key in enumerate(FLAG_KEYS):
                    sample[key] = flags[k] if flags else []
                meta = json.dumps(sample, sort_keys=True, separators=(",", ":")).encode()
                json_offset, json_size = tar.add(f"{image_id}.json", meta)
                result.annotated_boxes += int((targets.added[b0:b1] == 0).sum())
                for c in labels:
                    result.box_counts[str(c)] = result.box_counts.get(str(c), 0) + 1
                result.samples.append(
                    {
                        "key": image_id,
                        "shard": spec.name,
                        "jpg_offset": jpg_offset,
                        "jpg_size": jpg_size,
                        "json_offset": json_offset,
                        "json_size": json_size,
                        "width": checked.width,
                        "height": checked.height,
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
