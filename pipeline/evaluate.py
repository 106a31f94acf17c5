"""Distributed inference (Ray tasks), evaluation with the official OID metric, and submissions.

Inference is sharded like detectron2's ``InferenceSampler``: the images are cut into contiguous
ranges, one Ray task each (sized by the ``inference`` config section: a GPU each, or CPUs), every
image scored exactly once; each task builds the model, loads the checkpoint and runs the one
inference loop (``pipeline.inference``), which turns every batch into a ``Detections`` record.
The driver gathers them (merging an ensemble's members), feeds an evaluator
(``pipeline.evaluators``: the official OID metric on the split's CSVs, or COCO AP) and writes
``report.json``, a TF-evaluator predictions CSV and a PR plot; or writes a submission.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import ConfigError, InputError
from data_prep.prep import load_label_space
from data_prep.storage import is_s3, open_storage
from pipeline.checkpoint import CONFIG_FILE, is_remote, resolve_checkpoint
from pipeline.config import EnsembleMember, ExperimentConfig, to_dict
from pipeline.detections import Detections
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.inference import (
    DetectionsCollector,
    detect_range,
    inference_on_batches,
    inference_plan,
    load_model_for_inference,
    to_data_ids,
)


def _task_model(cfg_dict: dict, checkpoint: str, device: str):
    """In an inference task: the member's config, its model with the checkpoint's weights, and the
    device the task was given (``InferencePlan.device``)."""
    from pipeline.config import from_dict

    cfg = from_dict(ExperimentConfig, cfg_dict)
    dev = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
    return cfg, load_model_for_inference(cfg, checkpoint, dev), dev


def _infer_shard_range(cfg_dict: dict, split: str, checkpoint: str, start: int, stop: int, device: str
                       ) -> Detections:
    """One task: detections of the split's images ``[start, stop)``."""
    cfg, model, dev = _task_model(cfg_dict, checkpoint, device)
    return detect_range(model, cfg, split, start, stop, cfg.inference.images_per_batch, dev)


def _infer_files(cfg_dict: dict, checkpoint: str, images: str, files: list[tuple[str, str]], device: str
                 ) -> tuple[Detections, list[tuple[str, str]]]:
    """One task: the detections of the ``(ImageID, object name)`` image files, and ``(ImageID,
    problem)`` for each image that cannot be read (it gets an empty row)."""
    from PIL import Image

    cfg, model, dev = _task_model(cfg_dict, checkpoint, device)
    storage = open_storage(images, cfg.data.s3_endpoint_url)
    problems: list[tuple[str, str]] = []

    def readable():
        for image_id, name in files:
            try:
                with Image.open(io.BytesIO(storage.read_bytes(name))) as im:
                    rgb = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, InputError) as exc:  # unreadable: an empty row, named in the report
                problems.append((image_id, f"{storage.uri(name)}: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            yield [(image_id, torch.from_numpy(rgb.copy()).permute(2, 0, 1))]  # the model resizes it

    return inference_on_batches(model, cfg, readable(), dev, DetectionsCollector()), problems


@dataclass
class Member:
    """One model of an inference run: its config (model section its own, test section the run's),
    its checkpoint and its weight in an ensemble."""

    cfg: ExperimentConfig
    checkpoint: str
    weight: float = 1.0


def _member_config(cfg: ExperimentConfig, spec: EnsembleMember) -> ExperimentConfig:
    """The config of one ensemble member: the model section of ``spec.config``, else of the config
    saved beside its checkpoint, else the run's; the test section (and everything else) the run's."""
    from pipeline.classes import resolve_class_selection
    from pipeline.config import load_config

    source = spec.config
    if source is None:
        saved = resolve_checkpoint(spec.checkpoint, cfg.data.s3_endpoint_url).parent / CONFIG_FILE
        source = str(saved) if saved.is_file() else None
    model = load_config(source, []).model if source else cfg.model
    test = dataclasses.replace(cfg.model.test,
                               tta_flip=cfg.model.test.tta_flip if spec.tta_flip is None else spec.tta_flip,
                               tta_scales=list(cfg.model.test.tta_scales if spec.tta_scales is None else spec.tta_scales))
    return resolve_class_selection(dataclasses.replace(cfg, model=dataclasses.replace(model, test=test)))


def inference_members(cfg: ExperimentConfig, checkpoints: list[str]) -> list[Member]:
    """The models an inference run uses: one ``--checkpoint`` with the run's config, or an ensemble
    (several ``--checkpoint``s, or ``ensemble.members``), each member with its own model section."""
    from pipeline.classes import resolve_class_selection

    ens = cfg.ensemble
    if checkpoints and ens.members:
        raise ConfigError("give the ensemble's checkpoints either as --checkpoint or as ensemble.members, not both")
    if len(checkpoints) == 1 and not ens.members:
        return [Member(resolve_class_selection(cfg), checkpoints[0])]
    specs = list(ens.members) or [EnsembleMember(c) for c in checkpoints]
    if not specs:
        raise ConfigError("no model: give --checkpoint (several for an ensemble) or ensemble.members")
    if ens.weights:
        if len(ens.weights) != len(specs):
            raise ConfigError(f"ensemble.weights has {len(ens.weights)} values for {len(specs)} members")
        specs = [dataclasses.replace(s, weight=w) for s, w in zip(specs, ens.weights, strict=True)]
    if any(s.weight <= 0 for s in specs):
        raise ConfigError("ensemble member weights must be > 0")
    return [Member(_member_config(cfg, s), s.checkpoint, s.weight) for s in specs]


def member_covers(member: Member, num_classes: int) -> np.ndarray:
    """``[C]`` bool: the data classes a member detects (an expert: its own)."""
    covers = np.zeros(num_classes, dtype=bool)
    covers[to_data_ids(member.cfg)] = True
    return covers


def fuse_members(cfg: ExperimentConfig, members: list[Member], per_member: list[Detections],
                 num_classes: int) -> Detections:
    """The run's detections: a single member's as they are, an ensemble's merged (``pipeline.ensemble``)."""
    from pipeline.ensemble import MemberDetections, fuse

    if len(members) == 1:
        return per_member[0]
    ens = cfg.ensemble
    return fuse([MemberDetections(d, m.weight, member_covers(m, num_classes)) for m, d in zip(members, per_member,
                                                                                              strict=True)],
                ens.method, ens.iou, ens.skip_score, cfg.model.test.max_detections)


def _num_data_classes(cfg: ExperimentConfig) -> int:
    return cfg.model.num_classes if cfg.data.format == "coco" else len(load_label_space(cfg.data)[0])


@dataclass
class InferenceResult:
    """The detections of an inference run over a split, and what produced them."""

    detections: Detections
    members: list[Member]
    num_images: int
    covers: np.ndarray  # [C] bool: the data classes some member detects


def run_inference(cfg: ExperimentConfig, checkpoint: str | list[str], split: str, address: str | None = None,
                  num_tasks: int | None = None, progress: bool = True) -> InferenceResult:
    """Detections on every image of a prepared split, gathered from Ray tasks (every member's tasks
    at once for an ensemble, then merged), classes in the data's label space."""
    import ray

    from data_prep.index import ShardIndex
    from data_prep.ray_runtime import gather_with_progress, init_ray, shutdown_ray

    members = inference_members(cfg, [checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    n = len(ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url), split))
    started = init_ray(address)
    try:
        plan = inference_plan(cfg if num_tasks is None else dataclasses.replace(
            cfg, inference=dataclasses.replace(cfg.inference, num_tasks=num_tasks)), n)
        bounds = np.linspace(0, n, plan.tasks + 1).astype(int)
        ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        remote = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_infer_shard_range)
        refs = [remote.remote(to_dict(m.cfg), split, str(m.checkpoint), a, b, plan.device)
                for m in members for a, b in ranges]
        desc = f"inference {split}" + (f" ({len(members)} models)" if len(members) > 1 else "")
        parts = gather_with_progress(refs, desc, unit="img", progress=progress,
                                     sizes=[b - a for _ in members for a, b in ranges])
    finally:
        shutdown_ray(started)
    per_member = [Detections.concat(parts[k * len(ranges) : (k + 1) * len(ranges)]) for k in range(len(members))]
    num_classes = _num_data_classes(cfg)
    return InferenceResult(fuse_members(cfg, members, per_member, num_classes), members, n,
                           np.logical_or.reduce([member_covers(m, num_classes) for m in members]))


def write_predictions_csv(path: Path, detections: Detections, mids: tuple[str, ...]) -> None:
    """The TF evaluator's format: ``ImageID,LabelName,Score,XMin,XMax,YMin,YMax``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageID", "LabelName", "Score", "XMin", "XMax", "YMin", "YMax"])
    b = np.clip(detections.boxes, 0, 1)
    for key, c, s, box in zip(detections.keys, detections.classes, detections.scores, b, strict=True):
        writer.writerow([key, mids[int(c)], f"{s:.6g}", f"{box[0]:.6f}", f"{box[2]:.6f}", f"{box[1]:.6f}", f"{box[3]:.6f}"])
    write_text_atomic(path, out.getvalue())


def _models_fields(cfg: ExperimentConfig, members: list[Member], checkpoints: list[str]) -> dict:
    """What a report says of the model(s) it scored."""
    if len(checkpoints) == 1 and not cfg.ensemble.members:
        return {"checkpoint": str(checkpoints[0])}
    return {"checkpoint": str(members[0].checkpoint),
            "ensemble": {"method": cfg.ensemble.method, "iou": cfg.ensemble.iou,
                         "members": [{"checkpoint": str(m.checkpoint), "weight": m.weight,
                                      "classes": len(m.cfg.model.classes) or "all",
                                      "tta_flip": m.cfg.model.test.tta_flip, "tta_scales": m.cfg.model.test.tta_scales}
                                     for m in members]}}


def _default_out(cfg: ExperimentConfig, checkpoints: list[str], split: str) -> Path:
    first = checkpoints[0] if checkpoints else cfg.ensemble.members[0].checkpoint
    ensemble = len(checkpoints) > 1 or bool(cfg.ensemble.members)
    name = f"eval-{split}-ensemble" if ensemble else f"eval-{split}"
    if is_remote(first):  # beside an S3 checkpoint is not a local directory: the working directory
        return Path(name)
    return resolve_checkpoint(first).parent / name


def run_evaluation(cfg: ExperimentConfig, checkpoint: str | list[str], split: str = "validation",
                   out_dir: str | None = None, address: str | None = None, progress: bool = True,
                   tensorboard_dir: str | None = None, iteration: int | None = None) -> dict:
    """Inference on a prepared split (one model or an ensemble), the official metric on its CSVs,
    report/predictions/plot files. The AP of classes no model detects (an expert's others) is left
    out of the mAP, and their number reported."""
    from pipeline.evaluators import OIDEvaluator, size_breakdown
    from pipeline.oid_metric import COCO_STYLE_THRESHOLDS
    from pipeline.plots import plot_pr_curves
    from pipeline.scoring import report

    t0 = time.perf_counter()
    checkpoints = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    if cfg.data.format == "coco":
        return _run_coco_evaluation(cfg, checkpoints, split, out_dir, address, progress, tensorboard_dir, iteration,
                                    t0)
    evaluator = OIDEvaluator(cfg, split, COCO_STYLE_THRESHOLDS, keep_curves=True)  # the CSVs: refused early
    run = run_inference(cfg, checkpoints, split, address, progress=progress)
    evaluator.reset()
    evaluator.process(run.detections)
    scored = evaluator.evaluate()
    result, inputs = scored.result, scored.inputs
    not_detected = ~run.covers
    result.ap[:, not_detected] = np.nan  # not a class of the model(s): no AP, not 0
    data = report(result, inputs.labels, hierarchy=inputs.hierarchy, extra={
        "coco_style_by_size": size_breakdown(cfg, split, inputs, run.detections),
        "split": split, **_models_fields(cfg, run.members, checkpoints), "num_images": run.num_images,
        "classes_not_detected_by_the_models": int(not_detected.sum()),
        "num_detections": len(run.detections), "seconds": round(time.perf_counter() - t0, 2)})
    out = Path(out_dir or _default_out(cfg, checkpoints, split))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", data)
    write_predictions_csv(out / "predictions.csv", run.detections, inputs.labels.mids)
    plot_pr_curves(out / "pr_curves.png", result.curves, inputs.labels.names, result.ap[0])
    data["files"] = {"report": str(out / "report.json"), "predictions": str(out / "predictions.csv"),
                     "pr_curves": str(out / "pr_curves.png")}
    if tensorboard_dir:
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(tensorboard_dir) as writer:
            step = iteration or 0
            writer.add_scalar(f"eval/{split}_mAP@0.5", data["mAP"], step)
            if "mAP_50_95" in data:
                writer.add_scalar(f"eval/{split}_mAP@[.5:.95]", data["mAP_50_95"], step)
            pr = np.asarray(Image.open(out / "pr_curves.png").convert("RGB"))
            writer.add_image(f"eval/{split}_pr_curves", pr, step, dataformats="HWC")
    return data


def _run_coco_evaluation(cfg: ExperimentConfig, checkpoints: list[str], split: str, out_dir: str | None, address: str | None,
                         progress: bool, tensorboard_dir: str | None, iteration: int | None, t0: float) -> dict:
    """COCO datasets: COCO AP (pycocotools' COCOeval) against the split's instances JSON."""
    from pipeline.evaluators import COCOEvaluator

    evaluator = COCOEvaluator(cfg, split)
    run = run_inference(cfg, checkpoints, split, address, progress=progress)
    evaluator.reset()
    evaluator.process(run.detections)
    stats = evaluator.evaluate()
    data = {"metric": "COCO AP (pycocotools COCOeval, bbox)", "mAP": stats["AP"], **stats, "split": split,
            **_models_fields(cfg, run.members, checkpoints), "num_images": run.num_images,
            "num_detections": len(run.detections), "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(out_dir or _default_out(cfg, checkpoints, split))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", data)
    write_predictions_csv(out / "predictions.csv", run.detections, evaluator.labels.mids)
    data["files"] = {"report": str(out / "report.json"), "predictions": str(out / "predictions.csv")}
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(tensorboard_dir) as writer:
            writer.add_scalar(f"eval/{split}_coco_AP", stats["AP"], iteration or 0)
            writer.add_scalar(f"eval/{split}_coco_AP50", stats["AP50"], iteration or 0)
    return data


def submission_rows(image_ids: list[str], detections: Detections, mids: tuple[str, ...], max_det: int
                    ) -> list[tuple[str, str]]:
    """``(ImageId, PredictionString)`` for every image, in the order given; an image without
    detections gets an empty string."""
    from pipeline.submission import prediction_string

    keys = np.asarray(detections.keys, dtype=object)
    order = np.argsort(keys, kind="stable") if len(keys) else np.zeros(0, np.int64)
    sorted_keys = keys[order]
    rows = []
    for image_id in image_ids:
        lo, hi = np.searchsorted(sorted_keys, image_id, "left"), np.searchsorted(sorted_keys, image_id, "right")
        sel = order[lo:hi]
        rows.append((image_id, prediction_string([mids[int(c)] for c in detections.classes[sel]],
                                                 detections.scores[sel], detections.boxes[sel], max_det)))
    return rows


def run_submission(cfg: ExperimentConfig, checkpoint: str | list[str], images: str, out: str,
                   address: str | None = None, max_detections: int | None = None, progress: bool = True) -> dict:
    """Detect on every image of a directory or S3 prefix (one model or an ensemble) and write a
    validated Kaggle submission, with every image listed once."""
    import ray

    from data_prep.prep import list_images
    from data_prep.ray_runtime import gather_with_progress, init_ray, shutdown_ray
    from data_prep.rejects import RejectLog
    from pipeline.submission import check_submission, write_submission

    members = inference_members(cfg, [checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    labels, _ = load_label_space(cfg.data)
    images = images if is_s3(images) else str(Path(images).resolve())
    duplicates = RejectLog()
    found = list_images(open_storage(images, cfg.data.s3_endpoint_url), duplicates)  # ImageID -> (name, size)
    if not found:
        raise InputError(f"{images}: no images (.jpg, .jpeg, .png) found")
    files = sorted((image_id, name) for image_id, (name, _) in found.items())
    max_det = max_detections or cfg.model.test.max_detections
    started = init_ray(address)
    try:
        plan = inference_plan(cfg, len(files))
        chunks = [chunk for chunk in (files[k :: plan.tasks] for k in range(plan.tasks)) if chunk]
        remote = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_infer_files)
        refs = [remote.remote(to_dict(m.cfg), str(m.checkpoint), images, chunk, plan.device)
                for m in members for chunk in chunks]
        desc = "submission" + (f" ({len(members)} models)" if len(members) > 1 else "")
        parts = gather_with_progress(refs, desc, unit="img", progress=progress,
                                     sizes=[len(c) for _ in members for c in chunks])
    finally:
        shutdown_ray(started)
    per_member = [Detections.concat([d for d, _ in parts[k * len(chunks) : (k + 1) * len(chunks)]])
                  for k in range(len(members))]
    detections = fuse_members(cfg, members, per_member, len(labels))
    problems = dict(p for _, found_problems in parts for p in found_problems)  # one entry per image
    write_submission(out, submission_rows([image_id for image_id, _ in files], detections, labels.mids, max_det))
    counts = check_submission(out, set(labels.mids), set(found))
    unreadable = sorted(problems.items())
    report = {**counts, "models": len(members), "duplicate_image_files": len(duplicates),
              "unreadable_images": len(unreadable),
              "unreadable": [{"image_id": i, "problem": p} for i, p in unreadable]}
    write_json_atomic(Path(out).with_name(Path(out).stem + "-report.json"), report)
    return report
