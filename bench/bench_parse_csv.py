"""Benchmark: parse + validate + group the challenge-scale train box CSV.

Generates a file of the real shape (12.2M rows, 1.74M ImageIDs sorted as in the official file,
the real 500-class label space, the 13-column train layout), then, each in a fresh process so
that peak RSS belongs to that step alone, runs
  - ``data_prep.oid_files.read_boxes`` (stream, validate, group per image, drop duplicates), and
  - the baseline: ``pyarrow.csv.read_csv`` of the whole file (parsing only, no validation).
Prints a Markdown table row per step and writes ``bench/out/parse_csv.json``.

    python bench/bench_parse_csv.py [--rows 12200000] [--images 1740000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = REPO / "tests" / "data" / "oid" / "challenge2019" / "challenge-2019-classes-description-500.csv"
HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def generate(path: Path, rows: int, images: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from data_prep.labels import LabelSpace

    mids = np.array(LabelSpace.from_csv_text(CLASSES.read_text()).mids)
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**62, size=int(images * 1.01)))[:images]  # sorted, distinct
    counts = rng.multinomial(rows - images, np.full(images, 1 / images)) + 1  # every image has a box
    image_of_row = np.repeat(np.arange(images), counts)
    with open(path, "w") as f:
        f.write(HEADER + "\n")
    chunk = 2_000_000
    with open(path, "ab") as f:
        for start in range(0, rows, chunk):
            sel = image_of_row[start : start + chunk]
            n = len(sel)
            x = np.sort(rng.random((n, 2)), axis=1)
            y = np.sort(rng.random((n, 2)), axis=1)
            x[:, 1] = np.maximum(x[:, 1], x[:, 0] + 1e-3).clip(max=1.0)
            y[:, 1] = np.maximum(y[:, 1], y[:, 0] + 1e-3).clip(max=1.0)
            flags = rng.integers(0, 2, (n, 5))
            table = pa.table({
                "ImageID": pa.array(np.char.mod("%016x", ids[sel])),
                "Source": pa.array(np.full(n, "xclick")),
                "LabelName": pa.array(mids[rng.integers(0, len(mids), n)]),
                "Confidence": pa.array(np.ones(n, np.int8)),
                "XMin": pa.array(np.round(x[:, 0], 6)), "XMax": pa.array(np.round(x[:, 1], 6)),
                "YMin": pa.array(np.round(y[:, 0], 6)), "YMax": pa.array(np.round(y[:, 1], 6)),
                **{name: pa.array(flags[:, k].astype(np.int8)) for k, name in enumerate(HEADER.split(",")[8:])},
            })
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))


def _child(step: str, path: str) -> None:
    """Run one step in this (fresh) process and print its figures as JSON."""
    t0 = time.perf_counter()
    if step == "read_boxes":
        from data_prep.labels import LabelSpace
        from data_prep.oid_files import ImageCoder, read_boxes
        from data_prep.rejects import RejectLog

        labels = LabelSpace.from_csv_text(CLASSES.read_text())
        coder, log = ImageCoder(), RejectLog()
        table = read_boxes(path, labels, coder, log)
        info = {"rows": table.rows_read, "kept": len(table), "images": len(coder), "rejects": len(log)}
    else:
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path)
        info = {"rows": table.num_rows}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step": step, "seconds": round(seconds, 2), "peak_rss_gib": round(peak / 2**30, 2), **info}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_200_000)
    parser.add_argument("--images", type=int, default=1_740_000)
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-bbox-{args.rows}.csv"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, args.rows, args.images)  # noqa
        print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    results = []
    for step in ("read_boxes", "pyarrow_read_csv_baseline"):
        run = subprocess.run([sys.executable, __file__, "--child", step, str(path)], capture_output=True, text=True,
                             check=True, cwd=REPO)
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}"
    print(f"| step | rows | seconds | peak RSS (GiB) |  ({machine})")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['rows']:,} | {r['seconds']} | {r['peak_rss_gib']} |")
    (out / "parse_csv.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
