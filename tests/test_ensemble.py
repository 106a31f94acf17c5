"""Ensemble merging (weighted boxes fusion, box voting) on hand-computed boxes, and the members of
an inference run: several checkpoints, weights, TTA variants and a class-subset expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.errors import ConfigError
from pipeline.detections import Detections
from pipeline.ensemble import MemberDetections, fuse

A0 = [0.0, 0.0, 0.10, 0.10]
A1 = [0.01, 0.01, 0.11, 0.11]  # IoU with A0 = 0.81 / 1.19 = 0.68
FAR = [0.5, 0.5, 0.7, 0.7]


def member(rows, weight=1.0, covers=(True, True, True)):
    """rows: (image, class, score, box)."""
    return MemberDetections(Detections([r[0] for r in rows], np.array([r[1] for r in rows], np.int64),
                                       np.array([r[2] for r in rows]),
                                       np.array([r[3] for r in rows], np.float64).reshape(-1, 4)),
                            weight, np.array(covers))


def by_class(out, key="a"):
    sel = [i for i, k in enumerate(out.keys) if k == key]
    return {int(out.classes[i]): (float(out.scores[i]), out.boxes[i]) for i in sel}


def test_wbf_fuses_overlapping_boxes_and_halves_a_box_one_member_missed():
    out = fuse([member([("a", 0, 0.9, A0), ("a", 1, 0.8, FAR)]), member([("a", 0, 0.6, A1)])], "wbf", iou=0.55)
    found = by_class(out)
    assert len(out.scores) == 2
    score, box = found[0]
    assert score == pytest.approx((0.9 + 0.6) / 2)
    np.testing.assert_allclose(box, (0.9 * np.array(A0) + 0.6 * np.array(A1)) / 1.5)
    score, box = found[1]
    assert score == pytest.approx(0.8 / 2)  # one of two equal members saw it
    np.testing.assert_allclose(box, FAR)
    assert list(out.scores) == sorted(out.scores, reverse=True)


def test_vote_keeps_the_best_score_and_votes_the_coordinates():
    out = fuse([member([("a", 0, 0.9, A0), ("a", 1, 0.8, FAR)]), member([("a", 0, 0.6, A1)])], "vote", iou=0.55)
    found = by_class(out)
    assert found[0][0] == pytest.approx(0.9) and found[1][0] == pytest.approx(0.8)
    np.testing.assert_allclose(found[0][1], (0.9 * np.array(A0) + 0.6 * np.array(A1)) / 1.5)


def test_member_weights_scale_coordinates_and_confidence():
    out = fuse([member([("a", 0, 0.9, A0)], weight=2.0), member([("a", 0, 0.6, A1)], weight=1.0)], "wbf", iou=0.55)
    score, box = by_class(out)[0]
    assert score == pytest.approx((2 * 0.9 + 0.6) / 3)
    np.testing.assert_allclose(box, (1.8 * np.array(A0) + 0.6 * np.array(A1)) / 2.4)


def test_classes_images_and_distant_boxes_stay_apart():
    out = fuse([member([("a", 0, 0.9, A0), ("b", 0, 0.7, A0)]), member([("a", 1, 0.6, A1), ("a", 0, 0.5, FAR)])],
               "wbf", iou=0.55)
    assert sorted(zip(out.keys, out.classes.tolist(), np.round(out.scores, 6).tolist(), strict=True)) == [
        ("a", 0, 0.25), ("a", 0, 0.45), ("a", 1, 0.3), ("b", 0, 0.35)]


def test_one_member_counts_once_per_cluster_with_its_best_box():
    # member 0 put two boxes on one object: the cluster's confidence takes its best one only
    out = fuse([member([("a", 0, 0.9, A0), ("a", 0, 0.5, A1)]), member([("a", 0, 0.7, A1)])], "wbf", iou=0.55)
    score, box = by_class(out)[0]
    assert len(out.scores) == 1 and score == pytest.approx((0.9 + 0.7) / 2)
    np.testing.assert_allclose(box, (0.9 * np.array(A0) + 0.5 * np.array(A1) + 0.7 * np.array(A1)) / 2.1)


def test_an_expert_votes_on_its_own_classes_only():
    generalist = member([("a", 0, 0.8, A0), ("a", 2, 0.6, FAR)])
    expert = member([("a", 2, 0.9, [0.51, 0.5, 0.71, 0.7])], covers=(False, False, True))
    found = by_class(fuse([generalist, expert], "wbf", iou=0.55))
    assert found[0][0] == pytest.approx(0.8)  # the expert cannot detect class 0: no penalty
    assert found[2][0] == pytest.approx((0.6 + 0.9) / 2)


def test_skip_score_and_max_detections():
    rows = [("a", 0, s, [0.1 * k, 0.0, 0.1 * k + 0.05, 0.05]) for k, s in enumerate([0.9, 0.8, 0.05, 0.7])]
    out = fuse([member(rows), member(rows)], "wbf", iou=0.55, skip_score=0.1, max_detections=2)
    np.testing.assert_allclose(out.scores, [0.9, 0.8])
    assert fuse([member([]), member([])]).scores.shape == (0,)


def test_leader_clusters_match_a_greedy_reference_on_random_boxes():
    """The vectorised clustering equals the greedy loop it stands for: boxes in weighted score order,
    each joining the first earlier leader of its class it overlaps by more than iou."""
    from torchvision.ops import box_iou

    rng = np.random.default_rng(0)
    members = []
    for m in range(3):
        xy = rng.uniform(0, 0.8, (60, 2))
        wh = rng.uniform(0.05, 0.2, (60, 2))
        members.append(member([("a", int(c), float(s), [*p, *(p + q)]) for c, s, p, q in
                               zip(rng.integers(0, 3, 60), rng.uniform(0.05, 1, 60), xy, wh, strict=True)],
                              weight=[1.0, 2.0, 0.5][m]))
    out = fuse(members, "wbf", iou=0.5)
    boxes = np.concatenate([m.detections.boxes for m in members])
    scores = np.concatenate([m.detections.scores * m.weight for m in members])
    classes = np.concatenate([m.detections.classes for m in members])
    who = np.concatenate([np.full(len(m.detections), k) for k, m in enumerate(members)])
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    leaders, clusters = [], {}
    for i in order:
        home = next((j for j in leaders if classes[j] == classes[i] and iou[j, i] > 0.5), None)
        if home is None:
            leaders.append(i)
            home = i
        clusters.setdefault(home, []).append(i)
    expected = []
    for lead, items in clusters.items():
        w = scores[items]
        best = {k: max(scores[i] for i in items if who[i] == k) for k in set(who[items])}
        expected.append((int(classes[lead]), sum(best.values()) / 3.5, *(w @ boxes[items] / w.sum())))
    got = sorted(zip(out.classes.tolist(), out.scores.tolist(), *out.boxes.T.tolist(), strict=True))
    np.testing.assert_allclose(np.array(got), np.array(sorted(expected)), rtol=1e-9, atol=1e-12)


def test_inference_members_from_checkpoints_weights_and_saved_configs(tmp_path):
    from pipeline.config import dump_config
    from pipeline.evaluate import inference_members
    from tests.conftest import REPO, tiny_config

    synth = REPO / "tests" / "data" / "oid"  # any path: members are resolved without reading data here
    cfg = tiny_config(synth, tmp_path / "shards", "model.test.score_thresh=0.02")
    plain = tmp_path / "a" / "checkpoint_000001"
    plain.mkdir(parents=True)
    (plain / "state.pt").write_bytes(b"")
    saved = tmp_path / "b" / "checkpoint_000001"
    saved.mkdir(parents=True)
    (saved / "state.pt").write_bytes(b"")
    other = tiny_config(synth, tmp_path / "shards", "model.roi.head=sibling", "model.test.score_thresh=0.5")
    (saved / "config.yaml").write_text(dump_config(other))

    (single,) = inference_members(cfg, [str(plain)])
    assert single.cfg.model == cfg.model and single.weight == 1.0
    a, b = inference_members(tiny_config(synth, tmp_path / "shards", "model.test.score_thresh=0.02",
                                         "ensemble.weights=[2, 1]"), [str(plain), str(saved)])
    assert (a.weight, b.weight) == (2.0, 1.0)
    assert b.cfg.model.roi.head == "sibling"  # its own model section, from the config beside its checkpoint
    assert b.cfg.model.test.score_thresh == 0.02  # the run's test section
    tta = tiny_config(synth, tmp_path / "shards",
                      f"ensemble.members=[{{checkpoint: {plain}}}, {{checkpoint: {plain}, tta_flip: true}}]")
    first, flipped = inference_members(tta, [])
    assert (first.cfg.model.test.tta_flip, flipped.cfg.model.test.tta_flip) == (False, True)
    with pytest.raises(ConfigError, match="not both"):
        inference_members(tta, [str(plain)])
    with pytest.raises(ConfigError, match="3 values for 2 members"):
        inference_members(tiny_config(synth, tmp_path, "ensemble.weights=[1, 2, 3]"), [str(plain), str(saved)])
