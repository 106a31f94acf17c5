"""COCO AP through pycocotools' COCOeval, for COCO-style datasets and size breakdowns.

``coco_ap`` builds the COCO ground-truth and result objects in memory (no JSON files) and returns
the 12 standard numbers (AP, AP50, AP75, AP small/medium/large, AR...). On OpenImages it gives the
AP-by-object-size breakdown of the paper's Table 9: group-of boxes become COCO "crowd" regions
(which, like group-of boxes, absorb detections without counting as misses).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR_1", "AR_10", "AR_100", "AR_small",
              "AR_medium", "AR_large")


def coco_ap(image_sizes: np.ndarray, gt_image: np.ndarray, gt_class: np.ndarray, gt_boxes: np.ndarray,
            gt_crowd: np.ndarray, det_image: np.ndarray, det_class: np.ndarray, det_score: np.ndarray,
            det_boxes: np.ndarray, max_dets: int = 100) -> dict[str, float]:
    """COCOeval bbox statistics. Boxes are ``(x1, y1, x2, y2)`` in pixels; images are indices into
    ``image_sizes`` (``[N, 2]`` heights and widths); classes are 0-based indices."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: np.ndarray) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    classes = sorted(set(np.asarray(gt_class).tolist()) | set(np.asarray(det_class).tolist()))
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(image_sizes)],
        "categories": [{"id": int(c) + 1} for c in classes],
        "annotations": [{"id": k + 1, "image_id": int(i), "category_id": int(c) + 1, "bbox": xywh(b),
                         "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": int(bool(crowd))}
                        for k, (i, c, b, crowd) in enumerate(zip(gt_image, gt_class, gt_boxes, gt_crowd, strict=True))],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if len(det_score) == 0:
            return dict.fromkeys(STAT_NAMES, 0.0)
        results = gt.loadRes([{"image_id": int(i), "category_id": int(c) + 1, "score": float(s), "bbox": xywh(b)}
                              for i, c, s, b in zip(det_image, det_class, det_score, det_boxes, strict=True)])
        evaluator = COCOeval(gt, results, "bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}


def coco_eval_file(gt: dict, keys: list[str], mids: tuple[str, ...], det_class: np.ndarray, det_score: np.ndarray,
                   det_boxes_norm: np.ndarray) -> dict[str, float]:
    """The official COCO evaluation against an instances JSON (already loaded): detections keyed by
    file stem, classes as label-space indices (MID = category id), boxes normalized x1, y1, x2, y2."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from data_prep.coco_files import image_key

    by_key = {image_key(im["file_name"]): im for im in gt["images"]}
    results = []
    for key, c, s, b in zip(keys, det_class, det_score, det_boxes_norm, strict=True):
        im = by_key.get(key)
        if im is None:
            continue
        w, h = float(im["width"]), float(im["height"])
        results.append({"image_id": im["id"], "category_id": int(mids[int(c)]), "score": float(s),
                        "bbox": [float(b[0] * w), float(b[1] * h), float((b[2] - b[0]) * w), float((b[3] - b[1]) * h)]})
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        if not results:
            return dict.fromkeys(STAT_NAMES, 0.0)
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
