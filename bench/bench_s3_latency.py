"""Benchmark: the training loader reading its shards from S3 at the latency of the real thing.

Shards N photo-like 1024x768 JPEGs (``tsd prep``), copies the shards into a moto S3 server (its
own process on 127.0.0.1), and puts ``latency_proxy.py`` (its own process) in front of it to add
a fixed delay to every request. Then measures the loader of one training rank as ``tsd train``
builds it (``make_loader``: 2 DataLoader workers, the class-aware plan, batches of 2) in images per
second over the whole split, side by side in one run:

- the same shards on local disk;
- S3 at 0, 25 and 50 ms per request, with the loader's read-ahead (``loader.read_ahead`` range
  requests in flight per worker) and without it (one synchronous request per sample, as before),
  served by moto and by ``range_server.py`` (the same objects; moto's per-request Python shares
  the two cores with the loader, the range server hardly works, so its rows show the loader).

With ``--pin`` the object store (endpoint and relay) runs on its own half of the cores and the
loader (this process and its forked DataLoader workers) on the other half, in every row, local
disk included: on a training node S3 is somebody else's machine, and on a 2-core VM an unpinned
endpoint and relay take their CPU from the loader they serve. Both arms of every ratio then have
the same CPU, so the ratio is what the goal asks about: what reading from S3 costs the loader.

    python bench/bench_s3_latency.py [--images 300] [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def split_cores(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(loader cores, object-store cores) for ``--pin``: two halves of this process's cores."""
    if not pin:
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def spawn(argv: list[str], cores: set[int] | None, **kwargs) -> subprocess.Popen:
    """Starts an object-store process (endpoint or relay), on ``cores`` when given."""
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.Popen(argv, preexec_fn=pin, **kwargs)


@contextlib.contextmanager
def relay(upstream: int, latency_ms: float, cores: set[int] | None) -> Iterator[str]:
    """``latency_proxy.py`` in front of the endpoint on port ``upstream``, in its own process: its URL."""
    proxy = spawn([sys.executable, str(REPO / "bench" / "latency_proxy.py"), "--upstream-port", str(upstream),
                   "--latency-ms", str(latency_ms)], cores, stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(proxy.stdout.readline())}"
    finally:
        proxy.terminate()
        proxy.wait()


def rate(cfg, shards: str, endpoint: str | None) -> float:
    """Images per second of one rank's loader over one epoch of the split."""
    from pipeline.loader import ShardDataset
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec
    from pipeline.train import make_loader

    ds = ShardDataset(shards, "train", cfg.model.input.min_size, cfg.model.input.max_size, endpoint,
                      read_ahead=cfg.loader.read_ahead)
    ipe = len(ds) // 2
    sampler = GlobalBatchSampler(ds.sample_labels, ds.index.widths >= ds.index.heights, 12, 2, 1, 0, 0, ipe,
                                 SamplerSpec(mode="class_aware"))
    loader = make_loader(cfg, ds, sampler, 0, 0, 0, 1)
    t0 = None
    images = 0
    for k, batch in enumerate(loader):
        if k == 2:  # the workers have started and warmed up: time from here
            t0, images = time.perf_counter(), 0
        images += len(batch["sizes"])
    return images / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--latencies", default="0,25,50")
    parser.add_argument("--paired-rounds", type=int, default=5,
                        help="then local disk and the range server + 25 ms back to back, this many times")
    parser.add_argument("--skip-table", action="store_true", help="only the paired rounds")
    parser.add_argument("--pin", action="store_true",
                        help="run the loader on one half of the cores, endpoint and relay on the other")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "s3_latency.json"))
    args = parser.parse_args()
    import boto3
    from bench_shard import make_dataset

    from data_prep.prep import run_prep
    from pipeline.config import load_config

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    procs = []
    try:
        make_dataset(work / "data", args.images)
        base = [f"data.root={work / 'data'}", f"data.shards={work / 'shards'}", "prep.splits=[train]",
                "prep.shard_size_mb=20", "data.splits.train.labels=null", "loader.num_workers=2",
                "model.input.min_size=800", "model.input.max_size=1333"]
        cfg = load_config(REPO / "configs" / "tiny.yaml", base)
        run_prep(cfg.data, cfg.prep, progress=False)
        loader_cores, store_cores = split_cores(args.pin)
        s3_port = _free_port()
        procs.append(spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], store_cores,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(s3_port)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}")
        client.create_bucket(Bucket="bench")
        for f in sorted((work / "shards").iterdir()):
            if f.is_file():
                client.upload_file(str(f), "bench", f"shards/{f.name}")
        # the same objects served by range_server.py (no per-request work of its own to speak of)
        shutil.copytree(work / "shards", work / "s3root" / "bench" / "shards")
        server = spawn([sys.executable, str(REPO / "bench" / "range_server.py"), "--root", str(work / "s3root")],
                       store_cores, stdout=subprocess.PIPE, text=True)
        procs.append(server)
        endpoints = {"moto": s3_port, "range server": int(server.stdout.readline())}
        if loader_cores:
            os.sched_setaffinity(0, loader_cores)  # the DataLoader workers fork from here and inherit it
        rows = []
        for read_ahead in () if args.skip_table else (0, 16):
            local = load_config(REPO / "configs" / "tiny.yaml", [*base, f"loader.read_ahead={read_ahead}"])
            if read_ahead:
                rows.append({"storage": "local disk", "read_ahead": "-",
                             "images_per_s": round(rate(local, str(work / "shards"), None), 1)})
                print(json.dumps(rows[-1]), flush=True)
            for (server_name, upstream), ms in itertools.product(endpoints.items(),
                                                                 [float(x) for x in args.latencies.split(",")]):
                with relay(upstream, ms, store_cores) as url:
                    value = rate(local, "s3://bench/shards", url)
                rows.append({"storage": f"S3 ({server_name}) + {ms:g} ms per request", "read_ahead": read_ahead,
                             "images_per_s": round(value, 1)})
                print(json.dumps(rows[-1]), flush=True)
        # the goal's ratio, measured pair by pair: this machine's speed drifts by 20 % within minutes
        paired = []
        fast = load_config(REPO / "configs" / "tiny.yaml", [*base, "loader.read_ahead=16"])
        with relay(endpoints["range server"], 25, store_cores) as url:
            arms = {"local_disk": (str(work / "shards"), None), "range_server_25ms": ("s3://bench/shards", url)}
            for k in range(args.paired_rounds):
                # which arm goes first alternates (ABBA...): an order effect cannot favour either
                order = list(arms) if k % 2 == 0 else list(arms)[::-1]
                got = {name: rate(fast, *arms[name]) for name in order}
                paired.append({"first": order[0], **{name: round(v, 1) for name, v in got.items()},
                               "ratio": round(got["range_server_25ms"] / got["local_disk"], 3)})
                print(json.dumps(paired[-1]), flush=True)
        local_rate = next((r["images_per_s"] for r in rows if r["storage"] == "local disk"), None)
        for r in rows if local_rate else ():
            r["vs_local_disk"] = round(r["images_per_s"] / local_rate, 3)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": args.images,
                  "loader_cores": sorted(loader_cores) if loader_cores else "all",
                  "object_store_cores": sorted(store_cores) if store_cores else "all",
                  "paired_rounds": paired,
                  "paired_median_ratio": statistics.median(p["ratio"] for p in paired) if paired else None,
                  "loader_workers": 2, "batch": 2, "image": "1024x768 JPEG, resized to 800 shorter side", "rows": rows}
        print(json.dumps(result, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        for p in procs:
            p.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
