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
import io
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep import rejects as R
from data_prep.boxes import normalized_to_pixels
from data_prep.images import ImageRejected, check_image
from data_prep.rejects import Reject
from data_prep.storage import Storage

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
        h.update(json.dumps([self.split, self.index, self.image_ids, self.sources, source_sizes,
                             asdict(settings)]).encode())
        for arr in (self.box_counts, self.box_label, self.box_norm, self.box_flags, self.label_counts,
                    self.image_label, self.image_label_positive):
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
    skipped: bool = False  # found complete from an earlier run


def _expand(labels: np.ndarray, boxes: np.ndarray, flags: np.ndarray, up: np.ndarray):
    """Add a box for every ancestor class (deduplicated per class and box); mark the added ones."""
    if len(labels) == 0:
        return labels, boxes, flags, np.zeros(0, np.int8)
    rows, classes = np.nonzero(up[labels.astype(np.int64)])
    is_added = (classes != labels[rows]).astype(np.int8)
    out_boxes = boxes[rows]
    out_flags = flags[rows]
    # keep the first occurrence of each (class, box): originals come first for each row
    key = np.concatenate([classes[:, None].astype(np.float64), out_boxes.astype(np.float64),
                          out_flags[:, 2:3].astype(np.float64)], axis=1)
    order = np.lexsort((np.arange(len(rows)), is_added))  # originals first, then file order
    _, first = np.unique(key[order], axis=0, return_index=True)
    keep = np.sort(order[first])
    return classes[keep].astype(np.int16), out_boxes[keep], out_flags[keep], is_added[keep]


def _sample_json(spec: ShardSpec, i: int, width: int, height: int, orig_w: int, orig_h: int,
                 b0: int, b1: int, l0: int, l1: int, up: np.ndarray | None, changes: list[str]) -> dict:
    labels, boxes, flags = spec.box_label[b0:b1], spec.box_norm[b0:b1], spec.box_flags[b0:b1]
    pos = spec.image_label[l0:l1][spec.image_label_positive[l0:l1]].astype(np.int64)
    neg = spec.image_label[l0:l1][~spec.image_label_positive[l0:l1]].astype(np.int64)
    if up is not None:
        labels, boxes, flags, added = _expand(labels, boxes, flags, up)
        pos = np.flatnonzero(up[pos].any(axis=0)) if len(pos) else pos
        neg = np.flatnonzero(up[:, neg].any(axis=1)) if len(neg) else neg
    else:
        added = np.zeros(len(labels), np.int8)
        pos, neg = np.unique(pos), np.unique(neg)
    pixels = normalized_to_pixels(boxes, width, height)
    sample = {
        "image_id": spec.image_ids[i],
        "width": width,
        "height": height,
        "orig_width": orig_w,
        "orig_height": orig_h,
        "boxes": [[round(float(v), 2) for v in b] for b in pixels],
        "boxes_norm": [[round(float(v), 6) for v in b] for b in boxes],
        "labels": [int(v) for v in labels],
        "is_expanded": [int(v) for v in added],
        "image_labels_pos": [int(v) for v in pos],
        "image_labels_neg": [int(v) for v in neg],
        "changes": changes,
    }
    for k, key in enumerate(FLAG_KEYS):
        sample[key] = [int(v) for v in flags[:, k]]
    return sample


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    data_offset = tar.offset - ((len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return data_offset, len(data)


def write_shard(spec: ShardSpec, images: Storage, out: Storage, settings: ImageSettings,
                up: np.ndarray | None) -> ShardResult:
    """Write, publish and report one shard. Bad images are skipped and reported, never fatal."""
    box_ends = np.cumsum(spec.box_counts)
    label_ends = np.cumsum(spec.label_counts)
    result = ShardResult(spec.split, spec.index, spec.name, spec.fingerprint, "", 0)
    staging = out.staging_dir() if hasattr(out, "staging_dir") else tempfile.gettempdir()
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".tmp", dir=staging)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (image_id, source) in enumerate(zip(spec.image_ids, spec.sources, strict=True)):
                b1, l1 = int(box_ends[i]), int(label_ends[i])
                b0, l0 = b1 - int(spec.box_counts[i]), l1 - int(spec.label_counts[i])
                try:
                    raw = images.read_bytes(source)
                    checked = check_image(raw, settings.resize_short_side, settings.resize_max_long_side,
                                          settings.jpeg_quality, settings.verify_decode)
                except ImageRejected as exc:
                    result.rejects.append(asdict(Reject(exc.reason, images.uri(source), exc.detail,
                                                        image_id=image_id)))
                    continue
                except OSError as exc:
                    result.rejects.append(asdict(Reject(R.MISSING_IMAGE, images.uri(source), str(exc),
                                                        image_id=image_id)))
                    continue
                for change in checked.changes:
                    result.changes[change] = result.changes.get(change, 0) + 1
                sample = _sample_json(spec, i, checked.width, checked.height, checked.orig_width,
                                      checked.orig_height, b0, b1, l0, l1,
                                      up if settings.expand_labels else None, checked.changes)
                meta = json.dumps(sample, sort_keys=True, separators=(",", ":")).encode()
                jpg_offset, jpg_size = _add_member(tar, f"{image_id}.jpg", checked.data)
                json_offset, json_size = _add_member(tar, f"{image_id}.json", meta)
                for c in sample["labels"]:
                    result.box_counts[str(c)] = result.box_counts.get(str(c), 0) + 1
                result.samples.append({
                    "key": image_id, "shard": spec.name, "jpg_offset": jpg_offset, "jpg_size": jpg_size,
                    "json_offset": json_offset, "json_size": json_size, "width": checked.width,
                    "height": checked.height, "labels": sorted(set(sample["labels"])),
                    "num_boxes": len(sample["labels"]),
                })
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        result.sha256 = h.hexdigest()
        result.bytes = os.path.getsize(tmp)
        out.put_file(spec.name, tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    out.put_bytes(report_name(spec.split, spec.index),
                  json.dumps(asdict(result), sort_keys=True).encode())
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
    if result.fingerprint != spec.fingerprint or not out.exists(spec.name) or out.size(spec.name) != result.bytes:
        return None
    result.skipped = True
    return result
