"""Training on a real local Ray (2 CPU workers, gloo): DDP equals one worker, exact resume, a killed
worker is survived with checkpoints in S3 (moto server), TensorBoard events read back."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from data_prep.errors import InputError
from data_prep.prep import run_prep
from data_prep.synthetic import generate
from pipeline.checkpoint import STATE_FILE
from pipeline.train import run_training
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")

# deterministic training: no BN batch statistics, every anchor and RoI sampled, no loader processes
EXACT = ["model.backbone.norm=frozen_bn", "model.rpn.batch_size_per_image=100000",
         "model.roi.batch_size_per_image=100000", "model.rpn.positive_fraction=1.0",
         "model.roi.positive_fraction=1.0", "loader.num_workers=0", "loader.sampler=uniform",
         "train.image_log_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root / "synth", num_train=16, num_validation=6, seed=4, min_size=128, max_size=128)
    cfg = tiny_config(root / "synth", root / "shards")
    run_prep(cfg.data, cfg.prep, progress=False)
    return root


def _cfg(shards: Path, tmp: Path, name: str, *overrides: str):
    return tiny_config(shards / "synth", shards / "shards", f"train.storage_path={tmp / 'runs'}",
                       f"train.local_dir={tmp / 'local'}", f"train.run_name={name}", *overrides)


def _final_state(summary: dict) -> dict:
    return torch.load(Path(summary["checkpoint"]) / STATE_FILE, map_location="cpu", weights_only=True)


def test_two_workers_equal_one_worker_and_tensorboard_has_the_tags(shards, tmp_path):
    """Two DDP workers with their RoI stages compiled (``roi.compile``, captured by aot_eager)
    end with the weights of one eager worker on the same global batches."""
    common = [*EXACT, "train.max_iterations=3", "train.checkpoint_every=3", "train.warmup_iterations=0"]
    one = run_training(_cfg(shards, tmp_path, "one", *common, "train.num_workers=1", "train.images_per_worker=2",
                            "train.image_log_every=2"))
    two = run_training(_cfg(shards, tmp_path, "two", *common, "train.num_workers=2", "train.images_per_worker=1",
                            "model.roi.compile=default", "model.roi.compile_backend=aot_eager"))
    assert one["metrics"]["iteration"] == two["metrics"]["iteration"] == 3
    a, b = _final_state(one)["model"], _final_state(two)["model"]
    initial = _initial_state()
    moved = 0
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=2e-5, rtol=1e-4, msg=name)
        moved += int(not torch.equal(value, initial[name]))
    assert moved > 10  # training really changed the weights

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(one["tensorboard"], size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/loss_objectness", "loss/loss_rpn_box_reg", "loss/loss_sibling_cls", "loss/loss_sibling_box",
                "loss/loss_tsd_cls", "loss/loss_tsd_box", "loss/loss_pc_cls", "loss/loss_pc_loc", "loss/total",
                "train/lr", "train/grad_norm", "train/images_per_s", "train/data_wait_fraction"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert {"train/detections", "train/tsd_proposals"} <= set(events.Tags()["images"])


def _initial_state() -> dict:
    from pipeline.config import load_config
    from tests.conftest import REPO
    from tsd_model.build import build_model

    torch.manual_seed(0)
    return build_model(load_config(REPO / "configs" / "tiny.yaml", EXACT).model).state_dict()


def test_resume_continues_with_the_same_order(shards, tmp_path):
    common = [*EXACT, "train.num_workers=2", "train.images_per_worker=1", "train.checkpoint_every=2"]
    straight = run_training(_cfg(shards, tmp_path, "straight", *common, "train.max_iterations=6"))
    first = run_training(_cfg(shards, tmp_path, "stopped", *common, "train.max_iterations=4"))
    assert first["metrics"]["iteration"] == 4
    with pytest.raises(Exception, match="already exists"):
        run_training(_cfg(shards, tmp_path, "stopped", *common, "train.max_iterations=6"))
    resumed = run_training(_cfg(shards, tmp_path, "stopped", *common, "train.max_iterations=6"), resume=True)
    assert resumed["metrics"]["iteration"] == 6 and resumed["metrics"]["restarts"] == 1
    a, b = _final_state(straight)["model"], _final_state(resumed)["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_killed_worker_recovers_from_the_last_checkpoint_in_s3(shards, tmp_path, s3_server, s3_bucket):
    import boto3

    cfg = tiny_config(shards / "synth", shards / "shards", f"train.storage_path=s3://{s3_bucket}/runs",
                      f"train.local_dir={tmp_path / 'local'}", "train.run_name=killed", f"data.s3_endpoint_url={s3_server}",
                      "train.num_workers=2", "train.images_per_worker=1", "train.max_iterations=24",
                      "train.checkpoint_every=3", "train.image_log_every=0", "loader.num_workers=0", "train.log_every=1")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    status = tmp_path / "local" / "killed" / "workers" / "rank1.json"
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        if status.exists():
            info = json.loads(status.read_text())
            # a few iterations after the checkpoint of iteration 6, so that Ray Train's controller
            # has registered at least one checkpoint before the failure
            if info["iteration"] >= 11 and info["state"] == "running":
                mid_run = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
                    Bucket=s3_bucket, Prefix="runs/killed/tensorboard/").get("Contents", [])
                os.kill(info["pid"], signal.SIGKILL)
                killed_at = info["iteration"]
                break
        time.sleep(0.05)
    thread.join(timeout=400)
    assert killed_at is not None, "the worker must be killed mid-run"
    assert result["metrics"]["iteration"] == 24
    assert result["metrics"]["restarts"] >= 1
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix="runs/killed/")["Contents"]]
    checkpoints = {k.split("/")[2] for k in keys if k.endswith(STATE_FILE)}
    assert len(checkpoints) >= 2 and result["checkpoint"].split("/")[-1] in checkpoints

    # the monitoring files are in the run's storage too: tensorboard reads them from S3 itself
    assert {"runs/killed/workers/rank0.json", "runs/killed/workers/rank1.json"} <= set(keys)
    assert json.loads(boto3.client("s3", endpoint_url=s3_server).get_object(
        Bucket=s3_bucket, Key="runs/killed/workers/rank0.json")["Body"].read())["state"] == "finished"
    assert any(k.startswith("runs/killed/tensorboard/events.out.tfevents") for k in keys)
    assert mid_run, "the events are in the run's storage while it trains (copied at every checkpoint)"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.io import gfile

    # tensorboard's own S3 reader, as `S3_ENDPOINT=... tensorboard --logdir s3://...` runs it (it reads
    # the variable when its filesystem is made, at import: make one here that sees it)
    os.environ["S3_ENDPOINT"] = s3_server
    gfile.register_filesystem("s3", gfile.S3FileSystem())
    try:
        events = EventAccumulator(f"s3://{s3_bucket}/runs/killed/tensorboard", size_guidance={"scalars": 0})
        events.Reload()
        steps = [e.step for e in events.Scalars("loss/total")]
    finally:
        del os.environ["S3_ENDPOINT"]
    assert max(steps) == 24 and len(steps) >= 20

    # the run's checkpoints are read from S3 as they are: the run (its latest) or one checkpoint
    from pipeline.checkpoint import checkpoint_iteration
    from pipeline.evaluate import run_evaluation

    cache_before = os.environ.get("TSD_CACHE")
    os.environ["TSD_CACHE"] = str(tmp_path / "cache")
    try:
        assert checkpoint_iteration(f"s3://{s3_bucket}/runs/killed", s3_server) == 24
        assert checkpoint_iteration(result["checkpoint"], s3_server) == 24
        data = run_evaluation(cfg, f"s3://{s3_bucket}/runs/killed", "validation", str(tmp_path / "eval"), progress=False)
        assert data["checkpoint"] == f"s3://{s3_bucket}/runs/killed" and data["num_images"] == 6
        with pytest.raises(InputError, match="no checkpoint found"):
            checkpoint_iteration(f"s3://{s3_bucket}/runs/nothing-here", s3_server)
    finally:
        os.environ.pop("TSD_CACHE")
        if cache_before is not None:
            os.environ["TSD_CACHE"] = cache_before
    assert any((tmp_path / "cache" / "checkpoints").rglob(STATE_FILE))  # copied once into the local cache


def test_evaluation_every_epoch_during_training_and_ray_trains_log_lines_are_quiet(shards, tmp_path, capfd):
    """Also: Ray Train logs a line per rank and report; the console keeps them only for --verbose
    (the streaming test's verbose run is the control that the lines exist)."""
    capfd.readouterr()
    summary = run_training(_cfg(shards, tmp_path, "with-eval", "train.num_workers=2", "train.images_per_worker=1",
                                "train.iterations_per_epoch=2", "train.max_iterations=2", "train.eval_every_epochs=1",
                                "train.image_log_every=0", "loader.num_workers=0", "train.checkpoint_every=1"))
    assert 0.0 <= summary["metrics"]["val_mAP"] <= 1.0
    time.sleep(2)  # worker logs reach the driver asynchronously
    quiet = capfd.readouterr()
    assert "Reporting training result" not in quiet.out + quiet.err
    assert "train with-eval" in quiet.out + quiet.err  # our own progress is still shown

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(summary["tensorboard"], size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/validation_mAP@0.5")] == [2]


def test_non_finite_losses_are_skipped_then_abort_with_a_clear_error(shards, tmp_path):
    from pipeline.train import TrainingError

    cfg = _cfg(shards, tmp_path, "diverging", "train.num_workers=2", "train.images_per_worker=1",
               "train.base_lr_per_image=1000.0", "train.warmup_iterations=0", "train.max_iterations=40",
               "train.max_nonfinite_in_row=3", "train.max_failures=0", "train.image_log_every=0",
               "loader.num_workers=0", "train.checkpoint_every=1000")
    with pytest.raises(TrainingError, match="3 consecutive iterations with a non-finite loss"):
        run_training(cfg)


def test_gradient_accumulation_equals_the_bigger_batch(shards, tmp_path):
    common = [*EXACT, "train.max_iterations=2", "train.checkpoint_every=2", "train.warmup_iterations=0",
              "train.num_workers=1"]
    big = run_training(_cfg(shards, tmp_path, "big", *common, "train.images_per_worker=2"))
    accumulated = run_training(_cfg(shards, tmp_path, "acc", *common, "train.images_per_worker=1",
                                    "train.grad_accumulation=2"))
    a, b = _final_state(big)["model"], _final_state(accumulated)["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_streaming_mode_trains_from_webdataset_under_bf16_autocast_and_verbose_keeps_ray_trains_lines(
        shards, tmp_path, capfd):
    """One run for three things (each Ray Train run costs ~25 s of start-up here): the streaming
    loader, bf16 autocast, and ``--verbose`` keeping Ray Train's own per-report log lines (the
    evaluation test's run checks that they are gone by default)."""
    from pipeline.loader import collate, streaming_dataset

    stream = streaming_dataset(str(shards / "shards"), "train", 160, 224, epoch_samples=5, seed=0)
    samples = list(stream)
    assert len(samples) == 5 and all(s["image"].dtype == torch.uint8 and len(s["boxes"]) == len(s["labels"])
                                     for s in samples)
    assert collate(samples)["images"].shape[0] == 5
    capfd.readouterr()
    summary = run_training(_cfg(shards, tmp_path, "stream", "loader.mode=streaming", "loader.num_workers=1",
                                "train.num_workers=2", "train.images_per_worker=1", "train.max_iterations=3",
                                "train.image_log_every=0", "train.amp=bf16", "train.log_every=1"), verbose=True)
    assert summary["metrics"]["iteration"] == 3
    losses = {k: v for k, v in summary["metrics"].items() if k.startswith("loss_")}
    assert losses and all(math.isfinite(v) for v in losses.values())
    time.sleep(2)  # worker logs reach the driver asynchronously
    chatty = capfd.readouterr()
    assert "Reporting training result" in chatty.out + chatty.err  # the control of the evaluation test's check
