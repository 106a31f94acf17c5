"""Detections at every level of the hierarchy: copies to every ancestor over every path, deduplicated
per class; the report's AP of leaf and parent classes and per depth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace
from pipeline.expand import AncestorExpansion
from pipeline.scoring import ap_by_level

# G(roup) -> P1, P2 -> A (A has two parents); P1 -> B; C is a top-level leaf
TREE = {"LabelName": "/m/root", "Subcategory": [
    {"LabelName": "/m/g", "Subcategory": [
        {"LabelName": "/m/p1", "Subcategory": [{"LabelName": "/m/a"}, {"LabelName": "/m/b"}]},
        {"LabelName": "/m/p2", "Subcategory": [{"LabelName": "/m/a"}]}]},
    {"LabelName": "/m/c"}]}
MIDS = ["/m/a", "/m/b", "/m/c", "/m/g", "/m/p1", "/m/p2"]
A, B, C, G, P1, P2 = range(6)


def _space():
    labels = LabelSpace.from_csv_text("".join(f"{m},{m[3:].upper()}\n" for m in MIDS))
    return labels, Hierarchy.from_json_text(json.dumps(TREE))


def _expansion(dedup="nms"):
    labels, hierarchy = _space()
    return AncestorExpansion.from_matrix(hierarchy.ancestor_matrix(labels), dedup, 0.5)


def _dets(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_a_two_parent_class_appears_once_under_each_ancestor():
    out = _expansion()(_dets([[10, 10, 50, 50]], [A], [0.9]))
    assert sorted(out["labels"].tolist()) == [A, G, P1, P2]  # G once, although two paths lead to it
    assert torch.all(out["scores"] == 0.9)
    assert torch.all(out["boxes"] == torch.tensor([10.0, 10, 50, 50]))


def test_copies_on_one_class_are_deduplicated_by_nms():
    # A and B overlap (IoU 0.75): both reach P1 and G, where NMS keeps the better one; C stays alone
    out = _expansion()(_dets([[10, 10, 50, 50], [14, 12, 54, 52], [100, 100, 120, 130]], [A, B, C], [0.9, 0.6, 0.5]))
    got = sorted(zip(out["labels"].tolist(), out["scores"].tolist(), strict=True))
    assert [c for c, _ in got] == [A, B, C, G, P1, P2]
    assert [s for _, s in got] == pytest.approx([0.9, 0.6, 0.5, 0.9, 0.9, 0.9])
    assert (out["scores"][:-1] >= out["scores"][1:]).all()  # sorted by score


def test_keep_max_merges_only_identical_boxes():
    boxes = [[10, 10, 50, 50], [10, 10, 50, 50], [14, 12, 54, 52]]  # A and B on one box, another B nearby
    out = _expansion("max")(_dets(boxes, [A, B, B], [0.9, 0.7, 0.6]))
    per_class = {c: sorted(out["scores"][out["labels"] == c].tolist(), reverse=True) for c in range(6)}
    assert per_class[P1] == pytest.approx([0.9, 0.6])  # the shared box once (max), the other box kept
    assert per_class[G] == pytest.approx([0.9, 0.6])
    assert per_class[B] == pytest.approx([0.7, 0.6]) and per_class[P2] == pytest.approx([0.9])


def test_no_detections_and_a_flat_label_space():
    assert len(_expansion()(_dets(np.zeros((0, 4)), [], []))["scores"]) == 0
    flat = AncestorExpansion.from_matrix(np.eye(3, dtype=bool))
    assert not flat.has_parents and _expansion().has_parents


def test_ap_by_level_groups_leaves_parents_and_depths():
    labels, hierarchy = _space()
    is_leaf, depth = hierarchy.class_levels(labels)
    assert is_leaf.tolist() == [True, True, True, False, False, False]
    assert depth.tolist() == [3, 3, 1, 1, 2, 2]
    ap = np.array([0.8, 0.6, np.nan, 0.2, 0.4, 0.0])  # C has no positives
    levels = ap_by_level(ap, hierarchy, labels)
    assert levels["leaf"] == {"mAP": pytest.approx(0.7), "classes": 2}
    assert levels["parent"] == {"mAP": pytest.approx(0.2), "classes": 3}
    assert levels["depth"]["3"]["mAP"] == pytest.approx(0.7) and levels["depth"]["1"]["classes"] == 1
