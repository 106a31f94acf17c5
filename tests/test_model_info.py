"""tsd model-info: the bundled configs build, and their counts are the paper's."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from tests.conftest import REPO


def _info(capsys, name: str, *extra: str) -> dict:
    assert main(["model-info", "--config", str(REPO / "configs" / name), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, total, inference", [
    ("faster_rcnn_r50_fpn_sibling_coco.yaml", 41_757_156, 41_757_156),
    ("faster_rcnn_r50_fpn_double_coco.yaml", 55_652_836, 55_652_836),
    ("faster_rcnn_r50_fpn_tsd_coco.yaml", 73_332_445, 59_021_640),
])
def test_coco_configs_have_the_papers_parameter_counts(capsys, name, total, inference):
    info = _info(capsys, name, "--no-flops")
    assert (info["total_params"], info["inference_params"]) == (total, inference)
    assert sum(info["params_by_module"].values()) == total
    assert set(info["params_by_module"]) == {"transform", "backbone", "rpn", "roi_heads"}


def test_oid_configs_use_500_classes_and_the_oid_anchors(capsys):
    from pipeline.config import load_config
    from tsd_model.build import build_model

    model = build_model(load_config(REPO / "configs" / "faster_rcnn_r50_fpn_tsd_oid.yaml").model, load_weights=False)
    stage = model.roi_heads.stages[0]
    assert stage.tsd.branches.cls_score.out_features == 501
    assert model.rpn.anchor_generator.num_anchors_per_location() == [18] * 5


def test_tiny_config_reports_flops_and_text_output(capsys):
    info = _info(capsys, "tiny.yaml", "--height", "160", "--width", "224")
    assert info["flops"] > 0 and info["flops_image"] == [160, 224]
    assert main(["model-info", "--config", str(REPO / "configs" / "tiny.yaml"), "--no-flops"]) == 0
    text = capsys.readouterr().out
    assert "parameters, at inference" in text and "roi_heads.stages.0.sibling" in text
