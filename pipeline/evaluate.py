"""Distributed inference (Ray tasks), evaluation with the official OID metric, and submissions.

Inference is sharded like detectron2's ``InferenceSampler``: the images are cut into contiguous
ranges, one Ray task each (CPU or GPU), every image scored exactly once; each task builds the
model, loads the checkpoint and runs batched ``torch.inference_mode`` forwards (autocast on CUDA,
TTA when the config asks for it). The driver gathers the detections, scores them against the
split's official CSVs and writes ``report.json``, a TF-evaluator predictions CSV and a PR plot.
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
from data_prep.prep import load_label_space, resolve
from data_prep.storage import is_s3, open_storage
from pipeline.checkpoint import CONFIG_FILE, is_remote, load_state, resolve_checkpoint
from pipeline.config import EnsembleMember, ExperimentConfig, to_dict
from pipeline.files import write_json_atomic, write_text_atomic


def load_model_for_inference(cfg: ExperimentConfig, checkpoint: str, device: torch.device):
    """The config's model with the weights of a ``tsd train`` checkpoint."""
    from tsd_model.build import build_model

    model = build_model(cfg.model, load_weights=False)  # every weight comes from the checkpoint
    state = load_state(checkpoint, cfg.data.s3_endpoint_url)
    try:
        model.load_state_dict(state["model"] if "model" in state else state)
    except RuntimeError as exc:
        raise InputError(f"{checkpoint}: the checkpoint does not fit the config's model "
                         f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def expansion_for(cfg: ExperimentConfig):
    """The expansion of detections to ancestor classes that ``model.test.expand_to_ancestors`` asks
    for, or None (off; a multi-label head unless asked; a label space without parent classes:
    expansion would change nothing)."""
    from pipeline.expand import AncestorExpansion

    test = cfg.model.test
    if test.expand_to_ancestors is False or cfg.data.format == "coco":
        return None
    if test.expand_to_ancestors is None and cfg.model.roi.classification == "sigmoid":
        return None  # a multi-label head scores every level itself
    from pipeline.classes import model_classes

    matrix = model_classes(cfg).model_ancestor_matrix()  # an expert expands within its own classes
    expansion = AncestorExpansion.from_matrix(matrix, test.expand_dedup, test.nms_iou)
    return expansion if expansion.has_parents else None


def _infer(model, images: list[torch.Tensor], cfg: ExperimentConfig, device: torch.device,
           expansion=None) -> list[dict]:
    """Detections of ``images`` in their pixels; with ``expansion``, at every level of the hierarchy.
    The one inference step of evaluation, submissions and evaluation during training."""
    test = cfg.model.test
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        images = [i.to(device) for i in images]
        if test.tta_scales or test.tta_flip:
            outs = model.detect_tta(images, list(test.tta_scales), test.tta_flip, test)
        else:
            outs = model(images)
        return [expansion(out) for out in outs] if expansion is not None else outs


def _infer_shard_range(cfg_dict: dict, split: str, checkpoint: str, start: int, stop: int, batch_size: int) -> dict:
    """One task: detections of the split's images ``[start, stop)`` (normalized boxes)."""
    from pipeline.config import from_dict

    cfg = from_dict(ExperimentConfig, cfg_dict)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    model = load_model_for_inference(cfg, checkpoint, device)
    return detect_range(model, cfg, split, start, stop, batch_size, device)


def detect_range(model, cfg: ExperimentConfig, split: str, start: int, stop: int, batch_size: int,
                 device: torch.device) -> dict:
    """Detections of the prepared split's images ``[start, stop)``, boxes normalized to [0, 1]."""
    from pipeline.loader import ShardDataset

    ds = ShardDataset(cfg.data.shards, split, cfg.model.input.min_size, cfg.model.input.max_size,
                      cfg.data.s3_endpoint_url, read_ahead=cfg.loader.read_ahead)
    if ds.skipped:
        raise InputError(f"{cfg.data.shards}: split '{split}' has missing or truncated shards {ds.skipped}; "
                         f"evaluating without them would change the metric -- re-run `tsd prep`")
    stop = min(stop, len(ds))
    expansion = expansion_for(cfg)
    to_data = _to_data_ids(cfg)
    parts = []
    batches = [[(i, False) for i in range(lo, min(stop, lo + batch_size))] for lo in range(start, stop, batch_size)]
    ds.plan_batches(batches)  # S3 shards: the next images are read while this batch is detected
    for batch in batches:
        items = ds.__getitems__(batch)
        outs = _infer(model, [it["image"] for it in items], cfg, device, expansion)
        for it, out in zip(items, outs, strict=True):
            h, w = it["image"].shape[-2:]
            parts.append({"keys": [ds.index.key(it["index"])] * len(out["scores"]),
                          "classes": to_data[out["labels"].cpu().numpy()],
                          "scores": out["scores"].float().cpu().numpy(),
                          "boxes": out["boxes"].float().cpu().numpy() / np.array([w, h, w, h], dtype=np.float32)})
    return merge_detections(parts)


def _to_data_ids(cfg: ExperimentConfig) -> np.ndarray:
    """Model id -> data id (identity unless the model is a class-subset expert)."""
    if cfg.data.format == "coco" or not cfg.model.classes:
        return np.arange(cfg.model.num_classes, dtype=np.int64)
    from pipeline.classes import model_classes

    return model_classes(cfg).to_data


def merge_detections(parts: list[dict]) -> dict:
    """One detections dict (keys, classes, scores, normalized boxes) from several, in order."""
    return {
        "keys": [k for p in parts for k in p["keys"]],
        "classes": np.concatenate([p["classes"] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64),
        "scores": np.concatenate([p["scores"] for p in parts]) if parts else np.zeros(0),
        "boxes": np.concatenate([p["boxes"] for p in parts]).reshape(-1, 4) if parts else np.zeros((0, 4)),
    }


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
    covers[_to_data_ids(member.cfg)] = True
    return covers


def fuse_members(cfg: ExperimentConfig, members: list[Member], per_member: list[dict], num_classes: int) -> dict:
    """The run's detections: a single member's as they are, an ensemble's merged (``pipeline.ensemble``)."""
    from pipeline.ensemble import MemberDetections, fuse

    if len(members) == 1:
        return per_member[0]
    ens = cfg.ensemble
    return fuse([MemberDetections(d["keys"], d["classes"], d["scores"], d["boxes"], m.weight,
                                  member_covers(m, num_classes)) for m, d in zip(members, per_member, strict=True)],
                ens.method, ens.iou, ens.skip_score, cfg.model.test.max_detections)


def run_inference(cfg: ExperimentConfig, checkpoint: str | list[str], split: str, address: str | None = None,
                  num_tasks: int | None = None, progress: bool = True) -> dict:
    """Detections on every image of a prepared split, gathered from Ray tasks (every member's tasks
    at once for an ensemble, then merged), classes in the data's label space."""
    import ray

    from data_prep.index import ShardIndex
    from data_prep.ray_runtime import gather_with_progress, init_ray, shutdown_ray

    members = inference_members(cfg, [checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    index = ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url), split)
    n = len(index)
    tasks = num_tasks or max(1, cfg.train.num_workers)
    bounds = np.linspace(0, n, tasks + 1).astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    started = init_ray(address)
    try:
        remote = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0)(
            _infer_shard_range)
        refs = [remote.remote(to_dict(m.cfg), split, str(m.checkpoint), a, b, cfg.train.images_per_worker)
                for m in members for a, b in ranges]
        desc = f"inference {split}" + (f" ({len(members)} models)" if len(members) > 1 else "")
        parts = gather_with_progress(refs, desc, unit="img", progress=progress,
                                     sizes=[b - a for _ in members for a, b in ranges])
    finally:
        shutdown_ray(started)
    per_member = [merge_detections(parts[k * len(ranges) : (k + 1) * len(ranges)]) for k in range(len(members))]
    num_classes = cfg.model.num_classes if cfg.data.format == "coco" else len(load_label_space(cfg.data)[0])
    return {**fuse_members(cfg, members, per_member, num_classes), "num_images": n,
            "covers": np.logical_or.reduce([member_covers(m, num_classes) for m in members])}


def write_predictions_csv(path: Path, detections: dict, mids: tuple[str, ...]) -> None:
    """The TF evaluator's format: ``ImageID,LabelName,Score,XMin,XMax,YMin,YMax``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageID", "LabelName", "Score", "XMin", "XMax", "YMin", "YMax"])
    b = np.clip(detections["boxes"], 0, 1)
    for key, c, s, box in zip(detections["keys"], detections["classes"], detections["scores"], b, strict=True):
        writer.writerow([key, mids[int(c)], f"{s:.6g}", f"{box[0]:.6f}", f"{box[2]:.6f}", f"{box[1]:.6f}", f"{box[3]:.6f}"])
    write_text_atomic(path, out.getvalue())


def split_ground_truth(cfg: ExperimentConfig, split: str):
    """The official ground truth of a configured split (its box and image-level label CSVs)."""
    from pipeline.scoring import load_ground_truth

    if split not in cfg.data.splits or not cfg.data.splits[split].boxes:
        raise InputError(f"data.splits.{split}: evaluation needs the split's box CSV")
    files = cfg.data.splits[split]
    return load_ground_truth(resolve(cfg.data.root, files.boxes),
                             resolve(cfg.data.root, files.labels) if files.labels else None,
                             resolve(cfg.data.root, cfg.data.hierarchy), resolve(cfg.data.root, cfg.data.classes),
                             cfg.data.s3_endpoint_url)


def score_detections(inputs, detections: dict, thresholds=(0.5,), keep_curves: bool = False):
    from pipeline.oid_metric import evaluate

    image_codes = np.array([inputs.images.get(k) for k in detections["keys"]], dtype=np.int64)
    return evaluate(inputs.gt, image_codes, detections["classes"], detections["scores"], detections["boxes"],
                    thresholds=thresholds, keep_curves=keep_curves)


def size_breakdown(cfg: ExperimentConfig, split: str, inputs, detections: dict) -> dict[str, float]:
    """COCO-style AP by object size (paper Table 9) on the split's expanded ground truth, in pixels
    of the stored images, group-of boxes as crowd regions. Not the challenge metric: a breakdown."""
    from data_prep.index import ShardIndex
    from pipeline.coco_metric import coco_ap

    index = ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url), split)
    position = {k: i for i, k in enumerate(index.key_list())}
    sizes = np.stack([index.heights, index.widths], axis=1)
    gt = inputs.gt
    gt_pos = np.array([position.get(inputs.images.ids[c], -1) for c in gt.box_image], dtype=np.int64)
    keep = gt_pos >= 0
    scale = lambda pos: np.stack([sizes[pos, 1], sizes[pos, 0]] * 2, axis=1)  # noqa: E731 - (w, h, w, h)
    det_pos = np.array([position[k] for k in detections["keys"]], dtype=np.int64)
    return coco_ap(sizes, gt_pos[keep], gt.box_class[keep], gt.boxes[keep] * scale(gt_pos[keep]),
                   gt.box_group[keep], det_pos, detections["classes"], detections["scores"],
                   detections["boxes"] * scale(det_pos))


def _models_fields(cfg: ExperimentConfig, checkpoints: list[str]) -> dict:
    """What a report says of the model(s) it scored."""
    if len(checkpoints) == 1 and not cfg.ensemble.members:
        return {"checkpoint": str(checkpoints[0])}
    members = inference_members(cfg, checkpoints)
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
    from pipeline.oid_metric import COCO_STYLE_THRESHOLDS
    from pipeline.scoring import report
    from pipeline.visualize import plot_pr_curves

    t0 = time.perf_counter()
    checkpoints = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    if cfg.data.format == "coco":
        return _run_coco_evaluation(cfg, checkpoints, split, out_dir, address, progress, tensorboard_dir, iteration,
                                    t0)
    inputs = split_ground_truth(cfg, split)
    detections = run_inference(cfg, checkpoints, split, address, progress=progress)
    result = score_detections(inputs, detections, COCO_STYLE_THRESHOLDS, keep_curves=True)
    not_detected = ~detections["covers"]
    result.ap[:, not_detected] = np.nan  # not a class of the model(s): no AP, not 0
    data = report(result, inputs.labels, hierarchy=inputs.hierarchy, extra={
        "coco_style_by_size": size_breakdown(cfg, split, inputs, detections),
        "split": split, **_models_fields(cfg, checkpoints), "num_images": detections["num_images"],
        "classes_not_detected_by_the_models": int(not_detected.sum()),
        "num_detections": int(len(detections["scores"])), "seconds": round(time.perf_counter() - t0, 2)})
    out = Path(out_dir or _default_out(cfg, checkpoints, split))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", data)
    write_predictions_csv(out / "predictions.csv", detections, inputs.labels.mids)
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
    from data_prep.coco_files import coco_label_space, load_coco
    from pipeline.coco_metric import coco_eval_file

    files = cfg.data.splits.get(split)
    if files is None or not files.boxes:
        raise InputError(f"data.splits.{split}: evaluation needs the split's instances JSON")
    gt = load_coco(resolve(cfg.data.root, files.boxes), cfg.data.s3_endpoint_url)
    labels, _ = coco_label_space(resolve(cfg.data.root, cfg.data.classes), cfg.data.s3_endpoint_url)
    detections = run_inference(cfg, checkpoints, split, address, progress=progress)
    stats = coco_eval_file(gt, detections["keys"], labels.mids, detections["classes"], detections["scores"],
                           detections["boxes"])
    data = {"metric": "COCO AP (pycocotools COCOeval, bbox)", "mAP": stats["AP"], **stats, "split": split,
            **_models_fields(cfg, checkpoints), "num_images": detections["num_images"],
            "num_detections": int(len(detections["scores"])), "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(out_dir or _default_out(cfg, checkpoints, split))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", data)
    write_predictions_csv(out / "predictions.csv", detections, labels.mids)
    data["files"] = {"report": str(out / "report.json"), "predictions": str(out / "predictions.csv")}
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(tensorboard_dir) as writer:
            writer.add_scalar(f"eval/{split}_coco_AP", stats["AP"], iteration or 0)
            writer.add_scalar(f"eval/{split}_coco_AP50", stats["AP50"], iteration or 0)
    return data


def _infer_files(cfg_dict: dict, checkpoint: str, images: str, files: list[tuple[str, str]]
                 ) -> tuple[dict, list[tuple[str, str]]]:
    """One task: the detections (normalized boxes, data class ids) of the ``(ImageID, object name)``
    image files, and ``(ImageID, problem)`` for each image that cannot be read (it gets an empty row)."""
    from PIL import Image

    from pipeline.config import from_dict

    cfg = from_dict(ExperimentConfig, cfg_dict)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    model = load_model_for_inference(cfg, checkpoint, device)
    storage = open_storage(images, cfg.data.s3_endpoint_url)
    expansion = expansion_for(cfg)
    to_data = _to_data_ids(cfg)
    parts, problems = [], []
    for image_id, name in files:
        try:
            with Image.open(io.BytesIO(storage.read_bytes(name))) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, InputError) as exc:  # unreadable: an empty row, named in the report
            problems.append((image_id, f"{storage.uri(name)}: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # the model resizes it
        h, w = image.shape[-2:]
        out = _infer(model, [image], cfg, device, expansion)[0]
        parts.append({"keys": [image_id] * len(out["scores"]), "classes": to_data[out["labels"].cpu().numpy()],
                      "scores": out["scores"].float().cpu().numpy(),
                      "boxes": out["boxes"].float().cpu().numpy() / np.array([w, h, w, h], dtype=np.float32)})
    return merge_detections(parts), problems


def submission_rows(image_ids: list[str], detections: dict, mids: tuple[str, ...], max_det: int
                    ) -> list[tuple[str, str]]:
    """``(ImageId, PredictionString)`` for every image, in the order given; an image without
    detections gets an empty string."""
    from pipeline.submission import prediction_string

    keys = np.asarray(detections["keys"], dtype=object)
    order = np.argsort(keys, kind="stable") if len(keys) else np.zeros(0, np.int64)
    sorted_keys = keys[order]
    rows = []
    for image_id in image_ids:
        lo, hi = np.searchsorted(sorted_keys, image_id, "left"), np.searchsorted(sorted_keys, image_id, "right")
        sel = order[lo:hi]
        rows.append((image_id, prediction_string([mids[int(c)] for c in detections["classes"][sel]],
                                                 detections["scores"][sel], detections["boxes"][sel], max_det)))
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
    tasks = max(1, min(len(files), cfg.train.num_workers))
    chunks = [chunk for chunk in (files[k::tasks] for k in range(tasks)) if chunk]
    max_det = max_detections or cfg.model.test.max_detections
    started = init_ray(address)
    try:
        remote = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0)(_infer_files)
        refs = [remote.remote(to_dict(m.cfg), str(m.checkpoint), images, chunk) for m in members for chunk in chunks]
        desc = "submission" + (f" ({len(members)} models)" if len(members) > 1 else "")
        parts = gather_with_progress(refs, desc, unit="img", progress=progress,
                                     sizes=[len(c) for _ in members for c in chunks])
    finally:
        shutdown_ray(started)
    per_member = [merge_detections([d for d, _ in parts[k * len(chunks) : (k + 1) * len(chunks)]])
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
