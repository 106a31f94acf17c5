"""Shards read from S3 at a real latency and through throttling: the moto server behind a relay on
127.0.0.1 that delays every request and answers some with 503 Slow Down; the loader's read-ahead
and boto3's retries give back exactly the samples of the local shards."""

from __future__ import annotations

import boto3
import pytest
import torch

from bench.latency_proxy import LatencyProxy
from data_prep.prep import run_prep
from data_prep.synthetic import generate
from pipeline.loader import ShardDataset, collate
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    generate(root / "synth", num_train=14, num_validation=0, seed=3)
    cfg = tiny_config(root / "synth", root / "shards", "prep.splits=[train]", "prep.shard_size_mb=0.05")
    run_prep(cfg.data, cfg.prep, progress=False)
    return root / "shards"


def _upload(shards, s3_server, bucket) -> None:
    client = boto3.client("s3", endpoint_url=s3_server)
    for f in sorted(shards.iterdir()):
        if f.is_file():
            client.upload_file(str(f), bucket, f"shards/{f.name}")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("read_ahead", [0, 6])
def test_throttled_slow_s3_reads_give_the_local_samples(shards, s3_server, s3_bucket, read_ahead):
    _upload(shards, s3_server, s3_bucket)
    local = ShardDataset(str(shards), "train", 160, 224)
    batches = [[(i, i % 2 == 0), (i + 1, False)] for i in range(0, len(local) - 1, 2)][::-1]
    with LatencyProxy(_port(s3_server), latency_s=0.005, fail_every=4) as proxy:
        remote = ShardDataset(f"s3://{s3_bucket}/shards", "train", 160, 224, proxy.url, read_ahead=read_ahead)
        remote.plan_batches(batches)
        for batch in batches:
            got = collate(remote.__getitems__(batch))
            want = collate([local[item] for item in batch])
            for key in ("images", "boxes", "labels", "indices", "flips"):
                assert torch.equal(got[key], want[key]), key
        assert proxy.failed >= 1  # throttled requests were retried, and the samples read anyway
        assert proxy.requests > len(local)


def test_read_ahead_overlaps_the_latency(shards, s3_server, s3_bucket):
    """At 40 ms per request, reading 12 samples one request at a time takes > 0.48 s; with 6 in
    flight the wall time is a fraction of it (the ratio, not a time budget, is what is checked)."""
    import time

    _upload(shards, s3_server, s3_bucket)
    batches = [[(i, False), (i + 1, False)] for i in range(0, 12, 2)]
    seconds = {}
    with LatencyProxy(_port(s3_server), latency_s=0.04) as proxy:
        for read_ahead in (0, 6):
            ds = ShardDataset(f"s3://{s3_bucket}/shards", "train", 160, 224, proxy.url, read_ahead=read_ahead)
            ds.plan_batches(batches)
            ds.__getitems__(batches[0])  # clients and connections made: not timed
            t0 = time.perf_counter()
            for batch in batches[1:]:
                ds.__getitems__(batch)
            seconds[read_ahead] = time.perf_counter() - t0
    assert seconds[0] > 10 * 0.04  # one request per sample, one after another
    assert seconds[6] < 0.5 * seconds[0], seconds
