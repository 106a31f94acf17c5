"""COCO-format datasets: instances JSON -> the same shards, COCO AP through pycocotools."""

from __future__ import annotations

import json

import pytest
import torch

from data_prep import rejects as R
from data_prep.coco_files import coco_label_space, read_coco_boxes
from data_prep.oid_files import ImageCoder
from data_prep.prep import run_prep
from data_prep.rejects import RejectLog
from data_prep.synthetic import export_coco, generate
from pipeline.config import load_config
from pipeline.evaluate import run_evaluation
from tests.conftest import REPO
from tsd_model.build import build_model


def test_coco_reader_converts_boxes_and_rejects_bad_annotations(tmp_path):
    data = {"images": [{"id": 7, "file_name": "sub/000000000007.jpg", "width": 200, "height": 100}],
            "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 5, "bbox": [20, 10, 40, 50], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 2, "bbox": [150, 0, 50.5, 100.5], "iscrowd": 1},  # clipped
                {"id": 3, "image_id": 7, "category_id": 9, "bbox": [0, 0, 10, 10]},
                {"id": 4, "image_id": 7, "category_id": 5, "bbox": [190, 0, 30, 10]},
                {"id": 5, "image_id": 7, "category_id": 5, "bbox": [10, 10, 0, 5]},
                {"id": 6, "image_id": 99, "category_id": 5, "bbox": [10, 10, 5, 5]},
            ]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    labels, hierarchy = coco_label_space(str(path))
    assert labels.mids == ("2", "5") and labels.names == ("dog", "cat") and hierarchy.ancestors("5") == frozenset()
    coder, log = ImageCoder(), RejectLog()
    table = read_coco_boxes(str(path), labels, coder, log)
    assert coder.ids == ["000000000007"]
    torch.testing.assert_close(torch.from_numpy(table.boxes), torch.tensor([[0.1, 0.1, 0.3, 0.6], [0.75, 0, 1, 1]]))
    assert table.label.tolist() == [1, 0] and table.flags["IsGroupOf"].tolist() == [0, 1]
    assert dict(log.counts) == {R.UNKNOWN_MID: 1, R.BOX_OUTSIDE_IMAGE: 1, R.DEGENERATE_BOX: 1, R.MALFORMED_ROW: 1}
    assert all("annotation id" in r.detail for r in log.records)


@pytest.mark.usefixtures("ray_session")
def test_coco_dataset_end_to_end(tmp_path):
    generate(tmp_path / "synth", num_train=12, num_validation=6, seed=2)
    export_coco(tmp_path / "synth")
    cfg = load_config(REPO / "configs" / "tiny_coco.yaml",
                      [f"data.root={tmp_path / 'synth'}", f"data.shards={tmp_path / 'shards'}", "train.num_workers=1"])
    manifest = run_prep(cfg.data, cfg.prep, progress=False)
    assert manifest["splits"]["train"]["counts"]["images_written"] == 12
    assert manifest["num_classes"] == 12 and manifest["splits"]["validation"]["rejects"]["counts"] == {}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": build_model(cfg.model).state_dict()}, ckpt / "state.pt")
    data = run_evaluation(cfg, str(ckpt), "validation", str(tmp_path / "eval"), progress=False)
    assert data["metric"].startswith("COCO AP") and {"AP", "AP50", "AP75", "AP_small"} <= set(data)
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["num_images"] == 6
