"""COCO-format datasets (``instances_*.json``): label space and boxes in the same arrays as OID.

The label space is the JSON's categories in id order (MID = the category id as a string); the
hierarchy is flat. An image's ImageID is the stem of its ``file_name`` (``000000397133``), so that
images are found and keyed exactly like OID images. Boxes go from COCO's pixel ``[x, y, w, h]``
to normalized ``(x1, y1, x2, y2)``; ``iscrowd`` regions become group-of boxes (both absorb
detections without being misses). Boxes reaching up to one pixel outside the image are clipped;
others outside, or with no area, are rejected with the annotation id, like bad CSV rows.
"""

from __future__ import annotations

import json

import numpy as np

from data_prep import rejects as R
from data_prep.errors import InputError
from data_prep.hierarchy import OID_ROOT_MID, Hierarchy
from data_prep.labels import LabelSpace
from data_prep.oid_files import BOX_FLAGS, BoxTable, ImageCoder, group_offsets
from data_prep.rejects import Reject, RejectLog
from data_prep.storage import read_source


def load_coco(uri: str, endpoint_url: str | None = None) -> dict:
    try:
        data = json.loads(read_source(uri, endpoint_url))
    except json.JSONDecodeError as exc:
        raise InputError(f"{uri}: not valid JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise InputError(f"{uri}: not a COCO instances file (missing {missing})")
    return data


def coco_label_space(uri: str, endpoint_url: str | None = None) -> tuple[LabelSpace, Hierarchy]:
    cats = sorted(load_coco(uri, endpoint_url)["categories"], key=lambda c: c["id"])
    labels = LabelSpace.from_pairs([(str(c["id"]), c["name"]) for c in cats])
    flat = {"LabelName": OID_ROOT_MID, "Subcategory": [{"LabelName": m} for m in labels.mids]}
    return labels, Hierarchy.from_json_text(json.dumps(flat), uri)


def flat_hierarchy_json(labels: LabelSpace) -> str:
    return json.dumps({"LabelName": OID_ROOT_MID, "Subcategory": [{"LabelName": m} for m in labels.mids]})


def image_key(file_name: str) -> str:
    return file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def read_coco_boxes(uri: str, labels: LabelSpace, images: ImageCoder, log: RejectLog,
                    endpoint_url: str | None = None) -> BoxTable:
    data = load_coco(uri, endpoint_url)
    sizes = {}
    for im in data["images"]:
        sizes[im["id"]] = (image_key(im["file_name"]), float(im["width"]), float(im["height"]))
    rows = []
    for n, ann in enumerate(data["annotations"]):
        where = f"annotation id {ann.get('id', n)}"
        info = sizes.get(ann.get("image_id"))
        cls = labels.get(str(ann.get("category_id")))
        if info is None:
            log.add(Reject(R.MALFORMED_ROW, uri, f"{where}: unknown image_id {ann.get('image_id')}"))
            continue
        key, w, h = info
        if cls < 0:
            log.add(Reject(R.UNKNOWN_MID, uri, f"{where}: unknown category_id {ann.get('category_id')}", image_id=key))
            continue
        try:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            log.add(Reject(R.MALFORMED_ROW, uri, f"{where}: bbox is not [x, y, w, h]", image_id=key))
            continue
        x1, y1, x2, y2 = x, y, x + bw, y + bh
        if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1:
            log.add(Reject(R.BOX_OUTSIDE_IMAGE, uri, f"{where}: bbox {ann['bbox']} outside the {w:g}x{h:g} image",
                           image_id=key))
            continue
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            log.add(Reject(R.DEGENERATE_BOX, uri, f"{where}: bbox {ann['bbox']} has no area", image_id=key))
            continue
        rows.append((images.code(key), cls, x1 / w, y1 / h, x2 / w, y2 / h, int(bool(ann.get("iscrowd", 0)))))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 7)
    img = arr[:, 0].astype(np.int32)
    order, offsets = group_offsets(img, len(images))
    if order is not None:
        arr, img = arr[order], img[order]
    flags = {f: np.full(len(arr), -1, np.int8) for f in BOX_FLAGS}
    flags["IsGroupOf"] = arr[:, 6].astype(np.int8)
    return BoxTable(img, arr[:, 1].astype(np.int16), arr[:, 2:6].astype(np.float32), flags,
                    np.zeros(len(arr), np.int32), offsets, rows_read=len(data["annotations"]))

