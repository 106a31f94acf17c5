"""Evaluators of detections (``pipeline.inference.DatasetEvaluator``): the official OID metric on a
split's CSVs, and COCO AP on a split's instances JSON.

Both collect the ``Detections`` parts of an inference run through ``process`` (per batch, per Ray
task, per training rank: the contract does not care), as ``DetectionsCollector`` does, and score
the whole in ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.errors import InputError
from data_prep.prep import resolve
from data_prep.storage import open_storage
from pipeline.config import ExperimentConfig
from pipeline.detections import Detections
from pipeline.inference import DetectionsCollector


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


def score_detections(inputs, detections: Detections, thresholds=(0.5,), keep_curves: bool = False):
    """The official OID metric (``pipeline.oid_metric``) of detections against loaded ground truth."""
    from pipeline.oid_metric import evaluate

    image_codes = np.array([inputs.images.get(k) for k in detections.keys], dtype=np.int64)
    return evaluate(inputs.gt, image_codes, detections.classes, detections.scores, detections.boxes,
                    thresholds=thresholds, keep_curves=keep_curves)


def size_breakdown(cfg: ExperimentConfig, split: str, inputs, detections: Detections) -> dict[str, float]:
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
    det_pos = np.array([position[k] for k in detections.keys], dtype=np.int64)
    return coco_ap(sizes, gt_pos[keep], gt.box_class[keep], gt.boxes[keep] * scale(gt_pos[keep]),
                   gt.box_group[keep], det_pos, detections.classes, detections.scores,
                   detections.boxes * scale(det_pos))


@dataclass
class OIDEvaluation:
    """What ``OIDEvaluator.evaluate`` returns: the metric's result, its ground truth, the detections."""

    result: object  # pipeline.oid_metric's result (ap [thresholds, classes], curves)
    inputs: object  # pipeline.scoring's loaded ground truth
    detections: Detections

    def mean_ap(self, threshold: int = 0) -> float:
        return self.result.mean_ap(threshold)


class OIDEvaluator(DetectionsCollector):
    """The challenge metric of a configured split; its ground truth is read once, at construction."""

    def __init__(self, cfg: ExperimentConfig, split: str, thresholds=(0.5,), keep_curves: bool = False) -> None:
        super().__init__()
        self.inputs = split_ground_truth(cfg, split)
        self.thresholds, self.keep_curves = tuple(thresholds), keep_curves

    def evaluate(self) -> OIDEvaluation:
        detections = super().evaluate()
        result = score_detections(self.inputs, detections, self.thresholds, self.keep_curves)
        return OIDEvaluation(result, self.inputs, detections)


class COCOEvaluator(DetectionsCollector):
    """COCO AP (pycocotools' COCOeval, bbox) against a split's instances JSON."""

    def __init__(self, cfg: ExperimentConfig, split: str) -> None:
        from data_prep.coco_files import coco_label_space, load_coco

        super().__init__()
        files = cfg.data.splits.get(split)
        if files is None or not files.boxes:
            raise InputError(f"data.splits.{split}: evaluation needs the split's instances JSON")
        self.gt = load_coco(resolve(cfg.data.root, files.boxes), cfg.data.s3_endpoint_url)
        self.labels, _ = coco_label_space(resolve(cfg.data.root, cfg.data.classes), cfg.data.s3_endpoint_url)

    def evaluate(self) -> dict:
        from pipeline.coco_metric import coco_eval_file

        d = super().evaluate()
        return coco_eval_file(self.gt, d.keys, self.labels.mids, d.classes, d.scores, d.boxes)
