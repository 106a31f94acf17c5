"""Profile one R50-FPN inference and training step per RoI head (torch.profiler), for finding where
TSD's extra time goes: the top operators by device time, and how many kernels each head launches.

    python bench/profile_model.py [--device cuda] [--amp] [--heads tsd,sibling] [--compile MODE] > profile.txt

``--compile`` runs the RoI stages as compiled graphs (``roi.compile``; ``eager`` = not compiled):
the operator calls it saves are what the GPU waits for at one image per step. Each step also
prints its host reads (``tsd_model.host_reads``: calls whose result the host reads, by operator)
and, on CUDA, the synchronising calls CUDA reports.
"""

from __future__ import annotations

import argparse

import torch
from bench_model import COMPILE_CHOICES
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--heads", default="tsd,sibling")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--compile", default="eager", choices=COMPILE_CHOICES)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    args = parser.parse_args()
    from tsd_model.build import build_model
    from tsd_model.config import ModelConfig
    from tsd_model.host_reads import HostReads, cuda_syncs

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    image = [torch.rand(3, *args.size, device=device)]
    target = [{"boxes": torch.tensor([[100.0, 120, 400, 500], [600, 200, 900, 700]], device=device),
               "labels": torch.tensor([1, 7], device=device)}]
    for head in args.heads.split(","):
        cfg = ModelConfig(num_classes=80)
        cfg.roi.head = head
        cfg.roi.compile = args.compile
        torch.manual_seed(0)
        model = build_model(cfg).to(device)

        def infer(model: torch.nn.Module = model) -> None:
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, enabled=args.amp):
                model(image)

        def train(model: torch.nn.Module = model) -> None:
            model.train()
            with torch.autocast(device.type, enabled=args.amp):
                losses = model(image, target)
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)

        for name, fn in (("inference", infer), ("train step", train)):
            for _ in range(3):
                fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = sum(e.count for e in events if cuda and e.device_type.name == "CUDA")
            ops = sum(e.count for e in events if e.device_type.name == "CPU")
            print(f"\n=== {head} {name} (roi.compile={args.compile}): {ops} CPU-side op calls, {kernels} kernel launches")
            with HostReads() as reads:  # what would make the host wait for the GPU, by operator
                fn()
            print(f"host reads: {reads.summary()}")
            if cuda:
                with cuda_syncs() as syncs:
                    fn()
                torch.cuda.synchronize()
                print(f"synchronising CUDA calls (set_sync_debug_mode): {len(syncs)}")
            print(events.table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
