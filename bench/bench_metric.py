"""Benchmark: the OID challenge metric at the full challenge-validation scale.

Generates, with the real 500-class label space and hierarchy: 41,620 images, ~8 boxes per image
(some group-of), verified image-level labels, and 100 detections per image (4.16M, jittered copies
of the ground truth plus random boxes); writes the official CSVs and a TF-evaluator predictions
CSV; then times ``tsd score``'s path end to end (CSV reading included) and the in-memory metric
alone, each in a fresh process with its peak RSS. Writes bench/out/metric.json.

    python bench/bench_metric.py [--images 41620] [--dets-per-image 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "data" / "oid" / "challenge2019"


def generate(out: Path, images: int, dets: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from data_prep.labels import LabelSpace

    mids = np.array(LabelSpace.from_csv_text((FIX / "challenge-2019-classes-description-500.csv").read_text()).mids)
    rng = np.random.default_rng(seed)
    ids = np.char.mod("%016x", np.unique(rng.integers(0, 2**62, int(images * 1.01)))[:images])
    nbox = rng.poisson(8, images)
    img = np.repeat(np.arange(images), nbox)
    xy = rng.random((len(img), 2)) * 0.7
    wh = rng.random((len(img), 2)) * 0.3 + 0.02
    cls = rng.integers(0, 500, len(img))
    group = rng.random(len(img)) < 0.1
    pacsv.write_csv(pa.table({"ImageID": ids[img], "XMin": xy[:, 0], "XMax": xy[:, 0] + wh[:, 0], "YMin": xy[:, 1],
                              "YMax": xy[:, 1] + wh[:, 1], "IsGroupOf": group.astype(int), "LabelName": mids[cls]}),
                    out / "val-bbox.csv")
    lab_img = np.repeat(np.arange(images), 3)
    pacsv.write_csv(pa.table({"ImageID": ids[lab_img], "LabelName": mids[rng.integers(0, 500, len(lab_img))],
                              "Confidence": rng.integers(0, 2, len(lab_img))}), out / "val-labels.csv")
    # detections: per image, jittered copies of its boxes, then random boxes up to `dets`
    d_img = np.repeat(np.arange(images), dets)
    d_box = np.empty((len(d_img), 4))
    d_cls = rng.integers(0, 500, len(d_img))
    rand_xy = rng.random((len(d_img), 2)) * 0.7
    rand_wh = rng.random((len(d_img), 2)) * 0.3 + 0.02
    d_box[:, :2], d_box[:, 2:] = rand_xy, rand_xy + rand_wh
    starts = np.concatenate([[0], np.cumsum(nbox)[:-1]])
    take = np.minimum(nbox, dets)
    for k in range(int(take.max())):  # the first boxes of each image get a jittered detection
        sel = np.flatnonzero(take > k)
        rows = sel * dets + k
        src = starts[sel] + k
        d_box[rows, :2] = xy[src] + rng.normal(0, 0.01, (len(sel), 2))
        d_box[rows, 2:] = xy[src] + wh[src] + rng.normal(0, 0.01, (len(sel), 2))
        d_cls[rows] = cls[src]
    score = rng.random(len(d_img))
    pacsv.write_csv(pa.table({"ImageID": ids[d_img], "LabelName": mids[d_cls], "Score": np.round(score, 6),
                              "XMin": d_box[:, 0], "XMax": d_box[:, 2], "YMin": d_box[:, 1], "YMax": d_box[:, 3]}),
                    out / "predictions.csv")


def _child(step: str, out: str) -> None:
    from pipeline.oid_metric import evaluate
    from pipeline.scoring import load_ground_truth, read_predictions, score_files

    files = dict(boxes_csv=f"{out}/val-bbox.csv", labels_csv=f"{out}/val-labels.csv",
                 hierarchy_json=str(FIX / "challenge-2019-label500-hierarchy.json"),
                 classes_csv=str(FIX / "challenge-2019-classes-description-500.csv"))
    if step == "end_to_end":
        t0 = time.perf_counter()
        data = score_files(**files, predictions=f"{out}/predictions.csv")
        seconds, mean_ap = time.perf_counter() - t0, data["mAP"]
    else:
        inputs = load_ground_truth(**files)
        preds = read_predictions(f"{out}/predictions.csv", inputs)
        t0 = time.perf_counter()
        result = evaluate(inputs.gt, preds.image, preds.label, preds.score, preds.boxes)
        seconds, mean_ap = time.perf_counter() - t0, result.mean_ap()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"step": step, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2), "mAP": mean_ap}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=41_620)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    out = REPO / "bench" / "out" / f"metric-{args.images}-{args.dets_per_image}"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "predictions.csv").exists():
        generate(out, args.images, args.dets_per_image)
    results = [json.loads(subprocess.run([sys.executable, __file__, "--child", step, str(out)], check=True,
                                         capture_output=True, text=True, cwd=REPO).stdout.strip().splitlines()[-1])
               for step in ("end_to_end", "metric_only")]
    info = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "images": args.images,
            "detections": args.images * args.dets_per_image, "results": results}
    print(json.dumps(info, indent=1))
    (REPO / "bench" / "out" / "metric.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
