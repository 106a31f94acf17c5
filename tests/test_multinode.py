"""Training on a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``: a head and a
worker node, one CPU each), shards and checkpoints in S3 (moto): the workers spread over both
nodes, one node is removed mid-run, and the elastic run goes on from its last checkpoint on the
node left, with the global batch of the configured world size, to the right iteration count."""

from __future__ import annotations

import json
import os
import threading
import time

import boto3
import pytest
import torch

from data_prep.prep import run_prep
from data_prep.ray_runtime import keep_on_loopback
from data_prep.synthetic import generate
from pipeline.checkpoint import load_state
from pipeline.train import run_training
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    keep_on_loopback()
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"  # a lost node's worker is not waited for long
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1"})
    worker_node = head.add_node(num_cpus=1)
    ray.init(address=head.address, runtime_env={"env_vars": {
        "GLOO_SOCKET_IFNAME": "lo", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}})
    yield head, worker_node
    ray.shutdown()
    head.shutdown()
    os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)


def _train_worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])}


def test_evaluation_and_submission_spread_over_both_nodes(cluster, tmp_path):
    """Inference is Ray tasks of one CPU each: on two one-CPU nodes, the two tasks run one on each."""
    from ray.util.state import list_tasks

    from pipeline.evaluate import run_evaluation, run_submission
    from tsd_model.build import build_model

    generate(tmp_path / "synth", num_train=0, num_validation=8, seed=7)
    cfg = tiny_config(tmp_path / "synth", tmp_path / "shards", "prep.splits=[validation]", "inference.num_tasks=2",
                      "model.test.score_thresh=0.0")
    run_prep(cfg.data, cfg.prep, progress=False)
    checkpoint = tmp_path / "run" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    torch.save({"model": build_model(cfg.model).state_dict(), "iteration": 1}, checkpoint / "state.pt")
    data = run_evaluation(cfg, str(checkpoint), "validation", str(tmp_path / "eval"), progress=False)
    counts = run_submission(cfg, str(checkpoint), str(tmp_path / "synth" / "validation"), str(tmp_path / "s.csv"),
                            progress=False)
    assert data["num_images"] == 8 and counts["images"] == 8
    for name in ("_infer_shard_range", "_infer_files"):
        nodes: set[str] = set()
        deadline = time.monotonic() + 30  # the state API hears of finished tasks a moment later
        while len(nodes) < 2 and time.monotonic() < deadline:
            tasks = list_tasks(filters=[("func_or_class_name", "=", name), ("state", "=", "FINISHED")])
            nodes = {t.node_id for t in tasks}
            time.sleep(0.5)
        assert len(nodes) == 2, name


def test_a_spread_elastic_run_survives_losing_a_node(cluster, tmp_path, s3_server, s3_bucket):
    import ray

    head, worker_node = cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # both nodes on loopback
    generate(tmp_path / "synth", num_train=12, num_validation=0, seed=6)
    local = tiny_config(tmp_path / "synth", tmp_path / "shards", "prep.splits=[train]")
    run_prep(local.data, local.prep, progress=False)
    client = boto3.client("s3", endpoint_url=s3_server)
    for f in sorted((tmp_path / "shards").iterdir()):
        if f.is_file():
            client.upload_file(str(f), s3_bucket, f"shards/{f.name}")
    cfg = tiny_config(tmp_path / "synth", f"s3://{s3_bucket}/shards", f"data.s3_endpoint_url={s3_server}",
                      f"train.storage_path=s3://{s3_bucket}/runs", f"train.local_dir={tmp_path / 'local'}",
                      "train.run_name=spread", "train.num_workers=2", "train.min_workers=1",
                      "train.placement_strategy=SPREAD", "train.elastic_resize_interval_s=5",
                      "train.images_per_worker=1", "train.max_iterations=24", "train.checkpoint_every=4",
                      "train.max_failures=3", "train.image_log_every=0", "train.log_every=1", "loader.num_workers=0")
    result: dict = {}
    failure: list[BaseException] = []

    def train() -> None:
        try:
            result.update(run_training(cfg))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    status = tmp_path / "local" / "spread" / "workers" / "rank0.json"
    spread_over = set()
    removed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        if status.exists():
            info = json.loads(status.read_text())
            if info["iteration"] >= 9 and info["state"] == "running":
                spread_over = _train_worker_nodes()
                head.remove_node(worker_node)  # the node goes away with its worker
                removed_at = info["iteration"]
                break
        time.sleep(0.05)
    thread.join(timeout=400)
    assert not failure, failure
    assert removed_at is not None, "the node must be removed mid-run"
    assert len(spread_over) == 2, "the two workers ran on the two nodes"
    assert result["metrics"]["iteration"] == 24 and result["metrics"]["restarts"] >= 1
    final = load_state(result["checkpoint"], s3_server)
    assert final["world_size"] == 1  # finished on the node left...
    assert final["sampler"]["global_batch"] == 2  # ...with the global batch of the configured 2 workers
    assert torch.isfinite(torch.cat([v.flatten().float() for v in final["model"].values()])).all()


def test_the_world_size_rule_keeps_the_global_batch():
    from data_prep.errors import ConfigError
    from pipeline.config import TrainConfig
    from pipeline.train import BatchPlan, batch_plan

    tc = TrainConfig(num_workers=4, images_per_worker=2, grad_accumulation=1)
    assert batch_plan(tc, 4) == BatchPlan(8, 2, 1)  # as configured
    assert batch_plan(tc, 2) == BatchPlan(8, 4, 2)  # half the workers: twice the images, in two passes
    assert batch_plan(tc, 1) == BatchPlan(8, 8, 4)
    with pytest.raises(ConfigError, match="cannot be split over 3 workers"):
        batch_plan(tc, 3)
    with pytest.raises(ConfigError, match="min_workers"):
        run_training(tiny_config("/nowhere", "/nowhere", "train.num_workers=4", "train.min_workers=3"))
