"""Benchmark: deformable convolution, torchvision's kernel against grid_sample + matmul
(``tsd_model.deform_conv``), on the layers of the mission's backbone.

The 3x3 convs of ResNeXt-101 64x4d's stages c3-c5 (64 groups; 512, 1024 and 2048 channels at
strides 8, 16 and 32) on an 800 x 1216 input (``--scale`` shrinks it), 2 images, random offsets of
a few pixels: forward + backward, the two kernels alternated, best of ``--repeats``; on CUDA also
with AMP and the peak memory of each.

    python bench/bench_deform_conv.py [--device cuda] [--amp] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"c3": (512, 8), "c4": (1024, 16), "c5": (2048, 32)}  # channels, stride of ResNeXt-101 64x4d's conv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="of the 800 x 1216 input")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "deform_conv.json"))
    args = parser.parse_args()
    from bench_model import _sync, alternate

    from tsd_model.deform_conv import deform_conv2d

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    kernels = ("torchvision", "grid_sample")
    rows = []
    for layer, (channels, stride) in LAYERS.items():
        h, w = max(1, round(800 * args.scale / stride)), max(1, round(1216 * args.scale / stride))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, channels, h, w, generator=g).to(device).requires_grad_(True)
        weight = (torch.randn(channels, channels // 64, 3, 3, generator=g) * 0.05).to(device).requires_grad_(True)
        offset = (torch.randn(args.images, 18, h, w, generator=g) * 2).to(device).requires_grad_(True)

        def run(kernel: str, x=x, offset=offset, weight=weight) -> None:
            with torch.autocast(device.type, enabled=args.amp):
                out = deform_conv2d(x, offset, weight, None, 1, 1, 1, None, kernel)
            out.float().square().mean().backward()

        memory = {}
        for kernel in kernels if cuda else ():  # the peak memory of each on its own
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            run(kernel)
            _sync(args.device)
            memory[kernel] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        best, _ = alternate({k: functools.partial(run, k) for k in kernels}, args.repeats, args.device)
        row = {"layer": layer, "input": [args.images, channels, h, w],
               **{f"{k}_ms": round(v * 1000, 2) for k, v in best.items()},
               "speedup": round(best["torchvision"] / best["grid_sample"], 2)}
        if memory:
            row["peak_mib"] = memory
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"machine": machine, "torch": torch.__version__, "amp": args.amp, "scale": args.scale,
              "unit": "forward + backward, best of repeats", "date": time.strftime("%Y-%m-%d"), "layers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
