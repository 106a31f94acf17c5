"""A small OpenImages-format dataset of drawn shapes: the embedded default for the demo and tests.

Everything is written exactly in the official formats (class CSV without header, hierarchy JSON
with ``Subcategory`` lists under the OID root MID, the 13-column train box CSV, the short
validation box CSV, both image-level label layouts, and JPEG files named ``{ImageID}.jpg``), so
the same readers and the same prep job run on it as on the real challenge data. The hierarchy has
four levels and one class with two parents (Star is a Polygon and a Symbol), and the boxes include
group-of boxes over clusters of small shapes, occluded and truncated objects. Deterministic from
the seed; small enough that a tiny detector learns it on a CPU in minutes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_prep.hierarchy import OID_ROOT_MID

# (MID, display name); index order of the label space.
SYNTH_CLASSES: tuple[tuple[str, str], ...] = (
    ("/m/syn_shape", "Shape"),
    ("/m/syn_polygon", "Polygon"),
    ("/m/syn_quad", "Quadrilateral"),
    ("/m/syn_triangle", "Triangle"),
    ("/m/syn_square", "Square"),
    ("/m/syn_diamond", "Diamond"),
    ("/m/syn_star", "Star"),
    ("/m/syn_round", "Round"),
    ("/m/syn_circle", "Circle"),
    ("/m/syn_ellipse", "Ellipse"),
    ("/m/syn_symbol", "Symbol"),
    ("/m/syn_cross", "Cross"),
)
# The tree under the OID root; Star appears under Polygon and under Symbol.
SYNTH_TREE = {
    "/m/syn_shape": {
        "/m/syn_polygon": {
            "/m/syn_triangle": {},
            "/m/syn_quad": {"/m/syn_square": {}, "/m/syn_diamond": {}},
            "/m/syn_star": {},
        },
        "/m/syn_round": {"/m/syn_circle": {}, "/m/syn_ellipse": {}},
    },
    "/m/syn_symbol": {"/m/syn_cross": {}, "/m/syn_star": {}},
}
DRAWN = (
    "/m/syn_triangle",
    "/m/syn_square",
    "/m/syn_diamond",
    "/m/syn_star",
    "/m/syn_circle",
    "/m/syn_ellipse",
    "/m/syn_cross",
)

CLASSES_FILE = "classes-description.csv"
HIERARCHY_FILE = "label-hierarchy.json"
BOX_HEADER_TRAIN = [
    "ImageID",
    "Source",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
]
BOX_HEADER_VALIDATION = ["ImageID", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "LabelName"]


def split_files(split: str) -> dict[str, str]:
    """File names of one split inside a synthetic dataset directory."""
    return {
        "boxes": f"{split}-annotations-bbox.csv",
        "labels": f"{split}-annotations-human-imagelabels.csv",
        "images": split,
    }


@dataclass
class SynthBox:
    mid: str
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2 (clipped to the image)
    group_of: bool = False
    occluded: bool = False
    truncated: bool = False


def hierarchy_json() -> dict:
    def node(mid: str, children: dict) -> dict:
        out: dict = {"LabelName": mid}
        if children:
            out["Subcategory"] = [node(m, c) for m, c in children.items()]
        return out

    return node(OID_ROOT_MID, SYNTH_TREE)


def _shape_points(mid: str, cx: float, cy: float, w: float, h: float) -> list[tuple[float, float]]:
    if mid == "/m/syn_triangle":
        return [(cx, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if mid == "/m/syn_diamond":
        return [(cx, cy - h / 2), (cx + w / 2, cy), (cx, cy + h / 2), (cx - w / 2, cy)]
    if mid == "/m/syn_star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * w * math.cos(a), cy + r * h * math.sin(a)))
        return pts
    return []


def _draw(
    draw: ImageDraw.ImageDraw, mid: str, cx: float, cy: float, w: float, h: float, color: tuple
) -> tuple[float, float, float, float]:
    """Draw one shape; returns its tight extent (x1, y1, x2, y2) in pixels, unclipped."""
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if mid in ("/m/syn_triangle", "/m/syn_diamond", "/m/syn_star"):
        pts = _shape_points(mid, cx, cy, w, h)
        draw.polygon(pts, fill=color)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return min(xs), min(ys), max(xs), max(ys)
    if mid == "/m/syn_square":
        draw.rectangle((x1, y1, x2, y2), fill=color)
    elif mid in ("/m/syn_circle", "/m/syn_ellipse"):
        draw.ellipse((x1, y1, x2, y2), fill=color)
    elif mid == "/m/syn_cross":
        tw, th = w / 3, h / 3
        draw.rectangle((cx - tw / 2, y1, cx + tw / 2, y2), fill=color)
        draw.rectangle((x1, cy - th / 2, x2, cy + th / 2), fill=color)
    else:
        raise ValueError(mid)
    return x1, y1, x2, y2


def _size_for(mid: str, rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float]:
    s = float(rng.uniform(lo, hi))
    if mid == "/m/syn_ellipse":
        return (s, s * 0.5) if rng.random() < 0.5 else (s * 0.5, s)
    return s, s


def render_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[SynthBox]]:
    """One image with 1-4 objects and, sometimes, a group-of cluster of small shapes."""
    bg = tuple(int(v) for v in rng.integers(170, 250, size=3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    boxes: list[SynthBox] = []
    short = min(width, height)

    if rng.random() < 0.25:  # a cluster of 4-7 small shapes of one class, annotated as one group-of box
        mid = DRAWN[int(rng.integers(len(DRAWN)))]
        color = tuple(int(v) for v in rng.integers(0, 140, size=3))
        gx, gy = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        gw, gh = rng.uniform(0.3, 0.45) * width, rng.uniform(0.3, 0.45) * height
        extents = []
        for _ in range(int(rng.integers(4, 8))):
            w, h = _size_for(mid, rng, 0.06 * short, 0.1 * short)
            cx, cy = rng.uniform(gx + w / 2, gx + gw - w / 2), rng.uniform(gy + h / 2, gy + gh - h / 2)
            extents.append(_draw(draw, mid, cx, cy, w, h, color))
        e = np.array(extents)
        boxes.append(
            SynthBox(mid, (e[:, 0].min(), e[:, 1].min(), e[:, 2].max(), e[:, 3].max()), group_of=True)
        )

    for _ in range(int(rng.integers(1, 5))):
        mid = DRAWN[int(rng.integers(len(DRAWN)))]
        w, h = _size_for(mid, rng, 0.25 * short, 0.5 * short)
        truncated = rng.random() < 0.1
        margin = -0.3 if truncated else 0.5
        cx = rng.uniform(margin * w, width - margin * w)
        cy = rng.uniform(margin * h, height - margin * h)
        color = tuple(int(v) for v in rng.integers(0, 140, size=3))
        raw = _draw(draw, mid, cx, cy, w, h, color)
        clipped = (max(0.0, raw[0]), max(0.0, raw[1]), min(float(width), raw[2]), min(float(height), raw[3]))
        if clipped[2] - clipped[0] < 4 or clipped[3] - clipped[1] < 4:
            continue
        for earlier in boxes:  # the new shape is drawn on top: earlier overlapping shapes are occluded
            ix = min(earlier.box[2], clipped[2]) - max(earlier.box[0], clipped[0])
            iy = min(earlier.box[3], clipped[3]) - max(earlier.box[1], clipped[1])
            if ix > 0 and iy > 0 and not earlier.group_of:
                earlier.occluded = True
        boxes.append(SynthBox(mid, clipped, truncated=clipped != raw))
    return image, boxes


def _csv_text(header: list[str] | None, rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _norm(v: float) -> str:
    return f"{min(max(v, 0.0), 1.0):.6f}"


def generate(
    out_dir: str | Path,
    num_train: int = 200,
    num_validation: int = 50,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 160,
    progress: bool = False,
) -> dict:
    """Write the dataset under ``out_dir``; returns a summary (counts per split and file names)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSES_FILE).write_text(_csv_text(None, [list(c) for c in SYNTH_CLASSES]))
    (out / HIERARCHY_FILE).write_text(json.dumps(hierarchy_json(), indent=1) + "\n")
    rng = np.random.default_rng(seed)
    used_ids: set[str] = set()
    summary: dict = {"root": str(out), "classes": CLASSES_FILE, "hierarchy": HIERARCHY_FILE, "splits": {}}
    for split, count in (("train", num_train), ("validation", num_validation)):
        files = split_files(split)
        (out / files["images"]).mkdir(exist_ok=True)
        box_rows, label_rows = [], []
        n_boxes = 0
        for _ in tqdm(range(count), desc=f"synth {split}", disable=not progress, unit="img"):
            while (image_id := f"{int(rng.integers(0, 2**63)):016x}") in used_ids:
                pass
            used_ids.add(image_id)
            width, height = (
                int(rng.integers(min_size, max_size + 1)),
                int(rng.integers(min_size, max_size + 1)),
            )
            image, boxes = render_image(rng, width, height)
            image.save(out / files["images"] / f"{image_id}.jpg", format="JPEG", quality=92)
            for b in boxes:
                x1, y1, x2, y2 = b.box
                nx1, nx2, ny1, ny2 = (
                    _norm(x1 / width),
                    _norm(x2 / width),
                    _norm(y1 / height),
                    _norm(y2 / height),
                )
                if split == "train":
                    box_rows.append(
                        [
                            image_id,
                            "xclick",
                            b.mid,
                            1,
                            nx1,
                            nx2,
                            ny1,
                            ny2,
                            int(b.occluded),
                            int(b.truncated),
                            int(b.group_of),
                            0,
                            0,
                        ]
                    )
                else:
                    box_rows.append([image_id, nx1, nx2, ny1, ny2, int(b.group_of), b.mid])
            n_boxes += len(boxes)
            present = sorted({b.mid for b in boxes})
            absent = [m for m in DRAWN if m not in present]
            verified = [(m, 1) for m in present]
            if rng.random() < 0.3:  # a verified parent-level label, as human verifiers sometimes give
                verified.append(("/m/syn_polygon" if rng.random() < 0.5 else "/m/syn_round", 1))
            for m in rng.permutation(absent)[: int(rng.integers(1, 3))]:
                verified.append((str(m), 0))
            for mid, conf in verified:
                if split == "train":
                    label_rows.append([image_id, "verification", mid, conf])
                else:
                    label_rows.append([image_id, mid, conf])
        box_header = BOX_HEADER_TRAIN if split == "train" else BOX_HEADER_VALIDATION
        label_header = (
            ["ImageID", "Source", "LabelName", "Confidence"]
            if split == "train"
            else ["ImageID", "LabelName", "Confidence"]
        )
        (out / files["boxes"]).write_text(_csv_text(box_header, box_rows))
        (out / files["labels"]).write_text(_csv_text(label_header, label_rows))
        summary["splits"][split] = {
            **files,
            "images_count": count,
            "boxes_count": n_boxes,
            "image_labels_count": len(label_rows),
        }
    return summary


def export_coco(root: str | Path) -> dict[str, str]:
    """Write ``annotations/instances_{split}.json`` (COCO format) for a synthetic dataset in ``root``,
    from its OID-format files: the same images and boxes, group-of boxes as ``iscrowd``."""
    root = Path(root)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, (_, name) in enumerate(SYNTH_CLASSES)]
    cat_id = {mid: k + 1 for k, (mid, _) in enumerate(SYNTH_CLASSES)}
    (root / "annotations").mkdir(exist_ok=True)
    written = {}
    for split in ("train", "validation"):
        files = split_files(split)
        if not (root / files["boxes"]).exists():
            continue
        images, index = [], {}
        for n, path in enumerate(sorted((root / files["images"]).glob("*.jpg")), start=1):
            with Image.open(path) as im:
                images.append({"id": n, "file_name": path.name, "width": im.size[0], "height": im.size[1]})
            index[path.stem] = images[-1]
        annotations = []
        with open(root / files["boxes"], newline="") as f:
            for k, row in enumerate(csv.DictReader(f), start=1):
                im = index[row["ImageID"]]
                w, h = im["width"], im["height"]
                x1, x2 = float(row["XMin"]) * w, float(row["XMax"]) * w
                y1, y2 = float(row["YMin"]) * h, float(row["YMax"]) * h
                annotations.append({"id": k, "image_id": im["id"], "category_id": cat_id[row["LabelName"]],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": int(row["IsGroupOf"])})
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        written[split] = str(path)
    return written
