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
                      "inference.images_per_batch=1")  # batches of one: sharding cannot change the padding
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
    assert one.num_images == three.num_images == 9
    one, three = one.detections, three.detections
    assert one.keys == three.keys and len(one) > 0
    np.testing.assert_allclose(one.scores, three.scores, rtol=1e-5)
    np.testing.assert_allclose(one.boxes, three.boxes, atol=1e-4)
    assert ((one.boxes >= -1e-6) & (one.boxes <= 1 + 1e-6)).all()  # normalized


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


def test_one_inference_loop_feeds_evaluators_part_by_part(setup):
    """detectron2's contract: the evaluator is reset, fed each part (a batch, a task, a rank) and
    evaluated once; scoring the parts gives exactly what scoring the whole split gives."""
    from pipeline.detections import Detections
    from pipeline.evaluators import OIDEvaluator, score_detections
    from pipeline.inference import (
        DetectionsCollector,
        detect_range,
        inference_on_batches,
        load_model_for_inference,
        shard_batches,
    )
    from pipeline.loader import ShardDataset

    _, cfg, ckpt = setup
    device = torch.device("cpu")
    model = load_model_for_inference(cfg, str(ckpt), device)
    whole = detect_range(model, cfg, "validation", 0, 9, 1, device)
    parts = [detect_range(model, cfg, "validation", lo, hi, 1, device) for lo, hi in ((0, 4), (4, 9))]
    assert isinstance(whole, Detections) and whole.num_images() == 9 and len(whole) > 0
    assert Detections.concat(parts).keys == whole.keys
    evaluator = OIDEvaluator(cfg, "validation")
    evaluator.reset()
    evaluator.process(parts[1])
    evaluator.reset()  # a reset forgets what came before
    for part in parts:
        evaluator.process(part)
    scored = evaluator.evaluate()
    assert scored.mean_ap() == pytest.approx(score_detections(evaluator.inputs, whole).mean_ap())
    ds = ShardDataset(cfg.data.shards, "validation", cfg.model.input.min_size, cfg.model.input.max_size)
    seen: list[int] = []

    class Counting(DetectionsCollector):  # a collector that also sees how the loop cuts the split
        def process(self, detections: Detections) -> None:
            seen.append(detections.num_images())
            super().process(detections)

    out = inference_on_batches(model, cfg, shard_batches(ds, 0, 9, 4), device, Counting())
    assert seen == [4, 4, 1]  # one record per batch (batches of 4 pad differently: other boxes, same images)
    assert list(dict.fromkeys(out.keys)) == list(dict.fromkeys(whole.keys))


def test_inference_tasks_follow_the_inference_section_and_the_cluster(setup):
    """Inference resources are their own config section: by default a task per GPU, or per
    cpus_per_task CPUs of the cluster (2 here), never more tasks than images."""
    import dataclasses

    from data_prep.errors import InputError
    from pipeline.inference import inference_plan

    _, cfg, _ = setup
    with_inference = lambda **kw: dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, **kw))  # noqa: E731
    assert inference_plan(cfg, 9) == inference_plan(with_inference(), 9)
    plan = inference_plan(cfg, 9)
    assert (plan.tasks, plan.num_gpus, plan.device) == (2, 0.0, "cpu")  # the session's 2 CPUs, no GPU
    assert inference_plan(with_inference(num_tasks=5), 9).tasks == 5
    assert inference_plan(with_inference(num_tasks=50), 9).tasks == 9
    assert inference_plan(with_inference(cpus_per_task=2.0), 9).tasks == 1
    with pytest.raises(InputError, match="has no GPU"):
        inference_plan(with_inference(use_gpu=True), 9)
