"""Benchmark: what the challenge post-processing buys and costs.

1. Quality: a trained run (``--workdir`` of ``make demo`` / ``tsd demo``: its newest run's config and
   checkpoint) evaluated on its validation split with each suppression method (``nms``,
   ``soft_gaussian``, ``adj``, ``voting``), with and without the expansion of detections to
   ancestor classes; official OID metric, mAP and the leaf / parent split.
2. Capping: mAP at N detections per image (after the expansion) and the bytes per detection of
   the submission file.
3. Cost: ``AncestorExpansion`` on the challenge's 500-class hierarchy (the real file, from the
   test fixtures) at 100 detections per image of random classes, in ms per image.

    python bench/bench_postprocess.py --workdir work
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

METHODS = ("nms", "soft_gaussian", "adj", "voting")


def newest_run(workdir: Path) -> tuple[Path, str]:
    """The newest run's resolved config and its last checkpoint."""
    from pipeline.checkpoint import resolve_checkpoint

    runs = sorted((p for p in (workdir / "runs").iterdir() if (p / "config.yaml").is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"{workdir}/runs: no run with a config.yaml (run `make demo` first)")
    run = runs[-1]
    return run / "config.yaml", str(resolve_checkpoint(str(run)))


def quality(config: Path, checkpoint: str) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.evaluators import score_detections, split_ground_truth
    from pipeline.inference import detect_range, load_model_for_inference
    from pipeline.scoring import ap_by_level

    rows = []
    base = load_config(config)
    inputs = split_ground_truth(base, "validation")
    model = load_model_for_inference(base, checkpoint, torch.device("cpu"))
    for method in METHODS:
        for expand in (True, False):
            cfg = load_config(config, [f"model.test.nms={method}", f"model.test.expand_to_ancestors={str(expand).lower()}",
                                       "model.test.score_thresh=0.01", "model.test.max_detections=100"])
            model.roi_heads.test = cfg.model.test  # the model applies its own test settings
            t0 = time.perf_counter()
            detections = detect_range(model, cfg, "validation", 0, 10**9, 4, torch.device("cpu"))
            seconds = time.perf_counter() - t0
            result = score_detections(inputs, detections)
            levels = ap_by_level(result.ap[0], inputs.hierarchy, inputs.labels)
            row = {"nms": method, "expand_to_ancestors": expand, "mAP": round(result.mean_ap(0), 4),
                   "mAP_leaf": round(levels["leaf"]["mAP"], 4), "mAP_parent": round(levels["parent"]["mAP"], 4),
                   "detections": len(detections), "inference_s": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def capping(config: Path, checkpoint: str, caps: tuple[int, ...] = (5, 10, 20, 50, 100)) -> list[dict]:
    """mAP when a submission keeps at most N detections per image (after the expansion), and the
    bytes a detection takes in the submission file (what sizes a 100k-image upload)."""
    from data_prep.prep import load_label_space
    from pipeline.config import load_config
    from pipeline.evaluators import score_detections, split_ground_truth
    from pipeline.inference import detect_range, load_model_for_inference
    from pipeline.submission import prediction_string

    cfg = load_config(config, ["model.test.score_thresh=0.01", "model.test.max_detections=100"])
    inputs = split_ground_truth(cfg, "validation")
    model = load_model_for_inference(cfg, checkpoint, torch.device("cpu"))
    model.roi_heads.test = cfg.model.test
    detections = detect_range(model, cfg, "validation", 0, 10**9, 4, torch.device("cpu"))
    mids = load_label_space(cfg.data)[0].mids
    keys = np.asarray(detections.keys, dtype=object)
    rows = []
    for cap in caps:
        keep = []
        text_bytes = 0
        for key in dict.fromkeys(detections.keys):
            idx = np.flatnonzero(keys == key)
            idx = idx[np.argsort(-detections.scores[idx], kind="stable")][:cap]
            keep.append(idx)
            text_bytes += len(prediction_string([mids[c] for c in detections.classes[idx]],
                                                detections.scores[idx], detections.boxes[idx]))
        keep = np.concatenate(keep)
        capped = detections.select(keep)
        result = score_detections(inputs, capped)
        row = {"max_per_image": cap, "mAP": round(result.mean_ap(0), 4), "detections": int(len(keep)),
               "bytes_per_detection": round(text_bytes / max(1, len(keep)), 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def expansion_cost(images: int = 300, per_image: int = 100) -> dict:
    from data_prep.hierarchy import Hierarchy
    from data_prep.labels import LabelSpace
    from pipeline.expand import AncestorExpansion

    fixtures = REPO / "tests" / "data" / "oid" / "challenge2019"
    labels = LabelSpace.from_csv_text((fixtures / "challenge-2019-classes-description-500.csv").read_text())
    hierarchy = Hierarchy.from_json_text((fixtures / "challenge-2019-label500-hierarchy.json").read_text())
    up = hierarchy.ancestor_matrix(labels)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(images):
        xy = torch.rand(per_image, 2, generator=g) * 600
        wh = torch.rand(per_image, 2, generator=g) * 300 + 10
        batches.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.randint(0, len(labels), (per_image,),
                                                                                         generator=g),
                        "scores": torch.rand(per_image, generator=g)})
    out = {"classes": len(labels), "detections_per_image": per_image,
           "copies_per_detection": round(float(up.sum(axis=1).mean()), 2)}
    for dedup in ("nms", "max"):
        expand = AncestorExpansion.from_matrix(up, dedup, 0.5)
        for b in batches[:5]:
            expand(b)  # warm-up
        t0 = time.perf_counter()
        sizes = [len(expand(b)["scores"]) for b in batches]
        out[f"ms_per_image_{dedup}"] = round(1000 * (time.perf_counter() - t0) / images, 3)
        out[f"detections_after_{dedup}"] = round(float(np.mean(sizes)), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "work"), help="a `tsd demo` work directory")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "postprocess.json"))
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "expansion_cost": expansion_cost()}
    print(json.dumps(result["expansion_cost"]), flush=True)
    if not args.skip_quality:
        config, checkpoint = newest_run(Path(args.workdir))
        result["run"] = str(config.parent)
        result["quality"] = quality(config, checkpoint)
        result["capping"] = capping(config, checkpoint)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
