"""The prep job: official OID files + images -> webdataset shards, index and manifest.

Plan on the driver (read and validate the CSVs, list the images, assign images to shards with a
seeded shuffle), then write every shard in its own Ray task; shards that an earlier run completed
from the same plan are skipped, so a killed job resumes where it stopped. Finally the per-sample
index (Parquet) and ``manifest.json`` (counts, every reject, class statistics, shard checksums)
are published. The output may be a local directory or an ``s3://`` prefix.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep import rejects as R
from data_prep.class_subset import ClassSubset, class_subset
from data_prep.config import DataConfig, PrepConfig
from data_prep.errors import ConfigError, InputError
from data_prep.hierarchy import Hierarchy
from data_prep.index import index_name, write_index
from data_prep.labels import LabelSpace
from data_prep.oid_files import (
    BOX_FLAGS,
    BoxTable,
    ImageCoder,
    ImageLabelTable,
    pad_offsets,
    read_boxes,
    read_image_labels,
)
from data_prep.rejects import Reject, RejectLog
from data_prep.shard import ImageSettings, ShardResult, ShardSpec, load_complete, write_shard
from data_prep.storage import Storage, is_s3, join, open_storage, read_source

VERIFY_REPORT_FILE = "verify-report.json"
CLASSES_FILE = "classes-description.csv"
HIERARCHY_FILE = "label-hierarchy.json"
MANIFEST_FILE = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VALID_IMAGE_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset keys must not contain dots
TAR_OVERHEAD = 3 * 512 + 1024  # two tar headers, padding and a typical JSON member


def resolve(root: str, name: str) -> str:
    """A file of the dataset: absolute paths and URIs as given, others relative to ``root``."""
    if is_s3(name) or name.startswith("/"):
        return name
    return join(root, name)


def load_label_space(data: DataConfig) -> tuple[LabelSpace, Hierarchy]:
    uri = resolve(data.root, data.classes)
    if data.format == "coco":
        from data_prep.coco_files import coco_label_space

        return coco_label_space(uri, data.s3_endpoint_url)
    labels = LabelSpace.from_csv_text(read_source(uri, data.s3_endpoint_url).decode("utf-8-sig"), uri)
    huri = resolve(data.root, data.hierarchy)
    hierarchy = Hierarchy.from_json_text(read_source(huri, data.s3_endpoint_url).decode("utf-8"), huri)
    return labels, hierarchy


@dataclass
class SplitPlan:
    split: str
    shards: list[ShardSpec]
    images: Storage
    log: RejectLog
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)


def list_images(images: Storage, log: RejectLog) -> dict[str, tuple[str, int]]:
    """ImageID -> (object name, size) of every image file; a second file for one id is rejected."""
    found: dict[str, tuple[str, int]] = {}

    def unlisted(path: str, what: str) -> None:
        log.add(Reject(R.UNREADABLE_PATH, path, what))

    for info in sorted(images.list(on_problem=unlisted), key=lambda o: o.name):
        base = info.name.rsplit("/", 1)[-1]
        stem, dot, ext = base.rpartition(".")
        if not dot or "." + ext.lower() not in IMAGE_EXTENSIONS or base.startswith("."):
            continue
        if stem in found:
            log.add(
                Reject(
                    R.DUPLICATE_IMAGE_ID,
                    images.uri(info.name),
                    f"a second file for ImageID {stem}; keeping {found[stem][0]}",
                    image_id=stem,
                )
            )
            continue
        found[stem] = (info.name, info.size)
    return found


def _gather(offsets: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the groups ``codes`` (concatenated in order) and the count of each group."""
    starts, ends = offsets[codes], offsets[codes + 1]
    counts = (ends - starts).astype(np.int32)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64), counts
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + shift, counts


def _annotated(boxes: BoxTable | None, image_labels: ImageLabelTable | None, n: int, prep: PrepConfig) -> np.ndarray:
    """Images with a usable box, or (when ``prep.keep_images_without_boxes``) an image-level label."""
    box_count = np.zeros(n, np.int64) if boxes is None else np.diff(boxes.offsets)
    label_count = np.zeros(n, np.int64) if image_labels is None else np.diff(image_labels.offsets)
    return (box_count > 0) | ((label_count > 0) & prep.keep_images_without_boxes)


def plan_split(data: DataConfig, prep: PrepConfig, split: str, labels: LabelSpace,
               subset: ClassSubset | None = None) -> SplitPlan:
    """Read and validate one split's files and assign its images to shards (deterministic);
    with a class subset (``prep.classes``), only its annotations and the images that keep one."""
    if split not in data.splits:
        raise ConfigError(f"data.splits has no split '{split}' (configured: {sorted(data.splits)})")
    files = data.splits[split]
    if not files.boxes and not files.labels:
        raise ConfigError(f"data.splits.{split}: give 'boxes' and/or 'labels'")
    log = RejectLog(prep.max_rejects_listed)
    coder = ImageCoder()
    ep = data.s3_endpoint_url
    inputs = {
        "boxes": resolve(data.root, files.boxes) if files.boxes else None,
        "labels": resolve(data.root, files.labels) if files.labels else None,
        "images": resolve(data.root, files.images),
    }
    boxes: BoxTable | None = None
    image_labels: ImageLabelTable | None = None
    if inputs["boxes"] and data.format == "coco":
        from data_prep.coco_files import read_coco_boxes

        boxes = read_coco_boxes(inputs["boxes"], labels, coder, log, ep)
    elif inputs["boxes"]:
        boxes = read_boxes(inputs["boxes"], labels, coder, log, ep, prep.drop_duplicate_boxes)
    if inputs["labels"]:
        image_labels = read_image_labels(inputs["labels"], labels, coder, log, ep)
    n = len(coder)
    for table in (boxes, image_labels):  # both files' offsets over every image of the split
        if table is not None:
            table.offsets = pad_offsets(table.offsets, n)
    annotated = _annotated(boxes, image_labels, n, prep)
    outside: dict[str, int] = {}  # prep.classes: what was dropped for lying outside the subset
    if subset is not None:
        outside["box_rows_outside_class_subset"] = boxes.select(subset.keep[boxes.label]) if boxes is not None else 0
        outside["label_rows_outside_class_subset"] = (
            image_labels.select(subset.keep[image_labels.label]) if image_labels is not None else 0)

    images = open_storage(inputs["images"], ep)
    files_found = list_images(images, log)
    wanted = _annotated(boxes, image_labels, n, prep)
    planned: list[int] = []
    for code in np.flatnonzero(wanted):
        image_id = coder.ids[code]
        if not VALID_IMAGE_ID.match(image_id):
            log.add(
                Reject(
                    R.BAD_IMAGE_ID,
                    inputs["boxes"] or inputs["labels"] or "",
                    "ImageID must be letters, digits, '_' or '-' (it becomes a webdataset key)",
                    image_id=image_id,
                )
            )
        elif image_id not in files_found:
            log.add(
                Reject(
                    R.MISSING_IMAGE,
                    images.uri(""),
                    f"no file {image_id}.jpg for an annotated image",
                    image_id=image_id,
                )
            )
        else:
            planned.append(int(code))
    # Deterministic assignment: sort by ImageID, then a seeded shuffle.
    planned.sort(key=lambda c: coder.ids[c])
    order = np.random.default_rng(prep.seed).permutation(len(planned))
    codes = np.array(planned, dtype=np.int64)[order] if planned else np.zeros(0, np.int64)

    settings = image_settings(prep)
    target = prep.shard_size_mb * 1e6
    shards: list[ShardSpec] = []
    start, acc = 0, 0.0
    sizes = [files_found[coder.ids[c]][1] for c in codes]
    for i, size in enumerate(sizes):
        acc += size + TAR_OVERHEAD
        full = acc >= target or (prep.max_samples_per_shard and i + 1 - start >= prep.max_samples_per_shard)
        if full or i == len(sizes) - 1:
            shards.append(
                _make_spec(
                    split,
                    len(shards),
                    codes[start : i + 1],
                    coder,
                    files_found,
                    boxes,
                    image_labels,
                    settings,
                    sizes[start : i + 1],
                )
            )
            start, acc = i + 1, 0.0
    counts = {
        "box_rows_read": boxes.rows_read if boxes else 0,
        "box_rows_kept": len(boxes) if boxes else 0,
        "label_rows_read": image_labels.rows_read if image_labels else 0,
        "label_rows_kept": len(image_labels.label) if image_labels else 0,
        **outside,
        "images_annotated": int(wanted.sum()),
        "images_without_usable_annotations": int(n - annotated.sum()),
        **({"images_outside_class_subset": int(annotated.sum() - wanted.sum())} if subset is not None else {}),
        "image_files_found": len(files_found),
        "image_files_not_annotated": len(set(files_found) - set(coder.ids)),
        "images_planned": len(codes),
    }
    return SplitPlan(split, shards, images, log, counts, inputs)


def image_settings(prep: PrepConfig) -> ImageSettings:
    return ImageSettings(
        prep.resize_short_side,
        prep.resize_max_long_side,
        prep.jpeg_quality,
        prep.verify_decode,
        prep.expand_labels,
        prep.max_image_pixels,
    )


def _make_spec(
    split: str,
    index: int,
    codes: np.ndarray,
    coder: ImageCoder,
    files: dict[str, tuple[str, int]],
    boxes: BoxTable | None,
    image_labels: ImageLabelTable | None,
    settings: ImageSettings,
    sizes: list[int],
) -> ShardSpec:
    if boxes is not None:
        rows, box_counts = _gather(boxes.offsets, codes)
        box_label, box_norm = boxes.label[rows], boxes.boxes[rows]
        box_flags = np.stack([boxes.flags[f][rows] for f in BOX_FLAGS], axis=1)
    else:
        box_counts = np.zeros(len(codes), np.int32)
        box_label, box_norm, box_flags = (
            np.zeros(0, np.int16),
            np.zeros((0, 4), np.float32),
            np.zeros((0, 5), np.int8),
        )
    if image_labels is not None:
        lrows, label_counts = _gather(image_labels.offsets, codes)
        image_label, positive = image_labels.label[lrows], image_labels.positive[lrows]
    else:
        label_counts = np.zeros(len(codes), np.int32)
        image_label, positive = np.zeros(0, np.int16), np.zeros(0, bool)
    ids = [coder.ids[c] for c in codes]
    spec = ShardSpec(
        split,
        index,
        ids,
        [files[i][0] for i in ids],
        box_counts,
        box_label,
        box_norm,
        box_flags,
        label_counts,
        image_label,
        positive,
    )
    spec.fingerprint = spec.compute_fingerprint(settings, sizes)
    return spec


@functools.cache
def _shard_task():
    """``write_shard`` as a Ray task, made once per process: Ray inspects and exports a remote
    function when it is first called (~15 ms), once per Ray session."""
    import ray

    return ray.remote(max_retries=2)(write_shard)


def _run_tasks(
    plan: SplitPlan, out: Storage, settings: ImageSettings, up: np.ndarray, prep: PrepConfig, progress: bool
) -> list[ShardResult]:
    import ray

    from data_prep.ray_runtime import gather_with_progress

    results: dict[int, ShardResult] = {}
    todo = []
    for spec in plan.shards:
        done = load_complete(spec, out)
        if done is not None:
            results[spec.index] = done
        else:
            todo.append(spec)
    task = _shard_task().options(num_cpus=prep.num_cpus_per_task)
    up_ref = ray.put(up)
    refs = [task.remote(spec, plan.images, out, settings, up_ref) for spec in todo]
    for result in gather_with_progress(refs, f"prep {plan.split} shards", "shard", progress, initial=len(results),
                                       total=len(plan.shards)):
        results[result.index] = result
    return [results[i] for i in sorted(results)]


def _class_stats(labels: LabelSpace, results: list[ShardResult]) -> list[dict]:
    """Boxes and images per class; an image counts once for each class among its boxes' labels.
    One ``bincount`` over every image's label set (1.7M images at the full scale)."""
    boxes = np.zeros(len(labels), np.int64)
    for r in results:
        for k, v in r.box_counts.items():
            boxes[int(k)] += v
    label_sets = (classes for r in results for classes in r.index_columns["labels"])  # one per image
    image_labels = np.fromiter(itertools.chain.from_iterable(label_sets), dtype=np.int64)
    images = np.bincount(image_labels, minlength=len(labels))
    return [
        {
            "index": i,
            "mid": labels.mids[i],
            "name": labels.names[i],
            "boxes": int(boxes[i]),
            "images": int(images[i]),
        }
        for i in range(len(labels))
    ]


def run_prep(
    data: DataConfig,
    prep: PrepConfig,
    address: str | None = None,
    progress: bool = True,
    resolved_config: str | None = None,
    verify: bool = False,
) -> dict:
    """Run the whole job for ``prep.splits``; returns the manifest (also written to the output).
    ``verify`` first re-checks every shard of the existing manifest and rewrites the bad ones
    (``data_prep.verify``)."""
    from data_prep.ray_runtime import init_ray, shutdown_ray

    unknown = [s for s in prep.splits if s not in data.splits]
    if unknown:
        raise ConfigError(f"data.splits has no split '{unknown[0]}' (configured: {sorted(data.splits)})")
    labels, hierarchy = load_label_space(data)
    missing, _extra = hierarchy.check_label_space(labels)
    if missing and prep.expand_labels:
        raise InputError(
            f"{resolve(data.root, data.hierarchy)}: {len(missing)} classes of the label space are "
            f"not in the hierarchy (first: {missing[0]}); fix the files or set prep.expand_labels=false"
        )
    up = hierarchy.ancestor_matrix(labels)
    subset = class_subset(prep.classes, labels, hierarchy)
    out = open_storage(data.shards, data.s3_endpoint_url)
    leftovers = out.clean_staging()  # temp files / unfinished uploads of a killed run
    out.put_bytes(CLASSES_FILE, labels.to_csv_text().encode())
    if data.format == "coco":
        from data_prep.coco_files import flat_hierarchy_json

        out.put_bytes(HIERARCHY_FILE, flat_hierarchy_json(labels).encode())
    else:
        out.put_bytes(HIERARCHY_FILE, read_source(resolve(data.root, data.hierarchy), data.s3_endpoint_url))
    if resolved_config is not None:
        out.put_bytes("prep-config.yaml", resolved_config.encode())
    manifest = read_manifest(out)
    manifest.pop("verify", None)  # a verification belongs to the run that made it
    if verify:
        manifest["verify"] = _verify(out, manifest, prep, progress)
    manifest.update(
        {
            "format": "tsd-oid shards v1",
            "output": out.uri(""),
            "classes_file": CLASSES_FILE,
            "hierarchy_file": HIERARCHY_FILE,
            "num_classes": len(labels),
            # prep.classes: what was asked for and the classes kept (with descendants and ancestors)
            "class_subset": subset.to_json(labels) if subset is not None else None,
            "prep": asdict(prep),
            "staging_leftovers_removed": leftovers,
        }
    )
    settings = image_settings(prep)
    started = init_ray(address)
    try:
        for split in prep.splits:
            t0 = time.perf_counter()
            plan = plan_split(data, prep, split, labels, subset)
            results = _run_tasks(plan, out, settings, up, prep, progress)
            written = write_index(out, split, results)
            stale = remove_stale_shards(out, split, {r.name for r in results})
            for r in results:
                plan.log.extend([Reject(**d) for d in r.rejects])
            changes: dict[str, int] = {}
            for r in results:
                for k, v in r.changes.items():
                    changes[k] = changes.get(k, 0) + v
            counts = dict(plan.counts)
            counts["images_written"] = written
            counts["boxes_written"] = sum(sum(r.index_columns["num_boxes"]) for r in results)
            counts["annotated_boxes_written"] = sum(r.annotated_boxes for r in results)
            counts["shards"] = len(results)
            counts["shards_skipped_complete"] = sum(r.skipped for r in results)
            counts["stale_shards_removed"] = len(stale)
            manifest.setdefault("splits", {})[split] = {
                "inputs": plan.inputs,
                "index": index_name(split),
                "counts": counts,
                "rejects": plan.log.to_json(),
                "changes": dict(sorted(changes.items())),
                "classes": _class_stats(labels, results),
                "shards": [
                    {"name": r.name, "samples": r.num_samples, "bytes": r.bytes, "sha256": r.sha256,
                     "crc32": r.crc32}
                    for r in results
                ],
                "seconds": round(time.perf_counter() - t0, 3),
            }
            out.put_bytes(MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=False).encode())
        out.finish_staging()
    finally:
        shutdown_ray(started)
    return manifest


def remove_stale_shards(out: Storage, split: str, current: set[str]) -> list[str]:
    """Delete the split's shards that this plan does not have (an earlier plan with more shards left
    them): no reader may see their samples twice. Returns their names."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    stale = sorted(o.name for o in out.list() if pattern.match(o.name) and o.name not in current)
    for name in stale:
        out.delete(name)
    return stale


def _verify(out: Storage, manifest: dict, prep: PrepConfig, progress: bool) -> dict:
    """`tsd prep --verify`: check the shards the manifest lists against it, delete the bad ones (the
    run then writes them again), and publish ``verify-report.json``; returns its content."""
    from data_prep.verify import remove_bad, verify_shards

    if not manifest.get("splits"):
        raise InputError(f"{out.uri(MANIFEST_FILE)}: no manifest with shards to verify (run `tsd prep` first)")
    report = verify_shards(out, manifest, [s for s in prep.splits if s in manifest["splits"]], progress=progress)
    remove_bad(out, report)
    result = report.to_json()
    out.put_bytes(VERIFY_REPORT_FILE, json.dumps(result, indent=1).encode())
    return result


def read_manifest(out: Storage) -> dict:
    """The output's manifest; {} when there is none yet (or it cannot be read: the run rewrites it)."""
    if not out.exists(MANIFEST_FILE):
        return {}
    try:
        return json.loads(out.read_bytes(MANIFEST_FILE))
    except ValueError:
        return {}


def summary_lines(manifest: dict) -> list[str]:
    """A short human summary of a manifest, one line per split."""
    lines = [f"shards in {manifest.get('output')} ({manifest.get('num_classes')} classes)"]
    verified = manifest.get("verify")
    if verified:
        how = ", ".join(f"{n} by {k}" for k, n in verified["checked_by"].items())
        lines.append(f"  verified {verified['shards_checked']} shards ({how}; {verified['bytes_read'] / 1e6:,.0f} MB "
                     f"read, {verified['seconds']:.1f} s): {verified['shards_bad']} bad, written again"
                     + "".join(f"\n    {b['problem']}" for b in verified["bad"]))
    for split, s in manifest.get("splits", {}).items():
        c = s["counts"]
        rejected = s["rejects"]["counts"]
        lines.append(
            f"  {split}: {c['images_written']} images, {c['boxes_written']} boxes "
            + (f"({c['annotated_boxes_written']} annotated, the rest added for ancestor classes) "
               if c["boxes_written"] > c["annotated_boxes_written"] else "")
            + f"in {c['shards']} shards "
            f"({c['shards_skipped_complete']} already complete); rejects: "
            + (", ".join(f"{k}={v}" for k, v in rejected.items()) or "none")
            + (f"; changed: {', '.join(f'{k}={v}' for k, v in s['changes'].items())}" if s["changes"] else "")
        )
    return lines
