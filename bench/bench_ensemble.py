"""Benchmark: ensembles, what merging costs and what it buys.

1. Cost: ms per image to merge M members of 100 detections per image over the 500 challenge
   classes (members see the same 125 objects, jittered, each missing a fifth of them): ours
   (``pipeline.ensemble.fuse``, ``wbf`` and ``vote``) vs the ``ensemble-boxes`` package's
   ``weighted_boxes_fusion`` (``conf_type="avg"``) when it can be imported (it needs numba and
   pandas, which the project does not depend on: put it on PYTHONPATH to compare).
2. Quality (``--checkpoints`` of runs, each with its ``config.yaml``): every model alone, our
   ``wbf`` and ``vote`` merges and ensemble-boxes' WBF on the very same member detections, official
   OID metric on the validation split (mAP, leaf and parent classes).

    python bench/bench_ensemble.py [--checkpoints work/runs/tiny work/runs/tiny-seed2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ensemble_boxes():
    try:
        import ensemble_boxes

        return ensemble_boxes
    except ImportError:
        return None


def synthetic_members(images: int, members: int, per_image: int = 125, classes: int = 500, seed: int = 0):
    from pipeline.detections import Detections
    from pipeline.ensemble import MemberDetections

    rng = np.random.default_rng(seed)
    out = [dict(keys=[], classes=[], scores=[], boxes=[]) for _ in range(members)]
    for i in range(images):
        xy = rng.uniform(0, 0.8, (per_image, 2))
        base = np.concatenate([xy, xy + rng.uniform(0.05, 0.2, (per_image, 2))], axis=1)
        label = rng.integers(0, classes, per_image)
        for m in range(members):
            seen = rng.random(per_image) > 0.2
            n = int(seen.sum())
            out[m]["keys"] += [f"img{i}"] * n
            out[m]["classes"].append(label[seen])
            out[m]["scores"].append(rng.uniform(0.01, 1, n))
            out[m]["boxes"].append(np.clip(base[seen] + rng.normal(0, 0.01, (n, 4)), 0, 1))
    return [MemberDetections(Detections(d["keys"], np.concatenate(d["classes"]), np.concatenate(d["scores"]),
                                        np.concatenate(d["boxes"])), 1.0, np.ones(classes, bool)) for d in out]


def ensemble_boxes_fuse(members, iou: float = 0.55, skip: float = 0.0, max_detections: int | None = None):
    """The package's WBF, image by image, on the same member detections (keys, classes, scores, boxes),
    the best ``max_detections`` of each image kept (as ``fuse`` does)."""
    eb = _ensemble_boxes()
    per_image: dict[str, list] = {}
    for m, member in enumerate(members):
        d = member.detections
        keys = np.asarray(d.keys, dtype=object)
        for key in dict.fromkeys(d.keys):
            per_image.setdefault(key, [[] for _ in members])
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for key in per_image:
            lo, hi = np.searchsorted(sorted_keys, key, "left"), np.searchsorted(sorted_keys, key, "right")
            per_image[key][m] = order[lo:hi]
    weights = [m.weight for m in members]
    dets = [m.detections for m in members]
    out = {"keys": [], "classes": [], "scores": [], "boxes": []}
    for key, rows in per_image.items():
        boxes = [np.clip(d.boxes[r], 0, 1).tolist() for d, r in zip(dets, rows, strict=True)]
        scores = [d.scores[r].tolist() for d, r in zip(dets, rows, strict=True)]
        labels = [d.classes[r].tolist() for d, r in zip(dets, rows, strict=True)]
        b, s, c = eb.weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=iou, skip_box_thr=skip,
                                           conf_type="avg")
        b, s, c = b[:max_detections], s[:max_detections], c[:max_detections]  # sorted by score already
        out["keys"] += [key] * len(s)
        out["classes"].append(np.asarray(c, np.int64))
        out["scores"].append(np.asarray(s))
        out["boxes"].append(np.asarray(b).reshape(-1, 4))
    from pipeline.detections import Detections

    return Detections(out["keys"], np.concatenate(out["classes"]), np.concatenate(out["scores"]),
                      np.concatenate(out["boxes"]))


def merge_cost(images: int = 200) -> list[dict]:
    from pipeline.ensemble import fuse

    rows = []
    for members in (2, 3):
        data = synthetic_members(images, members)
        row = {"members": members, "detections_per_member_image": 100, "classes": 500}
        for method in ("wbf", "vote"):
            fuse(data[:1] * members, method)  # warm-up
            t0 = time.perf_counter()
            fused = fuse(data, method)
            row[f"ours_{method}_ms_per_image"] = round(1000 * (time.perf_counter() - t0) / images, 3)
            row[f"ours_{method}_out_per_image"] = round(len(fused) / images, 1)
        if _ensemble_boxes() is not None:
            ensemble_boxes_fuse(synthetic_members(3, members))  # numba's compilation, outside the timing
            t0 = time.perf_counter()
            fused = ensemble_boxes_fuse(data)
            row["ensemble_boxes_wbf_ms_per_image"] = round(1000 * (time.perf_counter() - t0) / images, 3)
            row["ensemble_boxes_out_per_image"] = round(len(fused) / images, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def quality(checkpoints: list[str]) -> list[dict]:
    """Each run alone and merged, on its validation split (every run's config names the same data)."""
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.classes import model_classes
    from pipeline.config import load_config
    from pipeline.ensemble import MemberDetections, fuse
    from pipeline.evaluate import Member, member_covers
    from pipeline.evaluators import score_detections, split_ground_truth
    from pipeline.inference import detect_range, load_model_for_inference
    from pipeline.scoring import ap_by_level

    members, rows = [], []
    base = None
    for checkpoint in checkpoints:
        state = resolve_checkpoint(checkpoint)
        cfg = load_config(state.parent / "config.yaml")
        base = base or cfg
        model = load_model_for_inference(cfg, str(state), torch.device("cpu"))
        d = detect_range(model, cfg, "validation", 0, 10**9, 4, torch.device("cpu"))
        covers = member_covers(Member(cfg, str(state)), len(model_classes(cfg).data))
        members.append(MemberDetections(d, 1.0, covers))
    inputs = split_ground_truth(base, "validation")

    def row(name: str, detections, seconds: float | None = None) -> dict:
        result = score_detections(inputs, detections)
        levels = ap_by_level(result.ap[0], inputs.hierarchy, inputs.labels)
        out = {"detections": name, "mAP": round(result.mean_ap(0), 4), "mAP_leaf": round(levels["leaf"]["mAP"], 4),
               "mAP_parent": round(levels["parent"]["mAP"], 4), "count": len(detections)}
        if seconds is not None:
            out["merge_ms_per_image"] = round(1000 * seconds / detections.num_images(), 3)
        print(json.dumps(out), flush=True)
        return out

    for checkpoint, m in zip(checkpoints, members, strict=True):
        rows.append(row(f"single {checkpoint}", m.detections))
    for method in ("wbf", "vote"):
        t0 = time.perf_counter()
        fused = fuse(members, method, 0.55, max_detections=base.model.test.max_detections)
        rows.append(row(f"ours {method}", fused, time.perf_counter() - t0))
    if _ensemble_boxes() is not None:
        ensemble_boxes_fuse(members[:1])
        t0 = time.perf_counter()
        fused = ensemble_boxes_fuse(members, max_detections=base.model.test.max_detections)
        rows.append(row("ensemble-boxes wbf", fused, time.perf_counter() - t0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", default=[], help="runs (or checkpoints) to merge")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "ensemble.json"))
    args = parser.parse_args()
    eb = _ensemble_boxes()
    result = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "ensemble_boxes": getattr(eb, "__version__", "installed") if eb else None, "merge_cost": merge_cost()}
    if args.checkpoints:
        result["quality"] = quality(args.checkpoints)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
