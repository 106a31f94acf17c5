"""Scoring prediction files offline: ground truth and predictions from the official file formats.

Predictions may be the TF evaluator's CSV (``ImageID,LabelName,Score,XMin,XMax,YMin,YMax``) or a
Kaggle submission (``ImageId,PredictionString`` with ``LabelName Score XMin YMin XMax YMax``
tokens). Both are parsed with pyarrow into integer codes; MIDs outside the label space are
counted and dropped. Reports are plain JSON: ``mAP``, ``per_class`` (MID -> AP), AP at several
IoU thresholds, counts.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_prep.errors import InputError
from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace
from data_prep.oid_files import ImageCoder, read_boxes, read_image_labels
from data_prep.rejects import RejectLog
from data_prep.storage import read_source
from pipeline.oid_metric import (
    COCO_STYLE_THRESHOLDS,
    GroundTruth,
    MetricResult,
    evaluate,
    expand_ground_truth,
)

TF_COLUMNS = ("ImageID", "LabelName", "Score", "XMin", "XMax", "YMin", "YMax")
SUBMISSION_COLUMNS = ("ImageId", "PredictionString")


@dataclass
class ScoringInputs:
    labels: LabelSpace
    images: ImageCoder
    gt: GroundTruth
    hierarchy: Hierarchy | None = None
    rejects: RejectLog | None = None  # ground-truth rows that were dropped, with file, line and reason


def load_ground_truth(boxes_csv: str, labels_csv: str | None, hierarchy_json: str, classes_csv: str,
                      endpoint_url: str | None = None) -> ScoringInputs:
    labels = LabelSpace.from_csv_text(read_source(classes_csv, endpoint_url).decode("utf-8-sig"), classes_csv)
    hierarchy = Hierarchy.from_json_text(read_source(hierarchy_json, endpoint_url).decode("utf-8"), hierarchy_json)
    coder, log = ImageCoder(), RejectLog()
    boxes = read_boxes(boxes_csv, labels, coder, log, endpoint_url, drop_duplicates=False)
    image_labels = read_image_labels(labels_csv, labels, coder, log, endpoint_url) if labels_csv else None
    gt = expand_ground_truth(
        len(coder), hierarchy.ancestor_matrix(labels), boxes.image_code, boxes.label, boxes.boxes,
        boxes.flags["IsGroupOf"] == 1,
        None if image_labels is None else image_labels.image_code,
        None if image_labels is None else image_labels.label,
        None if image_labels is None else image_labels.positive)
    return ScoringInputs(labels, coder, gt, hierarchy, log)


@dataclass
class Predictions:
    image: np.ndarray  # codes into the ground truth's images, -1 for other images
    label: np.ndarray
    score: np.ndarray
    boxes: np.ndarray  # x1, y1, x2, y2
    unknown_mids: int = 0
    non_finite_lines: list[int] | None = None  # 1-based lines of the rows rejected for NaN / inf values


def _codes(values: pa.Array, vocabulary: list[str]) -> np.ndarray:
    return pc.fill_null(pc.index_in(values, value_set=pa.array(vocabulary)), -1).to_numpy(zero_copy_only=False)


def read_predictions(path: str, inputs: ScoringInputs, endpoint_url: str | None = None) -> Predictions:
    """Read a TF-evaluator CSV or a Kaggle submission CSV (detected from the header)."""
    raw = read_source(path, endpoint_url)
    header = [c.strip() for c in next(csv.reader([raw[: raw.find(b"\n")].decode("utf-8-sig")]), [])]
    if b'"' in raw:  # the validator's rule (pipeline.submission): no line break inside a quoted field
        from pipeline.submission import QUOTED_LINE_BREAK, quoted_line_break

        line = quoted_line_break(raw.decode("utf-8-sig", errors="replace"))
        if line is not None:
            raise InputError(f"{path}:{line}: {QUOTED_LINE_BREAK}")
    mids = list(inputs.labels.mids)
    try:
        if set(TF_COLUMNS) <= set(header):
            table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(
                column_types={"ImageID": pa.string(), "LabelName": pa.string(), **{c: pa.float64() for c in TF_COLUMNS[2:]}},
                include_columns=list(TF_COLUMNS)))
            image, label_col = table.column("ImageID"), table.column("LabelName")
            score = table.column("Score").to_numpy()
            boxes = np.stack([table.column(c).to_numpy() for c in ("XMin", "YMin", "XMax", "YMax")], axis=1)
        elif header[:2] == list(SUBMISSION_COLUMNS):
            table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(
                column_types={"ImageId": pa.string(), "PredictionString": pa.string()}, strings_can_be_null=False))
            tokens = pc.split_pattern(pc.utf8_trim_whitespace(table.column("PredictionString")), " ")
            counts = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
            counts = np.where(pc.equal(table.column("PredictionString"), "").to_numpy(zero_copy_only=False), 0, counts)
            flat = pc.list_flatten(tokens).filter(pc.not_equal(pc.list_flatten(tokens), ""))
            if len(flat) % 6:
                raise InputError(f"{path}: the number of prediction tokens is not a multiple of 6 "
                                 f"(run `tsd submission --check` for the line)")
            fields = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=object).reshape(-1, 6)
            image = pa.array(np.repeat(np.asarray(table.column("ImageId").to_pylist(), dtype=object), counts // 6))
            label_col = pa.array(fields[:, 0].tolist(), pa.string())
            numbers = fields[:, 1:].astype(np.float64)
            score, boxes = numbers[:, 0], numbers[:, 1:5]
        else:
            raise InputError(f"{path}: unknown predictions format; header {header} (expected {','.join(TF_COLUMNS)} "
                             f"or {','.join(SUBMISSION_COLUMNS)})")
    except (pa.ArrowInvalid, ValueError) as exc:
        raise InputError(f"{path}: cannot parse predictions ({exc})") from None
    label = _codes(label_col, mids)
    img = _codes(image, inputs.images.ids)
    score, boxes = np.asarray(score, dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    finite = np.isfinite(score) & np.isfinite(boxes).all(axis=1)
    lines = _row_lines(header, counts if header[:2] == list(SUBMISSION_COLUMNS) else None, len(score))
    known = (label >= 0) & finite
    return Predictions(img[known], label[known], score[known], boxes[known],
                       unknown_mids=int(((label < 0) & finite).sum()),
                       non_finite_lines=sorted(set(lines[~finite].tolist())))


def _row_lines(header: list[str], tokens_per_row: np.ndarray | None, n: int) -> np.ndarray:
    """The 1-based file line of every prediction: one per line in the TF CSV, one line per image
    (several predictions) in a submission. Assumes no quoted newline inside a row."""
    if tokens_per_row is None:
        return np.arange(n, dtype=np.int64) + 2
    return np.repeat(np.arange(len(tokens_per_row), dtype=np.int64) + 2, np.asarray(tokens_per_row) // 6)


def ap_by_level(ap: np.ndarray, hierarchy: Hierarchy, labels: LabelSpace) -> dict:
    """Mean AP of the leaf classes, of the parent classes and per depth of the hierarchy (classes
    with positives only), with how many classes each mean is over."""
    is_leaf, depth = hierarchy.class_levels(labels)
    scored = np.isfinite(ap)

    def group(mask: np.ndarray) -> dict:
        values = ap[mask & scored]
        return {"mAP": float(values.mean()) if len(values) else None, "classes": int(len(values))}

    return {"leaf": group(is_leaf), "parent": group(~is_leaf),
            "depth": {str(int(d)): group(depth == d) for d in np.unique(depth)}}


def report(result: MetricResult, labels: LabelSpace, extra: dict | None = None,
           hierarchy: Hierarchy | None = None) -> dict:
    """The JSON report: mAP, per-class AP by MID (classes with positives), AP at every threshold,
    and, given the hierarchy, AP of leaf and parent classes and per depth (``by_level``)."""
    per_class = {labels.mids[c]: round(float(v), 6) for c, v in enumerate(result.ap[0]) if np.isfinite(v)}
    out = {
        "mAP": result.mean_ap(0),
        "iou_threshold": result.thresholds[0],
        "num_classes_with_positives": len(per_class),
        "per_class": per_class,
        "per_class_names": {labels.mids[c]: labels.names[c] for c in range(len(labels)) if labels.mids[c] in per_class},
        "ap_at_iou": {f"{t:.2f}": result.mean_ap(k) for k, t in enumerate(result.thresholds)},
    }
    if hierarchy is not None:
        out["by_level"] = ap_by_level(result.ap[0], hierarchy, labels)
    if len(result.thresholds) > 1:
        coco = [k for k, t in enumerate(result.thresholds) if t in COCO_STYLE_THRESHOLDS]
        if len(coco) == len(COCO_STYLE_THRESHOLDS):
            out["mAP_50_95"] = float(np.mean([result.mean_ap(k) for k in coco]))
    out.update(extra or {})
    return out


def score_files(boxes_csv: str, labels_csv: str | None, hierarchy_json: str, classes_csv: str, predictions: str,
                thresholds: tuple[float, ...] = (0.5,), endpoint_url: str | None = None) -> dict:
    inputs = load_ground_truth(boxes_csv, labels_csv, hierarchy_json, classes_csv, endpoint_url)
    preds = read_predictions(predictions, inputs, endpoint_url)
    matched = int((preds.image >= 0).sum())
    if len(preds.score) and matched == 0:
        raise InputError(f"{predictions}: none of its {len(preds.score)} predictions is on an image of the ground "
                         f"truth {boxes_csv} (the mAP would be 0.0): is it the right split, or the right file?")
    result = evaluate(inputs.gt, preds.image, preds.label, preds.score, preds.boxes, thresholds)
    bad_lines = preds.non_finite_lines or []
    return report(result, inputs.labels, {
        "num_images": inputs.gt.num_images, "num_predictions": int(len(preds.score)),
        "predictions_on_unknown_images": int((preds.image < 0).sum()), "predictions_with_unknown_mids": preds.unknown_mids,
        "predictions_rejected_non_finite": {"rows": len(bad_lines), "lines": bad_lines[:20]},
        "ground_truth_rejects": inputs.rejects.to_json() if inputs.rejects is not None else None,
    }, inputs.hierarchy)


def level_summary(data: dict) -> str:
    """One console line: the AP of leaf and parent classes and per depth, from a report."""
    levels = data.get("by_level")
    if not levels:
        return ""

    def fmt(group: dict) -> str:
        return "n/a" if group["mAP"] is None else f"{group['mAP']:.4f} ({group['classes']} classes)"

    depths = ", ".join(f"depth {d}: {fmt(g)}" for d, g in levels["depth"].items())
    return f"leaf classes {fmt(levels['leaf'])}, parent classes {fmt(levels['parent'])}; {depths}"


def write_report(path: str, data: dict) -> None:
    from pipeline.files import write_json_atomic

    write_json_atomic(path, data)
