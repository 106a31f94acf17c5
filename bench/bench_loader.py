"""Benchmark: the training loader per core, against a bare Pillow decode loop over the same JPEGs.

Shards N photo-like 1024x768 JPEGs (``tsd prep``), then in one process with one thread:
  - bare PIL: ``Image.open(path).convert("RGB")`` + ``load()`` of the original files (no resize);
  - ours, index mode: ``ShardDataset[(i, flip)]``: range read from the tar, ``decode_jpeg``,
    antialiased resize to a shorter side of 800, flip, boxes (class-aware order);
  - ours, streaming mode: webdataset over the same tars, sequential, same decode and resize;
  - ours, index mode through 2 DataLoader workers (batches of 2), everything pinned to one core:
    what handing each batch to the training process costs against the in-process loop (the
    workers' start included).
Prints images/s and ratios; writes bench/out/loader.json.

    python bench/bench_loader.py [--images 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from bench_shard import make_dataset

    from data_prep.prep import run_prep
    from pipeline.config import load_config
    from pipeline.loader import ShardDataset, collate, streaming_dataset
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec

    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=out))
    try:
        data = work / "data"
        make_dataset(data, args.images)
        cfg = load_config(REPO / "configs" / "tiny.yaml",
                          [f"data.root={data}", f"data.shards={work / 'shards'}", "prep.splits=[train]",
                           "prep.shard_size_mb=50", "data.splits.train.labels=null"])
        run_prep(cfg.data, cfg.prep, progress=False)
        files = sorted((data / "train").glob("*.jpg"))
        ds = ShardDataset(str(work / "shards"), "train", 800, 1333)
        sampler = GlobalBatchSampler(ds.index.labels, np.ones(len(ds), bool), 12, 1, 1, 0, 0, len(ds),
                                     SamplerSpec(mode="class_aware", group_by_aspect=False))
        order = [item for batch in sampler.rank_batches(0) for item in batch]

        def pil_loop() -> None:
            for f in files:
                with Image.open(f) as im:
                    im.convert("RGB").load()

        def index_loop() -> None:
            for item in order:
                collate([ds[item]])

        def stream_loop() -> None:
            stream = streaming_dataset(str(work / "shards"), "train", 800, 1333, len(files), seed=0)
            for n, sample in enumerate(stream):
                collate([sample])
                if n + 1 == len(files):
                    break

        def workers_loop() -> None:
            import os

            from torch.utils.data import DataLoader

            cores = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(cores)})  # the workers fork from here and inherit it
            try:
                batches = [order[k:k + 2] for k in range(0, len(order), 2)]
                for _ in DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=2):
                    pass
            finally:
                os.sched_setaffinity(0, cores)

        best = {"pil_decode": float("inf"), "index_class_aware": float("inf"), "streaming_sequential": float("inf"),
                "index_2_workers_one_core": float("inf")}
        loops = {"pil_decode": pil_loop, "index_class_aware": index_loop, "streaming_sequential": stream_loop,
                 "index_2_workers_one_core": workers_loop}
        for _ in range(args.rounds):
            for name, fn in loops.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        rates = {k: round(len(files) / v, 1) for k, v in best.items()}
        result = {
            "machine": f"{platform.machine()}, 1 thread, Python {platform.python_version()}",
            "images": len(files), "size": "1024x768 -> 800x1067", "images_per_s": rates,
            "ratio_index_vs_pil_decode": round(rates["index_class_aware"] / rates["pil_decode"], 2),
            "ratio_streaming_vs_pil_decode": round(rates["streaming_sequential"] / rates["pil_decode"], 2),
            "ratio_2_workers_vs_in_process": round(rates["index_2_workers_one_core"] / rates["index_class_aware"], 2),
        }
        print(json.dumps(result, indent=1))
        (out / "loader.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
