"""Benchmark: training and inference speed and memory of the configs' own models on one device.

``bench_model.py`` compares the R50-FPN heads on one image; this measures whole models as the
paper configs build them (Cascade R-CNN X101-64x4d + DCN with TSD in every stage included),
without a loader, on random images with a few boxes:

- a training step (forward, backward, SGD step; AMP with a GradScaler under ``--amp``) at each
  ``--images-per-gpu``: images per second (the median step) and peak device memory;
- inference of one image: milliseconds (the median);
- one profiled training step: the share of the step's device time (CPU time on the CPU) in
  ``torchvision.ops.deform_conv2d`` forward and backward (or grid_sample), in the RoI heads' pooling gather
  (``embedding_bag``), and the top operators.

    python bench/bench_model_configs.py --device cuda --amp \\
        --configs configs/cascade_rcnn_x101_64x4d_dcn_fpn_tsd_coco.yaml,configs/faster_rcnn_r50_fpn_tsd_coco.yaml
    python bench/bench_model_configs.py --size 320 --repeats 2      # a smoke run on the CPU
    python bench/bench_model_configs.py ... --compare model.backbone.dcn_kernel=torchvision,grid_sample

Models are built from the config with ``load_weights=False`` (random weights, nothing read).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_model import _sync
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("configs/cascade_rcnn_x101_64x4d_dcn_fpn_tsd_coco.yaml", "configs/faster_rcnn_r50_fpn_tsd_coco.yaml",
                   "configs/faster_rcnn_r50_fpn_sibling_coco.yaml")


def make_inputs(n: int, size: tuple[int, int], num_classes: int, device: torch.device, seed: int = 0):
    """``n`` random images of ``size`` (h, w) in [0, 1] and 2–6 random boxes each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        k = int(torch.randint(2, 7, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, num_classes, (k,), generator=g).to(device)})
    return images, targets


def timed(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device.type)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device.type)
        times.append(time.perf_counter() - t0)
    return times


def training_step(model, images, targets, optimizer, scaler, device: torch.device, amp: bool):
    def step() -> None:
        model.train()
        with torch.autocast(device.type, enabled=amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def op_shares(model, step, device: torch.device, top: int) -> dict:
    """Shares of one profiled training step's device time (CPU time on the CPU)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device.type)
    events = prof.key_averages()

    def self_time(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    total = sum(self_time(e) for e in events)
    if total <= 0:
        return {}

    def share(*names: str) -> float:
        return round(sum(self_time(e) for e in events if any(n in e.key for n in names)
                         and "deform" not in e.key) / total, 4)

    ranked = sorted(events, key=self_time, reverse=True)[:top]
    # self times by operator name: the matmul of the grid_sample DCN is not told apart from the
    # others (compare the kernels with --compare model.backbone.dcn_kernel=... for its whole cost)
    deform = round(sum(self_time(e) for e in events if "deform_conv2d" in e.key) / total, 4)
    return {"step_ms_profiled": round(total / 1000, 2), "torchvision deform_conv2d": deform,
            "grid_sampler (grid_sample DCN)": share("grid_sampler"),
            "embedding_bag (RoI pooling)": share("embedding_bag"), "nms": share("nms"),
            "dense convolution": share("convolution", "cudnn"),
            "top": [{"op": e.key, "share": round(self_time(e) / total, 4), "calls": e.count} for e in ranked]}


def measure(config: str, overrides: list[str], device: torch.device, amp: bool, batches: list[int],
            size: tuple[int, int], repeats: int, warmup: int, top: int) -> dict:
    from pipeline.config import load_config
    from tsd_model.build import build_model

    cfg = load_config(REPO / config, overrides)
    cfg.model.input.min_size, cfg.model.input.max_size = min(size), max(size)  # no resize in the transform
    torch.manual_seed(0)
    model = build_model(cfg.model, load_weights=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
    m = cfg.model
    row: dict = {"config": config, "overrides": overrides, "backbone": m.backbone.name, "dcn": m.backbone.dcn,
                 "head": m.roi.head, "cascade_stages": len(m.cascade.iou_thresholds) if m.cascade.enabled else 1,
                 "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "train": []}
    for n in batches:
        images, targets = make_inputs(n, size, m.num_classes, device)
        step = training_step(model, images, targets, optimizer, scaler, device, amp)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(step, repeats, warmup, device)
        median = statistics.median(times)
        entry = {"images_per_gpu": n, "step_ms": round(median * 1000, 1), "images_per_s": round(n / median, 2)}
        if device.type == "cuda":
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        entry["profile"] = op_shares(model, step, device, top)
        row["train"].append(entry)
        print(json.dumps({"config": config, "overrides": overrides,
                          **{k: v for k, v in entry.items() if k != "profile"}}), flush=True)
    images, _ = make_inputs(1, size, m.num_classes, device, seed=1)

    def infer(model=model) -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model(images)

    row["inference_ms_per_image"] = round(statistics.median(timed(infer, repeats, warmup, device)) * 1000, 1)
    print(json.dumps({"config": config, "overrides": overrides, "inference_ms_per_image": row["inference_ms_per_image"]}),
          flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config files")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every config")
    parser.add_argument("--compare", metavar="KEY=V1,V2,...",
                        help="measure every config once per value of KEY (e.g. model.backbone.dcn_kernel=torchvision,"
                             "grid_sample or model.roi.head=tsd,sibling), side by side in this run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, with a GradScaler; bf16 on CPU)")
    parser.add_argument("--images-per-gpu", default="2,4")
    parser.add_argument("--size", default="800,1216", help="image height,width (or one number for a square)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="operators listed per profile")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "model_configs.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dims = [int(x) for x in args.size.split(",")]
    size = (dims[0], dims[-1])
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = {"machine": machine, "torch": torch.__version__, "device": args.device, "amp": args.amp,
              "image_size": list(size), "date": time.strftime("%Y-%m-%d"), "models": []}
    variants: list[list[str]] = [[]]
    if args.compare:
        key, _, values = args.compare.partition("=")
        variants = [[f"{key}={value}"] for value in values.split(",")]
    for config in args.configs.split(","):
        for variant in variants:
            result["models"].append(measure(config, [*args.overrides, *variant], device, args.amp,
                                            [int(x) for x in args.images_per_gpu.split(",")], size, args.repeats,
                                            args.warmup, args.top))
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
