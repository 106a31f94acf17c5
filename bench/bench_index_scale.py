"""Benchmark: the prep index and the samplers at the real train split's size.

Generates an index with the schema ``tsd prep`` writes (``data_prep.index``) and the size of the
OID challenge train split: 1,743,042 images, 500 classes with a long-tailed frequency, ~7 classes
per image (12.2M label ids), 16-hex-digit keys, ~2,000 shards. Then, each in a fresh process:

1. ``ShardIndex.load`` from local disk: the first load on a node (decodes the Parquet file and
   writes the node-local cache of its columns) and a later one (maps that cache): seconds, the
   resident memory it adds (RSS, every column's pages touched once), the anonymous memory it adds
   (what the process holds itself; mapped pages are the page cache's, shared by the node's
   processes), and the peak;
2. the same Parquet file read the way the loader used to (Python lists of keys and shard names, one
   numpy array per image), for the ratio;
3. forked DataLoader-style workers reading 20,000 random samples' fields: the memory each one
   holds privately (``Private_*`` in ``/proc/PID/smaps_rollup``; what fork could not share);
4. ``GlobalBatchSampler`` for rank 0 of 64 (2 images per rank): build and one epoch's plan, for
   the uniform, class-aware and repeat-factor samplers;
5. with the column file that ``tsd prep`` publishes beside the Parquet one: the first load on
   another node (an empty cache: the file is copied into it and mapped, nothing decoded) and a
   later one.

    python bench/bench_index_scale.py [--images 1743042]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anonymous_mb() -> float:
    """Anonymous (heap) memory of this process: what it holds itself, not mapped file pages."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def private_mb(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                total += int(line.split()[1])
    return total / 1024


def generate(path: Path, images: int, classes: int = 500, per_image: float = 7.0, shards: int = 2000) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.index import index_schema

    rng = np.random.default_rng(0)
    counts = np.clip(rng.poisson(per_image - 1, images) + 1, 1, 40)
    weights = 1.0 / np.arange(1, classes + 1) ** 1.2
    weights /= weights.sum()
    values = rng.choice(classes, int(counts.sum()), p=weights).astype(np.int16)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    keys = pa.array([f"{k:016x}" for k in rng.integers(0, 2**63, images)], pa.string())
    shard = np.sort(rng.integers(0, shards, images)).astype(np.int32)
    names = pa.array([f"train-{s:06d}.tar" for s in range(shards)], pa.string())
    jpg_size = rng.integers(30_000, 400_000, images)
    within = np.concatenate([[0], np.cumsum(jpg_size + 3000)[:-1]])  # positions grow within each shard
    columns = {
        "key": keys, "shard": names.take(pa.array(shard)), "shard_index": pa.array(shard),
        "jpg_offset": pa.array(within + 1536), "jpg_size": pa.array(jpg_size),
        "json_offset": pa.array(within + 1536 + jpg_size + 512), "json_size": pa.array(rng.integers(200, 2000, images)),
        "width": pa.array(rng.integers(300, 1024, images).astype(np.int32)),
        "height": pa.array(rng.integers(300, 1024, images).astype(np.int32)),
        "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "num_boxes": pa.array((counts * 1.8).astype(np.int32)),
    }
    schema = index_schema()
    table = pa.table({f.name: columns[f.name].cast(f.type) for f in schema}, schema=schema)
    pq.write_table(table, path)
    return {"images": images, "label_ids": int(counts.sum()), "classes": classes, "shards": shards,
            "file_mb": round(path.stat().st_size / 2**20, 1)}


def measure_load(directory: str) -> dict:
    import pyarrow.ipc  # noqa: F401 - the library's own memory is not the index's
    import pyarrow.parquet  # noqa: F401

    from data_prep.index import ShardIndex
    from data_prep.storage import open_storage

    storage = open_storage(directory)
    before, anon_before = rss_mb(), anonymous_mb()
    t0 = time.perf_counter()
    index = ShardIndex.load(storage, "train")
    seconds = time.perf_counter() - t0
    touched = sum(int(getattr(index, c).astype(np.int64).sum()) for c in ("shard_ids", "starts", "jpg_sizes",
                                                                        "json_starts", "lengths", "widths", "heights"))
    touched += int(index.labels.values.sum()) + sum(int(np.frombuffer(b, np.uint8).sum()) for b in
                                                     index.keys.buffers() if b is not None)
    after = rss_mb()  # every column's pages read once: what the process really holds
    assert touched
    return {"rows": len(index), "load_s": round(seconds, 3), "rss_added_mb": round(after - before, 1),
            "anonymous_added_mb": round(anonymous_mb() - anon_before, 1),
            "peak_mb": round(peak_mb(), 1), "rss_before_mb": round(before, 1), "index": index}


def measure_legacy(directory: str) -> dict:
    """The list-based reading the loader did before ``data_prep.index`` (for the ratio)."""
    import pyarrow.parquet as pq

    before = rss_mb()
    t0 = time.perf_counter()
    table = pq.read_table(Path(directory) / "train-index.parquet")  # what the old loader did, in its order
    keys = table.column("key").to_pylist()
    shards = table.column("shard").to_pylist()
    labels = [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()]
    numbers = [table.column(c).to_numpy() for c in ("jpg_offset", "jpg_size", "json_offset", "json_size", "width",
                                                    "height")]
    del table
    seconds = time.perf_counter() - t0
    after = rss_mb()
    assert len(keys) == len(shards) == len(labels) == len(numbers[0])
    return {"load_s": round(seconds, 3), "rss_added_mb": round(after - before, 1), "peak_mb": round(peak_mb(), 1)}


def measure_fork_sharing(index, workers: int = 2, reads: int = 20_000) -> dict:
    """Fork workers that read random samples' index fields, as DataLoader workers do; their private memory."""
    pids, ready = [], []
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            rng = np.random.default_rng(w)
            total = 0
            for i in rng.integers(0, len(index), reads):
                total += len(index.key(i)) + len(index.shard(i)) + int(index.starts[i]) % 7 + len(index.labels[i])
            os.write(wfd, b"x")
            time.sleep(3)  # stay alive while the parent reads smaps
            os._exit(0 if total else 1)
        os.close(wfd)
        pids.append(pid)
        ready.append(r)
    for r in ready:
        os.read(r, 1)
    private = [private_mb(pid) for pid in pids]
    for pid in pids:
        os.waitpid(pid, 0)
    return {"workers": workers, "reads_per_worker": reads, "private_mb_per_worker": [round(p, 1) for p in private]}


def measure_samplers(index, world: int = 64, per_rank: int = 2) -> list[dict]:
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec

    rows = []
    landscape = index.widths >= index.heights
    ipe = len(index) // (world * per_rank)
    for mode in ("uniform", "class_aware", "repeat_factor"):
        before = rss_mb()
        t0 = time.perf_counter()
        sampler = GlobalBatchSampler(index.labels, landscape, 500, per_rank, world, 0, 0, ipe, SamplerSpec(mode=mode))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        batches = list(sampler.rank_batches(0))
        plan = time.perf_counter() - t0
        rows.append({"sampler": mode, "build_s": round(build, 3), "epoch_plan_s": round(plan, 3),
                     "iterations": len(batches), "rss_added_mb": round(rss_mb() - before, 1)})
        del sampler, batches
    return rows


def child(directory: str, what: str) -> None:
    if what == "columns":  # in a child: the parent stays small (a child inherits its peak RSS)
        import pyarrow.parquet as pq

        from data_prep.index import ShardIndex, columns_name

        with open(Path(directory) / columns_name("train"), "wb") as f:
            ShardIndex.from_table(pq.read_table(Path(directory) / "train-index.parquet"), "bench")._write_columns(f)
        print("{}")
        return
    if what == "legacy":
        print(json.dumps(measure_legacy(directory)))
        return
    out = measure_load(directory)
    index = out.pop("index")
    if what == "all":
        out["fork"] = measure_fork_sharing(index)
        out["samplers"] = measure_samplers(index)
        out["peak_mb_after_samplers"] = round(peak_mb(), 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_743_042)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "index_scale.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-index-") as d:
        t0 = time.perf_counter()
        data = generate(Path(d) / "train-index.parquet", args.images)
        data["generate_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(data), flush=True)

        def run(what: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", d, what], check=True, capture_output=True,
                                 text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        os.environ["TSD_CACHE"] = str(Path(d) / "cache")  # the children's node-local cache, empty at first
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": data,
                  "first_load_decodes_parquet": run("load"), "later_loads_map_the_cache": run("all"),
                  "legacy_lists": run("legacy")}
        run("columns")  # what `tsd prep` publishes now: the column file beside the Parquet one
        os.environ["TSD_CACHE"] = str(Path(d) / "cache-2")  # another node: its cache empty
        result["first_load_copies_the_published_columns"] = run("load")
        result["later_loads_map_the_copy"] = run("load")
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
