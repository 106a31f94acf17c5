"""The Open Images challenge detection metric, vectorised: hierarchical AP@0.5 per class and mAP.

The semantics are those of the TensorFlow Object Detection API's challenge evaluator
(``OpenImagesDetectionChallengeEvaluator`` with ``per_image_evaluation`` and
``metrics.compute_average_precision``), point by point:

1. Only images with ground truth (boxes or image-level labels) are evaluated; detections on other
   images are dropped, not counted as false positives.
2. Ground-truth boxes are expanded to every ancestor class over every path; IsGroupOf is kept.
3. An image-level label is positive iff ``int(float(Confidence)) == 1`` and expands up; any other
   label is negative and expands down.
4. Per image, the evaluated classes are the expanded box classes and the expanded image-level
   labels; detections of other classes are dropped. Detections are never expanded.
5. Detections with ``xmin >= xmax`` or ``ymin >= ymax`` and scores <= -10 are dropped; at most
   10,000 detections per (image, class) are kept, in score order.
6. Per (image, class), in descending score order, a detection looks only at its highest-IoU
   non-group-of box (the first on ties): it is a TP if that IoU >= the threshold and the box is
   not taken yet. So a box's TP is the highest-ranked detection whose best box it is -- which is
   how this module matches all (image, class) groups at once, without a sequential loop.
7. Every other detection is tested against its best group-of box by intersection over its own
   area; at >= the threshold it is removed. A group-of box that absorbed detections adds one TP
   whose score is the highest absorbed score, if that score is positive.
8. Classes evaluated only through image-level labels make all their detections FPs.
9. IoU in float64, no +1 convention.
10. Positives per class: every expanded box, group-of or not, on every evaluated image.
11. AP: VOC-2010 all-points interpolation; classes without positives have AP NaN and are left out
    of the mean.
Ties between equal scores are broken deterministically (input order; absorbed group-of TPs after
the detections of the same class), where the reference's unstable sort is not deterministic.

Inputs are integer codes (image, class index) and boxes ``(x1, y1, x2, y2)``, normalized or in
pixels, as long as ground truth and detections agree. Work is done in chunks of images, so memory
stays bounded at any dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_IOU_THRESHOLDS = (0.5,)
COCO_STYLE_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))
MAX_DETECTIONS_PER_IMAGE_CLASS = 10_000
MIN_SCORE = -10.0


@dataclass
class GroundTruth:
    """The expanded ground truth of the evaluated images, integer-coded."""

    num_images: int
    num_classes: int
    box_image: np.ndarray  # int64 [B]
    box_class: np.ndarray  # int64 [B]
    boxes: np.ndarray  # float64 [B, 4] x1, y1, x2, y2
    box_group: np.ndarray  # bool [B]
    evaluated: np.ndarray  # bool [num_images, num_classes]
    num_positives: np.ndarray  # int64 [num_classes]


def expand_ground_truth(num_images: int, up: np.ndarray, box_image: np.ndarray, box_class: np.ndarray,
                        boxes: np.ndarray, box_group: np.ndarray, label_image: np.ndarray | None = None,
                        label_class: np.ndarray | None = None, label_positive: np.ndarray | None = None
                        ) -> GroundTruth:
    """Expand boxes up the hierarchy (``up[i, j]``: j is i or an ancestor of i), positive labels up and
    negative labels down, and mark the evaluated (image, class) pairs."""
    num_classes = up.shape[0]
    rows, classes = np.nonzero(up[np.asarray(box_class, dtype=np.int64)])
    b_img = np.asarray(box_image, dtype=np.int64)[rows]
    evaluated = np.zeros((num_images, num_classes), dtype=bool)
    evaluated[b_img, classes] = True
    if label_image is not None and len(label_image):
        label_image = np.asarray(label_image, dtype=np.int64)
        label_class = np.asarray(label_class, dtype=np.int64)
        positive = np.asarray(label_positive, dtype=bool)
        r, c = np.nonzero(up[label_class[positive]])
        evaluated[label_image[positive][r], c] = True
        r, c = np.nonzero(up.T[label_class[~positive]])
        evaluated[label_image[~positive][r], c] = True
    gt = GroundTruth(num_images, num_classes, b_img, classes.astype(np.int64),
                     np.asarray(boxes, dtype=np.float64)[rows], np.asarray(box_group, dtype=bool)[rows], evaluated,
                     np.bincount(classes, minlength=num_classes).astype(np.int64))
    return gt


def _iou_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise IoU and intersection-over-``a``-area of paired boxes ``a[i]``, ``b[i]``."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_a + area_b - inter)
        ioa = inter / area_a
    return np.nan_to_num(iou), np.nan_to_num(ioa)


def _ragged_pairs(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items with candidate ranges ``[starts[i], starts[i] + counts[i])``: (item, candidate) pairs."""
    total = int(counts.sum())
    item = np.repeat(np.arange(len(counts)), counts)
    offsets = np.cumsum(counts) - counts
    cand = np.arange(total) - np.repeat(offsets, counts) + np.repeat(starts, counts)
    return item, cand


def _best_match(det_boxes: np.ndarray, gt_boxes: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                use_ioa: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per detection, the overlap with its best candidate box (first on ties) and that box's index
    (-1 and 0 when it has no candidates)."""
    n = len(det_boxes)
    best_value = np.zeros(n)
    best_index = np.full(n, -1, dtype=np.int64)
    has = counts > 0
    if not has.any():
        return best_value, best_index
    item, cand = _ragged_pairs(starts[has], counts[has])
    det_of_pair = np.flatnonzero(has)[item]
    iou, ioa = _iou_pairs(det_boxes[det_of_pair], gt_boxes[cand])
    value = ioa if use_ioa else iou
    seg = np.concatenate([[0], np.cumsum(counts[has])[:-1]])
    seg_max = np.maximum.reduceat(value, seg)
    is_max = value == np.repeat(seg_max, counts[has])
    first = np.minimum.reduceat(np.where(is_max, cand, np.iinfo(np.int64).max), seg)
    best_value[has] = seg_max
    best_index[has] = first
    return best_value, best_index


@dataclass
class _ClassScores:
    """Per IoU threshold and class: the scores and TP flags of every counted detection."""

    scores: list[list[np.ndarray]] = field(default_factory=list)
    tps: list[list[np.ndarray]] = field(default_factory=list)


def _evaluate_chunk(gt: GroundTruth, det_image: np.ndarray, det_class: np.ndarray, det_score: np.ndarray,
                    det_boxes: np.ndarray, thresholds: tuple[float, ...], out: list[tuple[np.ndarray, ...]]) -> None:
    """Match the detections of a chunk of images; append (class, score, tp) arrays per threshold."""
    C = gt.num_classes
    key = det_image * C + det_class
    order = np.lexsort((np.arange(len(key)), -det_score, key))  # group, then score desc, then input order
    key, det_class, det_score, det_boxes = key[order], det_class[order], det_score[order], det_boxes[order]
    # at most 10,000 detections per (image, class)
    group_start = np.searchsorted(key, key, side="left")
    keep = (np.arange(len(key)) - group_start) < MAX_DETECTIONS_PER_IMAGE_CLASS
    key, det_class, det_score, det_boxes = key[keep], det_class[keep], det_score[keep], det_boxes[keep]

    gt_key = gt.box_image * C + gt.box_class
    results = []
    for group_of in (False, True):
        sel = np.flatnonzero(gt.box_group == group_of)
        k = gt_key[sel]
        o = np.argsort(k, kind="stable")
        boxes_sorted = gt.boxes[sel][o]
        k_sorted = k[o]
        starts = np.searchsorted(k_sorted, key, side="left")
        counts = np.searchsorted(k_sorted, key, side="right") - starts
        value, index = _best_match(det_boxes, boxes_sorted, starts, counts, use_ioa=group_of)
        results.append((value, index))
    (iou, best_box), (ioa, best_group) = results

    for t, thr in enumerate(thresholds):
        candidate = (best_box >= 0) & (iou >= thr)
        tp = np.zeros(len(key), dtype=bool)
        cand_idx = np.flatnonzero(candidate)
        _, first = np.unique(best_box[cand_idx], return_index=True)  # detections are in rank order
        tp[cand_idx[first]] = True
        absorbed = ~tp & (best_group >= 0) & (ioa >= thr)
        # each absorbing group-of box: one TP at the highest absorbed score, if positive
        g_idx = best_group[absorbed]
        g_score = det_score[absorbed]
        g_class = det_class[absorbed]
        if len(g_idx):
            uniq, inverse = np.unique(g_idx, return_inverse=True)
            best = np.full(len(uniq), -np.inf)
            np.maximum.at(best, inverse, g_score)
            cls_of = np.zeros(len(uniq), dtype=np.int64)
            cls_of[inverse] = g_class
            score0 = np.maximum(best, 0.0)  # the reference's running max starts at 0
            pos = score0 > 0
            group_cls, group_scores = cls_of[pos], score0[pos]
        else:
            group_cls, group_scores = np.zeros(0, np.int64), np.zeros(0)
        counted = ~absorbed
        out[t].append((np.concatenate([det_class[counted], group_cls]),
                       np.concatenate([det_score[counted], group_scores]),
                       np.concatenate([tp[counted], np.ones(len(group_cls), dtype=bool)])))


def average_precision(scores: np.ndarray, tp: np.ndarray, num_positives: int) -> float:
    """VOC-2010 all-points AP of one class (NaN without positives; 0 without detections)."""
    if num_positives == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = tp[order].astype(np.float64)
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum(1.0 - tp)
    precision = cum_tp / (cum_tp + cum_fp)
    recall = cum_tp / num_positives
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def precision_recall(scores: np.ndarray, tp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """The PR curve of one class, in score order."""
    order = np.argsort(-scores, kind="stable")
    t = tp[order].astype(np.float64)
    cum_tp = np.cumsum(t)
    return cum_tp / np.maximum(1, num_positives), cum_tp / np.arange(1, len(t) + 1)


@dataclass
class MetricResult:
    thresholds: tuple[float, ...]
    ap: np.ndarray  # [T, C], NaN for classes without positives
    num_positives: np.ndarray  # [C]
    num_detections: np.ndarray  # [C] counted detections (group-of TPs included) at the first threshold
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # class -> (recall, precision)

    def mean_ap(self, t: int = 0) -> float:
        values = self.ap[t]
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def evaluate(gt: GroundTruth, det_image: np.ndarray, det_class: np.ndarray, det_score: np.ndarray,
             det_boxes: np.ndarray, thresholds: tuple[float, ...] = DEFAULT_IOU_THRESHOLDS,
             chunk_images: int = 4096, keep_curves: bool = False) -> MetricResult:
    """Score detections (``det_image`` codes of ``gt``'s images, -1 for other images) against ``gt``."""
    det_image = np.asarray(det_image, dtype=np.int64)
    det_class = np.asarray(det_class, dtype=np.int64)
    det_score = np.asarray(det_score, dtype=np.float64)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    valid = ((det_image >= 0) & (det_image < gt.num_images) & (det_class >= 0) & (det_class < gt.num_classes)
             & (det_boxes[:, 0] < det_boxes[:, 2]) & (det_boxes[:, 1] < det_boxes[:, 3]) & (det_score > MIN_SCORE))
    idx = np.flatnonzero(valid)
    idx = idx[gt.evaluated[det_image[idx], det_class[idx]]]
    det_image, det_class, det_score, det_boxes = det_image[idx], det_class[idx], det_score[idx], det_boxes[idx]

    out: list[list[tuple[np.ndarray, ...]]] = [[] for _ in thresholds]
    order_d = np.argsort(det_image, kind="stable")
    order_g = np.argsort(gt.box_image, kind="stable")
    d_sorted, g_sorted = det_image[order_d], gt.box_image[order_g]
    for lo in range(0, gt.num_images, chunk_images):
        hi = lo + chunk_images
        d0, d1 = np.searchsorted(d_sorted, [lo, hi])
        g0, g1 = np.searchsorted(g_sorted, [lo, hi])
        if d1 == d0:
            continue
        dsel, gsel = order_d[d0:d1], order_g[g0:g1]
        chunk_gt = GroundTruth(gt.num_images, gt.num_classes, gt.box_image[gsel], gt.box_class[gsel],
                               gt.boxes[gsel], gt.box_group[gsel], gt.evaluated, gt.num_positives)
        _evaluate_chunk(chunk_gt, det_image[dsel], det_class[dsel], det_score[dsel], det_boxes[dsel], thresholds, out)

    ap = np.full((len(thresholds), gt.num_classes), np.nan)
    num_det = np.zeros(gt.num_classes, dtype=np.int64)
    curves = {}
    for t in range(len(thresholds)):
        if out[t]:
            cls = np.concatenate([o[0] for o in out[t]])
            scores = np.concatenate([o[1] for o in out[t]])
            tps = np.concatenate([o[2] for o in out[t]])
        else:
            cls, scores, tps = np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
        order = np.argsort(cls, kind="stable")
        cls, scores, tps = cls[order], scores[order], tps[order]
        bounds = np.searchsorted(cls, np.arange(gt.num_classes + 1))
        if t == 0:
            num_det = np.diff(bounds)
        for c in range(gt.num_classes):
            s, e = bounds[c], bounds[c + 1]
            ap[t, c] = average_precision(scores[s:e], tps[s:e], int(gt.num_positives[c]))
            if keep_curves and t == 0 and gt.num_positives[c] > 0 and e > s:
                curves[c] = precision_recall(scores[s:e], tps[s:e], int(gt.num_positives[c]))
    return MetricResult(tuple(thresholds), ap, gt.num_positives, num_det, curves)
