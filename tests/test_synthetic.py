"""The synthetic dataset is in the official formats, deterministic, and has the promised structure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace
from data_prep.oid_files import BOX_FLAGS, ImageCoder, read_boxes, read_image_labels
from data_prep.rejects import RejectLog
from data_prep.synthetic import generate, split_files


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    generate(tmp_path / "a", 12, 4, seed=5)
    generate(tmp_path / "b", 12, 4, seed=5)
    generate(tmp_path / "c", 12, 4, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_files_parse_with_the_official_readers(tmp_path):
    summary = generate(tmp_path, 60, 20, seed=1)
    labels = LabelSpace.from_csv_text((tmp_path / summary["classes"]).read_text())
    hierarchy = Hierarchy.from_json_text((tmp_path / summary["hierarchy"]).read_text())
    assert hierarchy.check_label_space(labels) == ([], [])
    star = "/m/syn_star"
    assert hierarchy.parents[star] == {"/m/syn_polygon", "/m/syn_symbol"}
    assert hierarchy.depth() == 4
    for split, n_images in (("train", 60), ("validation", 20)):
        files = split_files(split)
        coder, log = ImageCoder(), RejectLog()
        boxes = read_boxes(str(tmp_path / files["boxes"]), labels, coder, log)
        image_labels = read_image_labels(str(tmp_path / files["labels"]), labels, coder, log)
        assert len(log) == 0, log.records[:3]
        assert len(coder) == n_images == len(list((tmp_path / files["images"]).glob("*.jpg")))
        assert boxes.flags["IsGroupOf"].sum() > 0  # clusters of small shapes
        assert image_labels.positive.any() and (~image_labels.positive).any()
        if split == "train":
            assert all((boxes.flags[f] >= 0).all() for f in BOX_FLAGS)
            assert boxes.flags["IsOccluded"].sum() > 0 and boxes.flags["IsTruncated"].sum() > 0
        else:
            assert (boxes.flags["IsOccluded"] == -1).all()  # the short layout has no such column
        assert all("." not in i for i in coder.ids)
        assert np.all(boxes.boxes[:, 2] > boxes.boxes[:, 0])
