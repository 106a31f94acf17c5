"""Distributed inference and evaluation on a real local Ray: sharded tasks agree with one task,
the report, predictions, plot, TensorBoard scalar and the submission file are all written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.prep import run_prep
from data_prep.synthetic import generate
from pipeline.evaluate import run_evaluation, run_inference, run_submission
from pipeline.submission import check_submission
from tests.conftest import tiny_config
from tsd_model.build import build_model

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate(root / "synth", num_train=0, num_validation=9, seed=8)
    cfg = tiny_config(root / "synth", root / "shards", "prep.splits=[validation]", "model.test.score_thresh=0.0",
                      "train.images_per_worker=1")  # batches of one: sharding cannot change the padding
    run_prep(cfg.data, cfg.prep, progress=False)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = root / "run" / "checkpoint_000"
    ckpt.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 7}, ckpt / "state.pt")
    return root, cfg, ckpt


def test_sharded_inference_equals_one_task(setup):
    _, cfg, ckpt = setup
    one = run_inference(cfg, str(ckpt), "validation", num_tasks=1, progress=False)
    three = run_inference(cfg, str(ckpt), "validation", num_tasks=3, progress=False)
    assert one["num_images"] == three["num_images"] == 9
    assert one["keys"] == three["keys"] and len(one["keys"]) > 0
    np.testing.assert_allclose(one["scores"], three["scores"], rtol=1e-5)
    np.testing.assert_allclose(one["boxes"], three["boxes"], atol=1e-4)
    assert ((one["boxes"] >= -1e-6) & (one["boxes"] <= 1 + 1e-6)).all()  # normalized


def test_evaluation_writes_report_files_and_tensorboard(setup, tmp_path):
    root, cfg, ckpt = setup
    data = run_evaluation(cfg, str(ckpt.parent), "validation", str(tmp_path / "eval"), progress=False,
                          tensorboard_dir=str(tmp_path / "tb"), iteration=7)  # a run dir: its latest checkpoint
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["mAP"] == data["mAP"] and 0.0 <= report["mAP"] <= 1.0
    assert set(report["ap_at_iou"]) >= {"0.50", "0.75", "0.95"} and "mAP_50_95" in report
    assert report["num_images"] == 9 and report["per_class"]
    sizes = report["coco_style_by_size"]
    assert set(sizes) >= {"AP", "AP_small", "AP_medium", "AP_large"} and -1.0 <= sizes["AP"] <= 1.0
    header = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[0]
    assert header == "ImageID,LabelName,Score,XMin,XMax,YMin,YMax"
    assert (tmp_path / "eval" / "pr_curves.png").stat().st_size > 1000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert "eval/validation_pr_curves" in events.Tags()["images"]
    (point,) = events.Scalars("eval/validation_mAP@0.5")
    assert point.step == 7 and point.value == pytest.approx(report["mAP"])


def test_submission_for_an_image_directory(setup, tmp_path):
    root, cfg, ckpt = setup
    out = tmp_path / "submission.csv"
    counts = run_submission(cfg, str(ckpt), str(root / "synth" / "validation"), str(out), progress=False)
    ids = {p.stem for p in (root / "synth" / "validation").glob("*.jpg")}
    assert counts["images"] == len(ids) == 9
    assert check_submission(out, None, ids)["detections"] == counts["detections"]
    assert counts["detections"] <= 9 * cfg.model.test.max_detections


def test_an_unreadable_test_image_gets_an_empty_row_and_is_reported(setup, tmp_path):
    import json
    import shutil

    root, cfg, ckpt = setup
    images = tmp_path / "test"
    shutil.copytree(root / "synth" / "validation", images)
    victim = sorted(images.glob("*.jpg"))[2]
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "submission.csv"
    counts = run_submission(cfg, str(ckpt), str(images), str(out), progress=False)
    ids = {p.stem for p in images.glob("*.jpg")}
    assert counts["images"] == len(ids) and counts["unreadable_images"] == 1
    rows = dict(line.split(",", 1) for line in out.read_text().splitlines()[1:])
    assert rows[victim.stem] == ""  # every test image keeps its row (Kaggle needs it), empty here
    report = json.loads((tmp_path / "submission-report.json").read_text())
    assert report["unreadable"][0]["image_id"] == victim.stem and victim.name in report["unreadable"][0]["problem"]
    assert not list(tmp_path.glob(".*.tmp"))  # published atomically, nothing left behind
