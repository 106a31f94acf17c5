"""Benchmark: training images/s of a detector config on one device, and how long it waits for data.

Shards N photo-like 1024x768 JPEGs in this process (``plan_split`` + ``write_shard``, no Ray), then
runs the training loop of ``tsd train`` on one device: the same index loader, sampler and schedule
(``pipeline.train.make_loader``) and the same optimizer step with autocast and GradScaler
(``pipeline.train.train_step``), without Ray Train around it (one rank, so no DDP). For each
``--loader-workers`` value: warm-up iterations, then timed ones. Reports images/s, the data-wait
fraction (time blocked on the loader / wall time), the step time and peak GPU memory, so that one
can read off how many loader processes keep one GPU busy.

    python bench/bench_train.py --config configs/faster_rcnn_r50_fpn_tsd_oid.yaml --device cuda \
        --loader-workers 1,2,4,8 [--set train.amp=fp16 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))


def make_shards(work: Path, images: int) -> str:
    """Photo-like JPEGs sharded for training, in-process; returns the shards directory."""
    from bench_shard import make_dataset

    from data_prep.index import write_index
    from data_prep.prep import image_settings, load_label_space, plan_split
    from data_prep.shard import write_shard
    from data_prep.storage import open_storage
    from pipeline.config import load_config

    data, shards = work / "data", work / "shards"
    make_dataset(data, images)
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"data.root={data}", f"data.shards={shards}", "prep.splits=[train]",
                       "prep.shard_size_mb=64", "data.splits.train.labels=null"])
    labels, hierarchy = load_label_space(cfg.data)
    plan = plan_split(cfg.data, cfg.prep, "train", labels)
    out = open_storage(str(shards))
    up = hierarchy.ancestor_matrix(labels)
    results = [write_shard(spec, plan.images, out, image_settings(cfg.prep), up) for spec in plan.shards]
    write_index(out, "train", results)
    return str(shards)


def run(config: str, overrides: list[str], device: torch.device, worker_counts: list[int], warmup: int,
        iterations: int, shards: str) -> dict:
    from pipeline.config import load_config
    from pipeline.loader import ShardDataset, unpack
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec
    from pipeline.schedule import learning_rate, parameter_groups
    from pipeline.train import make_loader, train_step
    from tsd_model.build import build_model

    cfg = load_config(config, [f"data.shards={shards}", "model.weights.backbone=null", "model.weights.checkpoint=null", *overrides])
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device)
    model.train()
    optimizer = torch.optim.SGD(parameter_groups(model, tc), lr=tc.base_lr_per_image, momentum=tc.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16" and device.type == "cuda")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.amp)
    dataset = ShardDataset(shards, tc.split, cfg.model.input.min_size, cfg.model.input.max_size,
                           use_expanded_labels=cfg.loader.use_expanded_labels)
    batch = tc.images_per_worker * tc.grad_accumulation
    ipe = warmup + iterations
    sampler = GlobalBatchSampler(dataset.index.labels, dataset.index.widths >= dataset.index.heights,
                                 cfg.model.num_classes, batch, 1, 0, tc.seed, ipe,
                                 SamplerSpec(cfg.loader.sampler, cfg.loader.num_sample_class,
                                             cfg.loader.repeat_threshold, cfg.loader.group_by_aspect,
                                             cfg.loader.flip_prob))
    rows = []
    for epoch, workers in enumerate(worker_counts):
        cfg.loader.num_workers = workers
        loader = make_loader(cfg, dataset, sampler, epoch, 0, 0, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wait = busy = 0.0
        skipped = 0
        t_end = time.perf_counter()
        t_start = t_end
        for n, data in enumerate(loader):
            if n == warmup:  # the loader's start-up and the first kernels are not the steady state
                wait = busy = 0.0
                t_start = t_end
            t_data = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch * ipe + n, tc, batch, ipe)
            images, targets = unpack(data, device)
            step = train_step(model, optimizer, scaler, images, targets, tc.grad_accumulation, amp_dtype,
                              tc.grad_clip_norm)
            skipped += not step.finite
            t_step = time.perf_counter()  # train_step synchronises (finite check, grad norm)
            wait += t_data - t_end
            busy += t_step - t_data
            t_end = t_step
        wall = t_end - t_start
        row = {"loader_workers": workers, "images_per_s": round(iterations * batch / wall, 2),
               "data_wait_fraction": round(wait / wall, 3), "step_ms": round(1000 * busy / iterations, 1),
               "nonfinite_steps": skipped}
        if device.type == "cuda":
            row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"images_per_gpu": tc.images_per_worker, "amp": tc.amp, "min_size": cfg.model.input.min_size,
            "max_size": cfg.model.input.max_size, "sampler": cfg.loader.sampler, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "faster_rcnn_r50_fpn_tsd_oid.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loader-workers", default="1,2,4,8", help="comma-separated DataLoader process counts")
    parser.add_argument("--images", type=int, default=200, help="JPEGs in the benchmark shards")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "train.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        t0 = time.perf_counter()
        shards = make_shards(work, args.images)
        print(f"sharded {args.images} images in {time.perf_counter() - t0:.1f} s", flush=True)
        result = run(args.config, args.overrides, device, [int(w) for w in args.loader_workers.split(",")],
                     args.warmup, args.iterations, shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = {"machine": machine, "cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
              "config": Path(args.config).name, "overrides": args.overrides, "images": args.images,
              "warmup": args.warmup, "iterations": args.iterations, **result}
    print(json.dumps(result, indent=1))
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
