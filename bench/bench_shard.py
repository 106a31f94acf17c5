"""Benchmark: shard throughput of ``tsd prep`` against ``tar cf`` of the same JPEG files.

Writes N real JPEG files of photo-like content (default 1,500 at 1024x768, ~450 KB each) and
a box CSV, warms the page cache, then in the same run measures
  - ``tar cf`` of the image directory (the reference: pure sequential copy into one tar),
  - our shard writer in one process (``write_shard`` over the whole plan: header checks, JSON
    annotations, reproducible tar members, sha256, atomic publish),
  - the full prep job on a local Ray with one task per shard (CSV parsing, planning, index and
    manifest included; Ray start-up excluded),
  - the floor under any checksumming sharder on this machine: the same Ray tasks over the same
    files doing nothing but read, sha256 and write (no tar headers, no header checks, no JSON, no
    planning), and
  - with ``--processes``: the shard writer on N plain worker processes, and the floor on as many
    (for a machine without Ray, with ``--no-ray``, or to see how the writer scales with cores).
Prints MB/s and the ratio to ``tar cf`` (of the best times, and the median of the per-round
ratios), and to ``tar cf`` followed by an fsync of the tar (prep publishes each shard fsynced:
durable on the disk, not only in the page cache); writes ``bench/out/shard.json``.

    python bench/bench_shard.py [--images 1500] [--rounds 5] [--processes 2,4] [--no-ray]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int, seed: int = 0) -> int:
    """A synthetic-format dataset whose images are large, photo-like JPEGs; returns the image bytes."""
    from data_prep.synthetic import CLASSES_FILE, HIERARCHY_FILE, SYNTH_CLASSES, hierarchy_json

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / CLASSES_FILE).write_text("".join(f"{m},{name}\n" for m, name in SYNTH_CLASSES))
    (root / HIERARCHY_FILE).write_text(json.dumps(hierarchy_json()))
    base = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    rows = ["ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"]
    total = 0
    for i in range(n):
        image_id = f"{i:016x}"
        shift = rng.integers(0, 200, 2)
        image = base.transform(base.size, Image.Transform.AFFINE, (1, 0, int(shift[0]), 0, 1, int(shift[1])))
        path = root / "train" / f"{image_id}.jpg"
        image.save(path, quality=90)
        total += path.stat().st_size
        rows.append(f"{image_id},xclick,/m/syn_circle,1,0.1,0.5,0.2,0.6,0,0,0,0,0")
    (root / "train-annotations-bbox.csv").write_text("\n".join(rows) + "\n")
    return total


def read_sha256_write(paths: list[str], dest: str) -> str:
    """The floor: each file read into one reused buffer, hashed and appended to ``dest``."""
    buffer, digest = bytearray(1 << 20), hashlib.sha256()
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if size > len(buffer):
                    buffer = bytearray(2 * size)
                view = memoryview(buffer)[: os.readv(fd, [memoryview(buffer)[:size]])]
            finally:
                os.close(fd)
            digest.update(view)
            while view:
                view = view[os.write(out, view) :]
    finally:
        os.close(out)
    return digest.hexdigest()


def _write_shard_job(job: tuple) -> None:
    """One shard in a worker process of the ``--processes`` contenders (no Ray)."""
    from data_prep.shard import write_shard

    write_shard(*job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", default="", metavar="N,N",
                        help="also write the shards with N plain worker processes (and take the floor with as many)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray contenders (a machine without Ray)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = parser.parse_args()
    process_counts = [int(n) for n in args.processes.split(",") if n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-shard-", dir=out))
    pools: dict[int, ProcessPoolExecutor] = {}
    try:
        data = work / "data"
        total = make_dataset(data, args.images)
        mb = total / 1e6
        for p in (data / "train").iterdir():  # warm the page cache for every contender
            p.read_bytes()

        from data_prep.prep import image_settings, load_label_space, plan_split
        from data_prep.shard import write_shard
        from data_prep.storage import open_storage
        from pipeline.config import load_config

        cfg = load_config(REPO / "configs" / "tiny.yaml",
                          [f"data.root={data}", f"data.shards={work / 'shards'}", "prep.splits=[train]",
                           "prep.shard_size_mb=40", "data.splits.train.labels=null"])
        labels, hierarchy = load_label_space(cfg.data)
        up = hierarchy.ancestor_matrix(labels)
        plan = plan_split(cfg.data, cfg.prep, "train", labels)
        settings = image_settings(cfg.prep)
        floor_groups = [[plan.images.local_path(s) for s in spec.sources] for spec in plan.shards]
        floor_files = [str(work / "floor" / f"{i}.bin") for i in range(len(floor_groups))]  # one per shard

        def tar_cf() -> None:
            subprocess.run(["tar", "cf", str(work / "ref.tar"), "-C", str(data), "train"], check=True)

        def tar_cf_fsync() -> None:
            """The same tar made durable, as prep publishes every shard: fsynced before it counts."""
            tar_cf()
            fd = os.open(work / "ref.tar", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        def one_process() -> None:
            single_plan = plan_split(cfg.data, cfg.prep, "train", labels)
            single_out = open_storage(work / "single")
            for spec in single_plan.shards:
                write_shard(spec, single_plan.images, single_out, settings, up)

        def on_processes(n: int):
            def run() -> None:
                pool_out = open_storage(work / "pool")
                list(pools[n].map(_write_shard_job, [(spec, plan.images, pool_out, settings, up)
                                                     for spec in plan.shards]))
            return run

        def floor_on_processes(n: int):
            def run() -> None:
                (work / "floor").mkdir()
                list(pools[n].map(read_sha256_write, floor_groups, floor_files))
            return run

        contenders = {"tar_cf": tar_cf, "tar_cf_fsync": tar_cf_fsync, "write_shard_1_process": one_process}
        for n in process_counts:
            pools[n] = ProcessPoolExecutor(n)
            contenders[f"write_shard_{n}_processes"] = on_processes(n)
        if process_counts:
            contenders[f"floor_read_sha256_write_{max(process_counts)}_processes"] = floor_on_processes(
                max(process_counts))
        started = False
        if not args.no_ray:
            import ray

            from data_prep.prep import run_prep
            from data_prep.ray_runtime import init_ray

            floor_task = ray.remote(num_cpus=cfg.prep.num_cpus_per_task)(read_sha256_write)

            def prep_on_ray() -> None:
                run_prep(cfg.data, cfg.prep, progress=False)

            def floor_on_ray() -> None:
                (work / "floor").mkdir()
                ray.get([floor_task.remote(g, f) for g, f in zip(floor_groups, floor_files, strict=True)])

            contenders["prep_ray"] = prep_on_ray
            contenders["floor_read_sha256_write_ray"] = floor_on_ray
            started = init_ray(None)

        def clean() -> None:
            for path in (work / "ref.tar", work / "single", work / "pool", work / "shards", work / "floor"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            os.sync()  # no write-back of an earlier contender is charged to the next one

        times: dict[str, list[float]] = {name: [] for name in contenders}
        try:
            for name, contender in contenders.items():  # Ray's and the pools' workers import the project
                if name != "tar_cf":
                    contender()
                clean()
            for round_ in range(args.rounds):  # rotate the order; keep every time
                k = round_ % len(contenders)
                for name in list(contenders)[k:] + list(contenders)[:k]:
                    clean()
                    t0 = time.perf_counter()
                    contenders[name]()
                    times[name].append(time.perf_counter() - t0)
        finally:
            if started:
                from data_prep.ray_runtime import shutdown_ray

                shutdown_ray(started)

        def paired_median(name: str) -> float:
            # tar and the contender ran within seconds of each other in every round: the median of
            # the per-round ratios follows the machine's slow and fast phases less than best-of times
            return round(statistics.median(t / c for t, c in zip(times["tar_cf"], times[name], strict=True)), 2)

        cores = len(os.sched_getaffinity(0))
        tar_s = min(times["tar_cf"])
        results = {
            "machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}",
            "images": args.images, "rounds": args.rounds, "megabytes": round(mb, 1), "shards": len(plan.shards),
            "mb_s": {name: round(mb / min(t), 1) for name, t in times.items()},
            "ratio_to_tar_best": {name: round(tar_s / min(t), 2) for name, t in times.items() if name != "tar_cf"},
            "ratio_to_tar_paired_median": {name: paired_median(name) for name in times if name != "tar_cf"},
            # prep fsyncs every shard before publishing it: against a tar that is as durable
            "ratio_to_durable_tar_best": {name: round(min(times["tar_cf_fsync"]) / min(t), 2)
                                          for name, t in times.items() if not name.startswith("tar_cf")},
        }
        print(json.dumps(results, indent=1))
        (out / "shard.json").write_text(json.dumps(results, indent=1))
    finally:
        for pool in pools.values():
            pool.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
