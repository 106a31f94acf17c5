"""The OID challenge metric: hand-computed cases, the real hierarchy, and a randomized comparison
with a straightforward loop implementation of the reference semantics written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace
from pipeline.oid_metric import average_precision, evaluate, expand_ground_truth
from tests.conftest import CHALLENGE_CLASSES, CHALLENGE_HIERARCHY

# A small hierarchy: 0 Animal > 1 Dog, 2 Cat; 3 Toy > 4 Teddy; Teddy is also under 5 Bear (under Animal)
TREE = {"LabelName": "/m/0bl9f", "Subcategory": [
    {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog"}, {"LabelName": "/m/cat"},
                                               {"LabelName": "/m/bear", "Subcategory": [{"LabelName": "/m/teddy"}]}]},
    {"LabelName": "/m/toy", "Subcategory": [{"LabelName": "/m/teddy"}]}]}
MIDS = ["/m/animal", "/m/dog", "/m/cat", "/m/toy", "/m/teddy", "/m/bear"]
ANIMAL, DOG, CAT, TOY, TEDDY, BEAR = range(6)


def _hierarchy():
    import json

    labels = LabelSpace.from_pairs([(m, m[3:]) for m in MIDS])
    return labels, Hierarchy.from_json_text(json.dumps(TREE))


def _score(boxes, labels=(), dets=(), num_images=1):
    """boxes: (image, class, x1, y1, x2, y2, group); labels: (image, class, positive); dets: (image, class, score, box)."""
    space, hierarchy = _hierarchy()
    up = hierarchy.ancestor_matrix(space)
    b = np.array([x[:6] for x in boxes], dtype=float).reshape(-1, 6)
    gt = expand_ground_truth(num_images, up, b[:, 0].astype(int), b[:, 1].astype(int), b[:, 2:6],
                             np.array([x[6] for x in boxes], dtype=bool),
                             np.array([x[0] for x in labels], dtype=int), np.array([x[1] for x in labels], dtype=int),
                             np.array([x[2] for x in labels], dtype=bool))
    d = list(dets)
    result = evaluate(gt, [x[0] for x in d], [x[1] for x in d], [x[2] for x in d],
                      np.array([x[3] for x in d], dtype=float).reshape(-1, 4))
    return result


def test_duplicate_detection_is_a_false_positive():
    r = _score([(0, DOG, 0, 0, 10, 10, 0)], dets=[(0, DOG, 0.9, (0, 0, 10, 10)), (0, DOG, 0.8, (0, 0, 10, 10))])
    # TP then FP: precision 1 at recall 1 -> AP 1; but the FP is counted
    assert r.ap[0, DOG] == 1.0 and r.num_detections[DOG] == 2
    r = _score([(0, DOG, 0, 0, 10, 10, 0)], dets=[(0, DOG, 0.8, (0, 0, 10, 10)), (0, DOG, 0.9, (0, 0, 10, 9))])
    assert r.ap[0, DOG] == 1.0  # the higher score takes the box, the other is a duplicate FP
    r = _score([(0, DOG, 0, 0, 10, 10, 0), (0, DOG, 20, 20, 30, 30, 0)],
               dets=[(0, DOG, 0.9, (0, 0, 10, 10)), (0, DOG, 0.8, (0, 0, 10, 10)), (0, DOG, 0.7, (20, 20, 30, 30))])
    # TP, FP, TP: precisions 1, 1/2, 2/3 at recalls .5, .5, 1 -> AP = .5 * 1 + .5 * 2/3
    assert r.ap[0, DOG] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_two_detections_inside_one_group_of_box_count_one_tp_at_the_max_score():
    boxes = [(0, CAT, 0, 0, 100, 100, 1), (0, CAT, 200, 200, 210, 210, 0)]
    dets = [(0, CAT, 0.3, (10, 10, 20, 20)), (0, CAT, 0.6, (30, 30, 40, 40)), (0, CAT, 0.5, (200, 200, 210, 210)),
            (0, CAT, 0.4, (500, 500, 510, 510))]
    r = _score(boxes, dets=dets)
    # counted: group TP @0.6, TP @0.5, FP @0.4 -> precisions 1, 1, 2/3; recalls .5, 1, 1 -> AP 1
    assert r.ap[0, CAT] == 1.0 and r.num_detections[CAT] == 3
    assert r.num_positives[CAT] == 2  # the group-of box counts once


def test_group_of_box_absorbing_only_non_positive_scores_adds_no_tp():
    r = _score([(0, CAT, 0, 0, 100, 100, 1)], dets=[(0, CAT, 0.0, (10, 10, 20, 20))])
    assert r.ap[0, CAT] == 0.0 and r.num_detections[CAT] == 0


def test_verified_negative_class_counts_false_positives_unverified_class_is_ignored():
    boxes = [(0, DOG, 0, 0, 10, 10, 0)]
    labels = [(0, CAT, False)]  # verified absent
    dets = [(0, DOG, 0.9, (0, 0, 10, 10)), (0, CAT, 0.95, (0, 0, 10, 10)), (0, TOY, 0.99, (0, 0, 10, 10))]
    r = _score(boxes, labels, dets)
    assert r.num_detections[CAT] == 1 and r.num_detections[TOY] == 0  # TOY is neither labelled nor boxed
    assert math.isnan(r.ap[0, CAT]) and math.isnan(r.ap[0, TOY])  # no positives anywhere
    # the CAT FP hurts CAT on another image where CAT has a positive
    boxes2 = boxes + [(1, CAT, 0, 0, 10, 10, 0)]
    r2 = _score(boxes2, labels, dets + [(1, CAT, 0.5, (0, 0, 10, 10))], num_images=2)
    assert r2.ap[0, CAT] == pytest.approx(0.5)  # FP @.95 then TP @.5


def test_parent_class_prediction_scored_against_expanded_ground_truth_and_two_parents():
    boxes = [(0, TEDDY, 0, 0, 10, 10, 0)]
    dets = [(0, ANIMAL, 0.9, (0, 0, 10, 10)), (0, TOY, 0.8, (0, 0, 10, 10)), (0, BEAR, 0.7, (0, 0, 10, 10)),
            (0, DOG, 0.6, (0, 0, 10, 10))]
    r = _score(boxes, dets=dets)
    for cls in (TEDDY, TOY, BEAR, ANIMAL):  # teddy expands through both parents up to Animal
        assert r.num_positives[cls] == 1
    assert r.ap[0, ANIMAL] == r.ap[0, TOY] == r.ap[0, BEAR] == 1.0
    assert r.ap[0, TEDDY] == 0.0  # positive, but no detection
    assert r.num_detections[DOG] == 0  # Dog is not evaluated on this image: ignored


def test_positive_label_expands_up_negative_label_expands_down():
    labels = [(0, TEDDY, True), (0, ANIMAL, False)]
    dets = [(0, TOY, 0.9, (0, 0, 1, 1)), (0, DOG, 0.8, (0, 0, 1, 1)), (0, CAT, 0.7, (0, 0, 1, 1))]
    r = _score([], labels, dets)
    assert r.num_detections[TOY] == 1 and r.num_detections[DOG] == 1 and r.num_detections[CAT] == 1


def test_invalid_detection_boxes_and_unknown_images_are_dropped():
    r = _score([(0, DOG, 0, 0, 10, 10, 0)], dets=[(0, DOG, 0.9, (5, 0, 5, 10)), (0, DOG, 0.8, (0, 0, 10, 10)),
                                                  (-1, DOG, 0.99, (0, 0, 10, 10))])
    assert r.num_detections[DOG] == 1 and r.ap[0, DOG] == 1.0


def test_iou_threshold_is_inclusive_and_thresholds_vary():
    # IoU exactly 0.5: det (0,0,10,10) vs gt (0,0,10,5)... area 50/100
    r = _score([(0, DOG, 0, 0, 10, 5, 0)], dets=[(0, DOG, 0.9, (0, 0, 10, 10))])
    assert r.ap[0, DOG] == 1.0
    space, hierarchy = _hierarchy()
    gt = expand_ground_truth(1, hierarchy.ancestor_matrix(space), [0], [DOG], np.array([[0, 0, 10, 6.0]]), [False])
    res = evaluate(gt, [0], [DOG], [0.9], np.array([[0, 0, 10, 10.0]]), thresholds=(0.5, 0.7))
    assert res.ap[0, DOG] == 1.0 and res.ap[1, DOG] == 0.0


def test_average_precision_voc_all_points():
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1], bool), 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0
    assert math.isnan(average_precision(np.array([0.5]), np.array([False]), 0))


def test_real_challenge_hierarchy_expands_correctly():
    labels = LabelSpace.from_csv_text(CHALLENGE_CLASSES.read_text())
    hierarchy = Hierarchy.from_json_text(CHALLENGE_HIERARCHY.read_text())
    up = hierarchy.ancestor_matrix(labels)
    tomato = labels.names.index("Tomato")
    gt = expand_ground_truth(1, up, [0], [tomato], np.array([[0.1, 0.1, 0.5, 0.5]]), [False])
    names = {labels.names[c] for c in gt.box_class}
    assert names == {"Tomato", "Fruit", "Vegetable"} and len(gt.box_class) == up[tomato].sum() == 3
    fruit = labels.names.index("Fruit")
    neg = expand_ground_truth(1, up, [], [], np.zeros((0, 4)), [], [0], [fruit], [False])
    assert neg.evaluated[0, tomato] and neg.evaluated[0, fruit] and neg.num_positives.sum() == 0


# -- randomized comparison with a loop implementation of the reference semantics ------------------


def _reference(hierarchy, mids, images, thresholds=0.5):
    """Obviously-correct loops: images = {id: (boxes [(mid, box, group)], labels [(mid, conf)], dets [(mid, score, box)])}."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    def ioa(det, box):
        iw = max(0.0, min(det[2], box[2]) - max(det[0], box[0]))
        ih = max(0.0, min(det[3], box[3]) - max(det[1], box[1]))
        area = (det[2] - det[0]) * (det[3] - det[1])
        return iw * ih / area if area > 0 else 0.0

    scores = {m: [] for m in mids}
    positives = dict.fromkeys(mids, 0)
    for boxes, labels, dets in images.values():
        expanded = [(c, box, g) for m, box, g in boxes for c in {m} | hierarchy.ancestors(m)]
        classes = {c for c, _, _ in expanded}
        for m, conf in labels:
            classes |= ({m} | hierarchy.ancestors(m)) if int(float(conf)) == 1 else ({m} | hierarchy.descendants(m))
        for c, _, _ in expanded:
            positives[c] += 1
        for c in classes:
            cd = sorted([(s, box) for m, s, box in dets if m == c and box[0] < box[2] and box[1] < box[3]],
                        key=lambda x: -x[0])
            normal = [box for cc, box, g in expanded if cc == c and not g]
            group = [box for cc, box, g in expanded if cc == c and g]
            taken = [False] * len(normal)
            group_score = [None] * len(group)
            for s, box in cd:
                tp = False
                if normal:
                    ious = [iou(box, n) for n in normal]
                    best = int(np.argmax(ious))
                    if ious[best] >= thresholds and not taken[best]:
                        taken[best] = True
                        tp = True
                if tp:
                    scores[c].append((s, True))
                    continue
                if group:
                    ioas = [ioa(box, g) for g in group]
                    best = int(np.argmax(ioas))
                    if ioas[best] >= thresholds:
                        group_score[best] = max(group_score[best] or 0.0, s)
                        continue
                scores[c].append((s, False))
            for gs in group_score:
                if gs is not None and gs > 0:
                    scores[c].append((gs, True))
    aps = {}
    for m in mids:
        if positives[m] == 0:
            continue
        s = sorted(scores[m], key=lambda x: -x[0])
        tp = np.array([t for _, t in s], dtype=float)
        if len(tp) == 0:
            aps[m] = 0.0
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
        prec = list(ctp / (ctp + cfp))
        rec = list(ctp / positives[m])
        prec, rec = [0.0] + prec + [0.0], [0.0] + rec + [1.0]
        for i in range(len(prec) - 2, -1, -1):
            prec[i] = max(prec[i], prec[i + 1])
        aps[m] = sum((rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1])
    return aps


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_loop_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    space, hierarchy = _hierarchy()
    mids = list(space.mids)
    images = {}
    scores = rng.permutation(100000)[:4000] / 100000 + 0.00001  # distinct: the comparison is tie-free
    k = 0
    for i in range(25):
        boxes, labels, dets = [], [], []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.random(2) * 60
            boxes.append((mids[rng.integers(6)], (x, y, x + 5 + rng.random() * 30, y + 5 + rng.random() * 30),
                          bool(rng.random() < 0.2)))
        for _ in range(rng.integers(0, 3)):
            labels.append((mids[rng.integers(6)], str(rng.choice(["1", "0", "0.5", "1.0"]))))
        for _ in range(rng.integers(0, 15)):
            if boxes and rng.random() < 0.7:  # near a box
                _, b, _ = boxes[rng.integers(len(boxes))]
                jitter = rng.normal(0, 3, 4)
                box = (b[0] + jitter[0], b[1] + jitter[1], b[2] + jitter[2], b[3] + jitter[3])
            else:
                x, y = rng.random(2) * 60
                box = (x, y, x + rng.random() * 30, y + rng.random() * 30)
            dets.append((mids[rng.integers(6)], float(scores[k]), box))
            k += 1
        images[f"img{i}"] = (boxes, labels, dets)
    images["no_gt"] = ([], [], [(mids[0], 0.99999, (0, 0, 5, 5))])

    expected = _reference(hierarchy, mids, images)
    ids = [i for i, (b, lab, _) in images.items() if b or lab]
    code = {i: n for n, i in enumerate(ids)}
    up = hierarchy.ancestor_matrix(space)
    bi = [code[i] for i, (b, _, _) in images.items() for _ in b]
    bc = [space.index(m) for b, _, _ in images.values() for m, _, _ in b]
    bb = np.array([box for b, _, _ in images.values() for _, box, _ in b]).reshape(-1, 4)
    bg = [g for b, _, _ in images.values() for _, _, g in b]
    li = [code[i] for i, (_, lab, _) in images.items() for _ in lab]
    lc = [space.index(m) for _, lab, _ in images.values() for m, _ in lab]
    lp = [int(float(c)) == 1 for _, lab, _ in images.values() for _, c in lab]
    gt = expand_ground_truth(len(ids), up, bi, bc, bb, bg, li, lc, lp)
    di = [code.get(i, -1) for i, (_, _, d) in images.items() for _ in d]
    dc = [space.index(m) for _, _, d in images.values() for m, _, _ in d]
    ds = [s for _, _, d in images.values() for _, s, _ in d]
    db = np.array([box for _, _, d in images.values() for _, _, box in d]).reshape(-1, 4)
    result = evaluate(gt, di, dc, ds, db, chunk_images=7)  # several chunks
    for m in mids:
        c = space.index(m)
        if m in expected:
            assert result.ap[0, c] == pytest.approx(expected[m], abs=1e-12), m
        else:
            assert math.isnan(result.ap[0, c]), m
    assert result.mean_ap() == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
