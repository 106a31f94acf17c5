"""Benchmark: what TSD costs over the sibling head, and deformable RoI pooling over roi_align.

Same process, same input, contenders alternated, best of N (so background noise hits both), and
the median of the per-round ratios (robust against slow phases of a shared machine):
  - pooling: ``deform_roi_pool`` (random offsets) vs ``torchvision.ops.roi_align`` (aligned, same
    sampling ratio), 512 RoIs on a P2-sized map (256 x 200 x 304), forward + backward;
  - inference: one 800 x 1216 image through R50-FPN Faster R-CNN with the TSD head vs the sibling
    head (COCO, 81 outputs), eval mode, and torchvision's own fasterrcnn_resnet50_fpn for reference;
  - training step: forward + backward of the same image with 2 gt boxes.
Runs on CUDA too (``--device cuda``, with ``--amp`` for fp16 autocast). Writes bench/out/model.json.

    python bench/bench_model.py [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import get_args, get_type_hints

import torch
from torchvision.ops import roi_align

from tsd_model.config import RoIConfig

REPO = Path(__file__).resolve().parents[1]
COMPILE_CHOICES = get_args(get_type_hints(RoIConfig)["compile"])  # roi.compile's values, for --compile


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def alternate(fns: dict, repeats: int, device: str, warmup: int = 1) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each contender once per round, rounds repeated; the best time of each and every round's times.
    ``warmup`` untimed rounds first (compiled graphs: the compilation, CUDA graphs' recording)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            rounds[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in rounds.items()}, rounds


def paired_ratio(rounds: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of a/b, each round's two times taken back to back: slow phases of a
    shared machine (another tenant, CPU steal) hit both halves of a pair, unlike best-of-N times."""
    return statistics.median(x / y for x, y in zip(rounds[a], rounds[b], strict=True))


def bench_pooling(device: str, repeats: int) -> dict:
    from tsd_model.ops import deform_roi_pool

    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 256, 200, 304, generator=g).to(device).requires_grad_(True)
    xy = torch.rand(512, 2, generator=g) * 1000
    wh = torch.rand(512, 2, generator=g) * 200 + 16
    rois = torch.cat([torch.zeros(512, 1), xy, xy + wh], dim=1).to(device)
    offsets = (torch.randn(512, 7, 7, 2, generator=g) * 4).to(device).requires_grad_(True)

    def ours() -> None:
        deform_roi_pool(features, rois, offsets, 7, 0.25, 2).sum().backward()

    def reference() -> None:
        roi_align(features, rois, 7, 0.25, 2, aligned=True).sum().backward()

    t, _ = alternate({"deform_roi_pool": ours, "roi_align": reference}, repeats * 5, device)
    return {**{k: round(v * 1000, 2) for k, v in t.items()}, "unit": "ms fwd+bwd, 512 RoIs",
            "ratio": round(t["deform_roi_pool"] / t["roi_align"], 2)}


def inference_parts(tsd, sibling, image: list[torch.Tensor], repeats: int, device: str, amp: bool,
                    warmup: int = 1) -> dict:
    """Inference in two parts, each timed best-of-N on its own: what both models share (transform,
    backbone, RPN: the sibling's, same architecture) and each model's RoI heads on the same
    features and proposals. The short head runs find quiet moments of a shared machine far more
    often than whole 3-second inferences, so their sum gives the steadier TSD/sibling ratio."""
    autocast = torch.autocast(device.split(":")[0], enabled=amp)
    sibling.eval()
    tsd.eval()
    with torch.no_grad(), autocast:
        batch, _ = sibling.transform(image, None)
        features = sibling.backbone(batch.tensors)
        proposals, _ = sibling.rpn(batch, features, None)

    def shared() -> None:
        with torch.no_grad(), autocast:
            b, _ = sibling.transform(image, None)
            sibling.rpn(b, sibling.backbone(b.tensors), None)

    def heads(model):
        def run() -> None:
            with torch.no_grad(), autocast:
                model.roi_heads(features, proposals, batch.image_sizes)
        return run

    t_shared, _ = alternate({"shared": shared}, max(3, repeats // 10), device)
    t_heads, _ = alternate({"tsd": heads(tsd), "sibling": heads(sibling)}, repeats, device, warmup)
    return {"shared": round(t_shared["shared"] * 1000, 1), "roi_heads_tsd": round(t_heads["tsd"] * 1000, 1),
            "roi_heads_sibling": round(t_heads["sibling"] * 1000, 1), "proposals": sum(len(p) for p in proposals)}


def bench_detector(device: str, repeats: int, amp: bool, compile: str = "eager") -> dict:
    """TSD, the sibling head and torchvision's Faster R-CNN; ``compile``: our two models' ``roi.compile``."""
    from tsd_model.build import build_model
    from tsd_model.config import ModelConfig

    models = {}
    for head in ("tsd", "sibling"):
        cfg = ModelConfig(num_classes=80)
        cfg.roi.head = head
        cfg.roi.compile = compile
        torch.manual_seed(0)
        models[head] = build_model(cfg).to(device)
    # the reference the sibling head is checked against: torchvision's own Faster R-CNN (same
    # parameter count, its MultiScaleRoIAlign), random weights, nothing downloaded
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    models["torchvision"] = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81).to(device)
    image = [torch.rand(3, 800, 1216, device=device)]
    target = [{"boxes": torch.tensor([[100.0, 120, 400, 500], [600, 200, 900, 700]], device=device),
               "labels": torch.tensor([1, 7], device=device)}]

    def infer(model):
        def run() -> None:
            model.eval()
            with torch.no_grad(), torch.autocast(device.split(":")[0], enabled=amp):
                model(image)
        return run

    def train(model):
        def run() -> None:
            model.train()
            with torch.autocast(device.split(":")[0], enabled=amp):
                losses = model(image, target)
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)
        return run

    warmup = 1 if compile == "eager" else 3  # compiling, then CUDA graphs' warm-up and recording
    t_inf, r_inf = alternate({h: infer(m) for h, m in models.items()}, 3 * repeats, device, warmup)  # inference is cheap
    parts = inference_parts(models["tsd"], models["sibling"], image, 10 * repeats, device, amp, warmup)
    t_train, r_train = alternate({h: train(m) for h, m in models.items()}, repeats, device, warmup)
    return {
        "roi_compile": compile,
        "inference_ms": {k: round(v * 1000, 1) for k, v in t_inf.items()},
        "inference_ratio_tsd_vs_sibling": round(t_inf["tsd"] / t_inf["sibling"], 3),
        "inference_ratio_tsd_vs_sibling_paired_median": round(paired_ratio(r_inf, "tsd", "sibling"), 3),
        "inference_ratio_tsd_vs_torchvision": round(t_inf["tsd"] / t_inf["torchvision"], 3),
        "inference_parts_ms": parts,
        "inference_ratio_tsd_vs_sibling_from_parts": round(
            (parts["shared"] + parts["roi_heads_tsd"]) / (parts["shared"] + parts["roi_heads_sibling"]), 3),
        "train_step_ms": {k: round(v * 1000, 1) for k, v in t_train.items()},
        "train_step_ratio_tsd_vs_sibling": round(t_train["tsd"] / t_train["sibling"], 3),
        "train_step_ratio_tsd_vs_sibling_paired_median": round(paired_ratio(r_train, "tsd", "sibling"), 3),
        "train_step_ratio_tsd_vs_torchvision": round(t_train["tsd"] / t_train["torchvision"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--skip-detector", action="store_true")
    parser.add_argument("--compile", default="eager", choices=COMPILE_CHOICES,
                        help="roi.compile of the TSD and sibling models")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "model.json"))
    args = parser.parse_args()
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = {"machine": machine, "torch": torch.__version__, "device": args.device, "amp": args.amp,
              "pooling": bench_pooling(args.device, args.repeats)}
    if not args.skip_detector:
        result["detector"] = bench_detector(args.device, args.repeats, args.amp, args.compile)
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
