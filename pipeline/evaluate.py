"""Distributed inference (Ray tasks), evaluation with the official OID metric, and submissions.

Inference is sharded like detectron2's ``InferenceSampler``: the images are cut into contiguous
ranges, one Ray task each (CPU or GPU), every image scored exactly once; each task builds the
model, loads the checkpoint and runs batched ``torch.inference_mode`` forwards (autocast on CUDA,
TTA when the config asks for it). The driver gathers the detections, scores them against the
split's official CSVs and writes ``report.json``, a TF-evaluator predictions CSV and a PR plot.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import InputError
from data_prep.prep import load_label_space, resolve
from data_prep.storage import is_s3, open_storage
from pipeline.config import ExperimentConfig, to_dict
from pipeline.files import write_json_atomic, write_text_atomic

STATE_FILE = "state.pt"


def resolve_checkpoint(checkpoint: str) -> Path:
    """The state file of a checkpoint given as a state file, a checkpoint directory or a run
    directory (then its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        candidates = sorted(p for p in path.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if candidates:
            path = candidates[-1]
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise InputError(f"{checkpoint}: no checkpoint found (give a run directory, a checkpoint directory "
                         f"or its {STATE_FILE})")
    return path


def load_state(checkpoint: str) -> dict:
    path = resolve_checkpoint(checkpoint)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a checkpoint of `tsd train` ({type(exc).__name__})") from None


def load_model_for_inference(cfg: ExperimentConfig, checkpoint: str, device: torch.device):
    """The config's model with the weights of a ``tsd train`` checkpoint."""
    from tsd_model.build import build_model

    model = build_model(cfg.model, load_weights=False)  # every weight comes from the checkpoint
    state = load_state(checkpoint)
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
    labels, hierarchy = load_label_space(cfg.data)
    expansion = AncestorExpansion.from_matrix(hierarchy.ancestor_matrix(labels), test.expand_dedup, test.nms_iou)
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
                      cfg.data.s3_endpoint_url)
    if ds.skipped:
        raise InputError(f"{cfg.data.shards}: split '{split}' has missing or truncated shards {ds.skipped}; "
                         f"evaluating without them would change the metric -- re-run `tsd prep`")
    stop = min(stop, len(ds))
    expansion = expansion_for(cfg)
    parts = []
    for lo in range(start, stop, batch_size):
        items = [ds[(i, False)] for i in range(lo, min(stop, lo + batch_size))]
        outs = _infer(model, [it["image"] for it in items], cfg, device, expansion)
        for it, out in zip(items, outs, strict=True):
            h, w = it["image"].shape[-2:]
            parts.append({"keys": [ds.index.keys[it["index"]]] * len(out["scores"]),
                          "classes": out["labels"].cpu().numpy(), "scores": out["scores"].float().cpu().numpy(),
                          "boxes": out["boxes"].float().cpu().numpy() / np.array([w, h, w, h], dtype=np.float32)})
    return merge_detections(parts)


def merge_detections(parts: list[dict]) -> dict:
    """One detections dict (keys, classes, scores, normalized boxes) from several, in order."""
    return {
        "keys": [k for p in parts for k in p["keys"]],
        "classes": np.concatenate([p["classes"] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64),
        "scores": np.concatenate([p["scores"] for p in parts]) if parts else np.zeros(0),
        "boxes": np.concatenate([p["boxes"] for p in parts]).reshape(-1, 4) if parts else np.zeros((0, 4)),
    }


def run_inference(cfg: ExperimentConfig, checkpoint: str, split: str, address: str | None = None,
                  num_tasks: int | None = None, progress: bool = True) -> dict:
    """Detections on every image of a prepared split, gathered from Ray tasks."""
    import ray

    from data_prep.ray_runtime import gather_with_progress, init_ray, shutdown_ray
    from pipeline.loader import ShardIndex

    index = ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url), split)
    n = len(index)
    tasks = num_tasks or max(1, cfg.train.num_workers)
    bounds = np.linspace(0, n, tasks + 1).astype(int)
    cfg_dict = to_dict(cfg)
    started = init_ray(address)
    try:
        remote = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0)(
            _infer_shard_range)
        ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        refs = [remote.remote(cfg_dict, split, str(checkpoint), a, b, cfg.train.images_per_worker) for a, b in ranges]
        parts = gather_with_progress(refs, f"inference {split}", unit="img", progress=progress,
                                     sizes=[b - a for a, b in ranges])
    finally:
        shutdown_ray(started)
    return {**merge_detections(parts), "num_images": n}


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
    from pipeline.coco_metric import coco_ap
    from pipeline.loader import ShardIndex

    index = ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url), split)
    position = {k: i for i, k in enumerate(index.keys)}
    sizes = np.stack([index.heights, index.widths], axis=1)
    gt = inputs.gt
    gt_pos = np.array([position.get(inputs.images.ids[c], -1) for c in gt.box_image], dtype=np.int64)
    keep = gt_pos >= 0
    scale = lambda pos: np.stack([sizes[pos, 1], sizes[pos, 0]] * 2, axis=1)  # noqa: E731 - (w, h, w, h)
    det_pos = np.array([position[k] for k in detections["keys"]], dtype=np.int64)
    return coco_ap(sizes, gt_pos[keep], gt.box_class[keep], gt.boxes[keep] * scale(gt_pos[keep]),
                   gt.box_group[keep], det_pos, detections["classes"], detections["scores"],
                   detections["boxes"] * scale(det_pos))


def run_evaluation(cfg: ExperimentConfig, checkpoint: str, split: str = "validation", out_dir: str | None = None,
                   address: str | None = None, progress: bool = True, tensorboard_dir: str | None = None,
                   iteration: int | None = None) -> dict:
    """Inference on a prepared split, the official metric on its CSVs, report/predictions/plot files."""
    from pipeline.oid_metric import COCO_STYLE_THRESHOLDS
    from pipeline.scoring import report
    from pipeline.visualize import plot_pr_curves

    t0 = time.perf_counter()
    if cfg.data.format == "coco":
        return _run_coco_evaluation(cfg, checkpoint, split, out_dir, address, progress, tensorboard_dir, iteration, t0)
    inputs = split_ground_truth(cfg, split)
    detections = run_inference(cfg, checkpoint, split, address, progress=progress)
    result = score_detections(inputs, detections, COCO_STYLE_THRESHOLDS, keep_curves=True)
    data = report(result, inputs.labels, hierarchy=inputs.hierarchy, extra={
        "coco_style_by_size": size_breakdown(cfg, split, inputs, detections),
        "split": split, "checkpoint": str(checkpoint), "num_images": detections["num_images"],
        "num_detections": int(len(detections["scores"])), "seconds": round(time.perf_counter() - t0, 2)})
    out = Path(out_dir or resolve_checkpoint(checkpoint).parent / f"eval-{split}")
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


def _run_coco_evaluation(cfg: ExperimentConfig, checkpoint: str, split: str, out_dir: str | None, address: str | None,
                         progress: bool, tensorboard_dir: str | None, iteration: int | None, t0: float) -> dict:
    """COCO datasets: COCO AP (pycocotools' COCOeval) against the split's instances JSON."""
    from data_prep.coco_files import coco_label_space, load_coco
    from pipeline.coco_metric import coco_eval_file

    files = cfg.data.splits.get(split)
    if files is None or not files.boxes:
        raise InputError(f"data.splits.{split}: evaluation needs the split's instances JSON")
    gt = load_coco(resolve(cfg.data.root, files.boxes), cfg.data.s3_endpoint_url)
    labels, _ = coco_label_space(resolve(cfg.data.root, cfg.data.classes), cfg.data.s3_endpoint_url)
    detections = run_inference(cfg, checkpoint, split, address, progress=progress)
    stats = coco_eval_file(gt, detections["keys"], labels.mids, detections["classes"], detections["scores"],
                           detections["boxes"])
    data = {"metric": "COCO AP (pycocotools COCOeval, bbox)", "mAP": stats["AP"], **stats, "split": split,
            "checkpoint": str(checkpoint), "num_images": detections["num_images"],
            "num_detections": int(len(detections["scores"])), "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(out_dir or resolve_checkpoint(checkpoint).parent / f"eval-{split}")
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


def _infer_files(cfg_dict: dict, mids: list[str], checkpoint: str, images: str, files: list[tuple[str, str]],
                 max_det: int) -> list[tuple[str, str, str | None]]:
    """One task: ``(ImageID, PredictionString, problem)`` for the ``(ImageID, object name)`` image files;
    an image that cannot be read gets an empty PredictionString and its problem."""
    from PIL import Image

    from pipeline.config import from_dict
    from pipeline.submission import prediction_string

    cfg = from_dict(ExperimentConfig, cfg_dict)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    model = load_model_for_inference(cfg, checkpoint, device)
    storage = open_storage(images, cfg.data.s3_endpoint_url)
    expansion = expansion_for(cfg)
    rows = []
    for image_id, name in files:
        try:
            with Image.open(io.BytesIO(storage.read_bytes(name))) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, InputError) as exc:  # unreadable: an empty row, named in the report
            rows.append((image_id, "", f"{storage.uri(name)}: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # the model resizes it
        h, w = image.shape[-2:]
        out = _infer(model, [image], cfg, device, expansion)[0]
        boxes = out["boxes"].float().cpu().numpy() / np.array([w, h, w, h], dtype=np.float32)
        rows.append((image_id, prediction_string([mids[int(c)] for c in out["labels"].cpu()],
                                       out["scores"].float().cpu().numpy(), boxes, max_det), None))
    return rows


def run_submission(cfg: ExperimentConfig, checkpoint: str, images: str, out: str, address: str | None = None,
                   max_detections: int | None = None, progress: bool = True) -> dict:
    """Detect on every image of a directory or S3 prefix and write a validated Kaggle submission."""
    import ray

    from data_prep.prep import list_images
    from data_prep.ray_runtime import gather_with_progress, init_ray, shutdown_ray
    from data_prep.rejects import RejectLog
    from pipeline.submission import check_submission, write_submission

    labels, _ = load_label_space(cfg.data)
    images = images if is_s3(images) else str(Path(images).resolve())
    duplicates = RejectLog()
    found = list_images(open_storage(images, cfg.data.s3_endpoint_url), duplicates)  # ImageID -> (name, size)
    if not found:
        raise InputError(f"{images}: no images (.jpg, .jpeg, .png) found")
    files = sorted((image_id, name) for image_id, (name, _) in found.items())
    tasks = max(1, min(len(files), cfg.train.num_workers))
    chunks = [files[k::tasks] for k in range(tasks)]
    cfg_dict = to_dict(cfg)
    max_det = max_detections or cfg.model.test.max_detections
    started = init_ray(address)
    try:
        remote = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0)(_infer_files)
        chunks = [chunk for chunk in chunks if chunk]
        refs = [remote.remote(cfg_dict, list(labels.mids), str(checkpoint), images, chunk, max_det) for chunk in chunks]
        rows = [row for part in gather_with_progress(refs, "submission", unit="img", progress=progress,
                                                     sizes=[len(c) for c in chunks]) for row in part]
    finally:
        shutdown_ray(started)
    write_submission(out, sorted((image_id, text) for image_id, text, _ in rows))
    counts = check_submission(out, set(labels.mids), set(found))
    unreadable = sorted((image_id, problem) for image_id, _, problem in rows if problem)
    report = {**counts, "duplicate_image_files": len(duplicates), "unreadable_images": len(unreadable),
              "unreadable": [{"image_id": i, "problem": p} for i, p in unreadable]}
    write_json_atomic(Path(out).with_name(Path(out).stem + "-report.json"), report)
    return report


def checkpoint_iteration(checkpoint: str) -> int | None:
    return load_state(checkpoint).get("iteration")

