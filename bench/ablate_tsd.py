"""Ablation of TSD's conventions on the synthetic OID-format data, several seeds, official OID metric.

Variants (``--variants``, comma-separated; each is the tiny config plus ``--set`` overrides):

- ``aligned``: the default, roi_align(aligned=True)-plus-offsets pooling of P-hat-c / P-hat-r (2x2
  samples per bin), offset nets' last layers starting at zero;
- ``authors_pool``: the authors' deformable RoI pooling (``tsd.pooling=authors``, 4x4 samples);
- ``kaiming_init``: the authors' init of the offset nets (``tsd.offset_init=kaiming_normal``);
- ``authors``: both, plus the authors' P pooling and fc init (what the paper configs use);
- ``cascade_specific`` / ``cascade_agnostic``: Cascade TSD with class-specific (the authors) or
  class-agnostic regression in every stage;
- the hierarchy: ``no_expansion`` (detections not copied to ancestor classes at test),
  ``expanded_targets`` (prep's ancestor copies of the boxes also used as training targets), both
  (``expanded_targets_no_expansion``: the pipeline before detections covered the hierarchy), and the
  multi-label head (``sigmoid``, ``sigmoid_expansion``);
- ``--ensemble``: each variant's seeds merged by weighted boxes fusion and by box voting
  (``pipeline.ensemble``), one more row each.

Each run: the same synthetic train/validation split (``tsd synth``'s generator, sharded in this
process), the tiny model trained in one process with the demo's schedule (``pipeline.train``'s
sampler, learning rate and ``train_step``), then inference on the validation split and the
official OID metric (``pipeline.evaluate``). Prints a Markdown table (mean and spread over seeds)
and writes every run to ``--out``.

    python bench/ablate_tsd.py --seeds 0,1,2 --variants aligned,authors_pool,kaiming_init
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS: dict[str, list[str]] = {
    "aligned": [],
    "authors_pool": ["model.tsd.pooling=authors", "model.tsd.samples_per_bin=4"],
    "kaiming_init": ["model.tsd.offset_init=kaiming_normal"],
    "authors": ["model.tsd.pooling=authors", "model.tsd.samples_per_bin=4", "model.tsd.offset_init=kaiming_normal",
                "model.roi.pooling=mmdet_v1_roi_align", "model.roi.fc_init=kaiming_normal"],
    "cascade_specific": ["model.cascade.enabled=true", "model.cascade.class_agnostic=false"],
    "cascade_agnostic": ["model.cascade.enabled=true", "model.cascade.class_agnostic=true"],
    # the hierarchy: training targets x expansion of detections to ancestors at test
    "no_expansion": ["model.test.expand_to_ancestors=false"],
    "expanded_targets": ["loader.use_expanded_labels=true"],
    "expanded_targets_no_expansion": ["loader.use_expanded_labels=true", "model.test.expand_to_ancestors=false"],
    "sigmoid": ["model.roi.classification=sigmoid"],
    "sigmoid_expansion": ["model.roi.classification=sigmoid", "model.test.expand_to_ancestors=true"],
}


def make_data(work: Path, num_train: int, num_validation: int) -> tuple[Path, Path]:
    """The synthetic dataset and its shards (train + validation), written in this process."""
    from data_prep.index import write_index
    from data_prep.prep import image_settings, load_label_space, plan_split
    from data_prep.shard import write_shard
    from data_prep.storage import open_storage
    from data_prep.synthetic import generate
    from pipeline.config import load_config

    synth, shards = work / "synth", work / "shards"
    generate(synth, num_train=num_train, num_validation=num_validation, seed=0, progress=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.root={synth}", f"data.shards={shards}"])
    labels, hierarchy = load_label_space(cfg.data)
    out = open_storage(str(shards))
    up = hierarchy.ancestor_matrix(labels)
    for split in ("train", "validation"):
        plan = plan_split(cfg.data, cfg.prep, split, labels)
        write_index(out, split, [write_shard(s, plan.images, out, image_settings(cfg.prep), up) for s in plan.shards])
    return synth, shards


def train_and_score(synth: Path, shards: Path, overrides: list[str], seed: int, epochs: int) -> dict:
    from pipeline.config import load_config
    from pipeline.evaluators import split_ground_truth
    from pipeline.inference import detect_range
    from pipeline.loader import ShardDataset, unpack
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec
    from pipeline.schedule import learning_rate, parameter_groups
    from pipeline.train import label_ancestors, make_loader, train_step
    from tsd_model.build import build_model

    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"data.root={synth}", f"data.shards={shards}", f"train.seed={seed}", f"train.epochs={epochs}",
                       "loader.num_workers=0", "model.test.score_thresh=0.01", "model.test.max_detections=100",
                       *overrides])
    tc = cfg.train
    batch = tc.images_per_worker * tc.num_workers  # the demo's global batch, here on one process
    torch.manual_seed(seed)
    model = build_model(cfg.model, label_ancestors=label_ancestors(cfg))
    model.train()
    optimizer = torch.optim.SGD(parameter_groups(model, tc), lr=tc.base_lr_per_image, momentum=tc.momentum)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dataset = ShardDataset(str(shards), tc.split, cfg.model.input.min_size, cfg.model.input.max_size,
                           use_expanded_labels=cfg.loader.use_expanded_labels)
    ipe = max(1, len(dataset) // batch)
    sampler = GlobalBatchSampler(dataset.sample_labels, dataset.index.widths >= dataset.index.heights,
                                 cfg.model.num_classes, batch, 1, 0, tc.seed, ipe,
                                 SamplerSpec(cfg.loader.sampler, cfg.loader.num_sample_class,
                                             cfg.loader.repeat_threshold, cfg.loader.group_by_aspect,
                                             cfg.loader.flip_prob))
    t0 = time.perf_counter()
    skipped = 0
    for epoch in range(epochs):
        for n, data in enumerate(make_loader(cfg, dataset, sampler, epoch, 0, 0, 1)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch * ipe + n, tc, batch, ipe)
            images, targets = unpack(data, torch.device("cpu"))
            step = train_step(model, optimizer, scaler, images, targets, 1, None, tc.grad_clip_norm)
            skipped += not step.finite
    train_s = time.perf_counter() - t0
    model.eval()
    inputs = split_ground_truth(cfg, "validation")
    detections = detect_range(model, cfg, "validation", 0, 10**9, 4, torch.device("cpu"))
    return {**scores(inputs, detections), "train_s": round(train_s, 1), "iterations": epochs * ipe,
            "nonfinite_steps": skipped}, (inputs, detections)


def scores(inputs, detections) -> dict:
    from pipeline.evaluators import score_detections
    from pipeline.scoring import ap_by_level

    result = score_detections(inputs, detections)
    levels = ap_by_level(result.ap[0], inputs.hierarchy, inputs.labels)
    return {"mAP": round(result.mean_ap(0), 4), "mAP_leaf": round(levels["leaf"]["mAP"], 4),
            "mAP_parent": round(levels["parent"]["mAP"], 4),
            "classes_at_ap_0": int((result.ap[0][result.num_positives > 0] == 0).sum())}


def ensemble_of_seeds(outputs: list[tuple], method: str = "wbf") -> dict:
    """The seeds' detections of one variant merged (``pipeline.ensemble``, equal weights), scored."""
    import numpy as np

    from pipeline.ensemble import MemberDetections, fuse

    inputs = outputs[0][0]
    covers = np.ones(len(inputs.labels), bool)
    members = [MemberDetections(d, 1.0, covers) for _, d in outputs]
    if method == "ensemble_boxes":  # the package's WBF on the same detections (bench_ensemble.py)
        from bench_ensemble import ensemble_boxes_fuse

        return scores(inputs, ensemble_boxes_fuse(members, 0.55, max_detections=100))
    return scores(inputs, fuse(members, method, 0.55, max_detections=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="aligned,authors_pool,kaiming_init,cascade_specific,cascade_agnostic")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--validation-images", type=int, default=50)
    parser.add_argument("--ensemble", action="store_true",
                        help="also merge each variant's seeds (wbf and vote): an ensemble row per variant")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "ablation.json"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-ablate-"))
    runs = []
    try:
        synth, shards = make_data(work, args.train_images, args.validation_images)
        for variant in variants:
            outputs = []
            for seed in seeds:
                metrics, output = train_and_score(synth, shards, VARIANTS[variant], seed, args.epochs)
                row = {"variant": variant, "seed": seed, **metrics}
                print(json.dumps(row), flush=True)
                runs.append(row)
                outputs.append(output)
            if args.ensemble and len(seeds) > 1:  # the seeds' models merged: one more row
                from bench_ensemble import _ensemble_boxes

                for method in ("wbf", "vote", *(["ensemble_boxes"] if _ensemble_boxes() else [])):
                    row = {"variant": f"{variant}+ensemble_{method}", "seed": -1, **ensemble_of_seeds(outputs, method),
                           "train_s": 0.0}
                    print(json.dumps(row), flush=True)
                    runs.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| variant | mAP@0.5 (mean over seeds {args.seeds}) | min - max | leaf classes | parent classes | "
          "classes at AP 0 | train s / run |")
    print("|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]
        maps = [r["mAP"] for r in rows]

        def mean(key: str, rows: list[dict] = rows) -> float:
            return statistics.mean(r[key] for r in rows)

        print(f"| {variant} | {statistics.mean(maps):.3f} | {min(maps):.3f} - {max(maps):.3f} | {mean('mAP_leaf'):.3f} | "
              f"{mean('mAP_parent'):.3f} | {mean('classes_at_ap_0'):.1f} | {mean('train_s'):.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                               "cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                               "epochs": args.epochs, "train_images": args.train_images,
                               "validation_images": args.validation_images, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
