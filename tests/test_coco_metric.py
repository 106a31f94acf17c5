"""COCO AP through pycocotools on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.coco_metric import coco_ap

SIZES = np.array([[200, 300], [200, 300]])
GT_BOXES = np.array([[10.0, 10, 30, 30], [50, 50, 150, 150], [0, 0, 20, 20]])  # small, large, small


def _ap(det_boxes, det_scores, det_class=(0, 1, 0), det_image=(0, 0, 1), crowd=(0, 0, 0)):
    return coco_ap(SIZES, np.array([0, 0, 1]), np.array([0, 1, 0]), GT_BOXES, np.array(crowd),
                   np.array(det_image), np.array(det_class), np.array(det_scores, dtype=float), np.asarray(det_boxes))


def test_perfect_detections_score_one_and_sizes_are_split():
    stats = _ap(GT_BOXES, [0.9, 0.8, 0.7])
    assert stats["AP"] == pytest.approx(1.0) and stats["AP_small"] == pytest.approx(1.0)
    assert stats["AP_large"] == pytest.approx(1.0) and stats["AP_medium"] == -1.0  # no medium objects


def test_misses_and_wrong_classes_lower_the_ap():
    shifted = GT_BOXES + np.array([8.0, 8, 8, 8])
    assert _ap(shifted, [0.9, 0.8, 0.7])["AP"] < 0.6
    assert _ap(GT_BOXES, [0.9, 0.8, 0.7], det_class=(1, 0, 1))["AP"] == 0.0
    assert _ap(np.zeros((0, 4)), [], det_class=(), det_image=())["AP"] == 0.0


def test_crowd_regions_absorb_detections():
    inside = np.array([[12.0, 12, 20, 20]])
    with_crowd = coco_ap(SIZES, np.array([0, 0]), np.array([0, 0]), np.array([[10.0, 10, 30, 30], [100, 100, 120, 120]]),
                         np.array([1, 0]), np.array([0, 0]), np.array([0, 0]), np.array([0.9, 0.8]),
                         np.concatenate([inside, [[100.0, 100, 120, 120]]]))
    assert with_crowd["AP"] == pytest.approx(1.0)  # the detection inside the crowd region is ignored
