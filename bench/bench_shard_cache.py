"""Benchmark: read-ahead of sample ranges against a node-local cache of whole shards, at the real
train split's size.

The loader reads from S3 one range request per sample, ahead of time (``loader.read_ahead``). The
other design the issue names is MosaicML Streaming's: download whole shards to the node's disk
(with a size bound) and read samples locally. Which one moves fewer bytes and starts sooner depends
on how the sampling plan touches the shards, so this replays the plan ``tsd train`` makes for one
node of a cluster over an index of the real split's size (``bench_index_scale.generate``: 1,743,042
images, 500 long-tailed classes, shards of ~1 GB as ``prep.shard_size_mb`` makes them), and counts
for one epoch of the class-aware sampler:

- read-ahead: the bytes of the samples the node reads (what it downloads);
- a whole-shard cache without a bound: the shards the node's first step needs before it can run,
  the shards touched in the first 100 steps, and all the shards the epoch touches (downloaded once
  each);
- a whole-shard cache bounded at a node's spare disk (LRU, as Streaming evicts): its hit rate and
  the bytes it downloads over the epoch.

No image is read: the counts come from the index and the plan. The order within a step is the
node's ranks' batches, rank after rank.

    python bench/bench_shard_cache.py [--nodes 4] [--gpus-per-node 8] [--images-per-gpu 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9


def node_accesses(index, nodes: int, gpus: int, per_gpu: int, sampler_mode: str) -> list[np.ndarray]:
    """For node 0: the sample indices each training step reads (its ranks' batches), over one epoch."""
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec

    world = nodes * gpus
    steps = len(index) // (world * per_gpu)
    per_rank = []
    for rank in range(gpus):  # node 0 holds ranks 0 .. gpus - 1
        sampler = GlobalBatchSampler(index.labels, index.widths >= index.heights, 500, per_gpu, world, rank, 0,
                                     steps, SamplerSpec(mode=sampler_mode))
        per_rank.append([np.array([i for i, _ in batch]) for batch in sampler.rank_batches(0)])
    return [np.concatenate([per_rank[r][s] for r in range(gpus)]) for s in range(steps)]


def lru_cache_downloads(shard_of_access: np.ndarray, shard_bytes: np.ndarray, bound: float) -> tuple[float, float]:
    """(hit rate, bytes downloaded) of a whole-shard LRU cache of ``bound`` bytes over the accesses."""
    cache: OrderedDict[int, None] = OrderedDict()
    held = downloaded = 0.0
    hits = 0
    for shard in shard_of_access.tolist():
        if shard in cache:
            cache.move_to_end(shard)
            hits += 1
            continue
        size = float(shard_bytes[shard])
        while cache and held + size > bound:
            evicted, _ = cache.popitem(last=False)
            held -= float(shard_bytes[evicted])
        cache[shard] = None
        held += size
        downloaded += size
    return hits / len(shard_of_access), downloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_743_042)
    parser.add_argument("--shards", type=int, default=400, help="~1 GB each at the generated sample sizes")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--images-per-gpu", type=int, default=4)
    parser.add_argument("--sampler", default="class_aware")
    parser.add_argument("--cache-bounds-gb", default="50,100,200")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "shard_cache.json"))
    args = parser.parse_args()
    from bench_index_scale import generate

    from data_prep.index import ShardIndex, index_name
    from data_prep.storage import open_storage

    with tempfile.TemporaryDirectory(prefix="bench-shard-cache-") as tmp:
        generated = generate(Path(tmp) / index_name("train"), args.images, shards=args.shards)
        index = ShardIndex.load(open_storage(tmp), "train", cache=False)
    sample_bytes = index.lengths.astype(np.int64)
    # a shard holds its samples' bytes and a tar header per member (the generated offsets are not
    # per shard, so the shard sizes are summed, not read off the last sample's end)
    shard_bytes = np.bincount(index.shard_ids, weights=sample_bytes + 2 * 512, minlength=len(index.shard_names))
    t0 = time.perf_counter()
    steps = node_accesses(index, args.nodes, args.gpus_per_node, args.images_per_gpu, args.sampler)
    plan_s = time.perf_counter() - t0
    accesses = np.concatenate(steps)
    shard_of = index.shard_ids[accesses]

    def shards_of(step_range: slice) -> np.ndarray:
        return np.unique(np.concatenate([index.shard_ids[s] for s in steps[step_range]]))

    first, first_100, epoch = shards_of(slice(0, 1)), shards_of(slice(0, 100)), np.unique(shard_of)
    read_ahead_bytes = float(sample_bytes[accesses].sum())
    bounded = []
    for bound_gb in (float(x) for x in args.cache_bounds_gb.split(",")):
        hit_rate, downloaded = lru_cache_downloads(shard_of, shard_bytes, bound_gb * GB)
        bounded.append({"bound_gb": bound_gb, "hit_rate": round(hit_rate, 4), "downloaded_gb": round(downloaded / GB, 1),
                        "vs_read_ahead": round(downloaded / read_ahead_bytes, 1)})
    result = {
        "machine": f"{platform.machine()}, {platform.python_version()}", "index": generated,
        "dataset_gb": round(shard_bytes.sum() / GB, 1), "mean_shard_gb": round(shard_bytes.mean() / GB, 2),
        "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "images_per_gpu": args.images_per_gpu,
                    "sampler": args.sampler},
        "node_steps_per_epoch": len(steps), "node_samples_per_epoch": int(len(accesses)), "plan_s": round(plan_s, 2),
        "read_ahead": {"downloaded_gb": round(read_ahead_bytes / GB, 1), "before_first_step_gb":
                       round(float(sample_bytes[steps[0]].sum()) / GB, 4)},
        "whole_shard_cache": {
            "before_first_step": {"shards": int(len(first)), "gb": round(shard_bytes[first].sum() / GB, 1)},
            "first_100_steps": {"shards": int(len(first_100)), "gb": round(shard_bytes[first_100].sum() / GB, 1)},
            "epoch_unbounded": {"shards": int(len(epoch)), "gb": round(shard_bytes[epoch].sum() / GB, 1),
                                "vs_read_ahead": round(shard_bytes[epoch].sum() / read_ahead_bytes, 1)},
            "epoch_bounded_lru": bounded,
        },
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
