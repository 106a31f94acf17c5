"""The detections record every inference path produces and every consumer reads.

Evaluation, evaluation during training, submissions, ensembles and the benchmarks pass one type:
flat columns over a split (one row per detection), boxes normalized to [0, 1] as ``x1, y1, x2, y2``
so that they do not depend on the resize the model applied, classes in the data's label space
(a class-subset expert's ids are mapped back before a record is made).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    keys: list[str]  # [N] the image (webdataset key / ImageID) of each detection
    classes: np.ndarray  # [N] int64, data label ids
    scores: np.ndarray  # [N] float
    boxes: np.ndarray  # [N, 4] float, normalized x1, y1, x2, y2

    def __post_init__(self) -> None:
        n = len(self.keys)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores).reshape(-1)
        self.boxes = np.asarray(self.boxes).reshape(-1, 4)
        if not (len(self.classes) == len(self.scores) == len(self.boxes) == n):
            raise ValueError(f"detections columns differ in length: keys {n}, classes {len(self.classes)}, "
                             f"scores {len(self.scores)}, boxes {len(self.boxes)}")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> Detections:
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """One record from several, in order."""
        if not parts:
            return cls.empty()
        return cls([k for p in parts for k in p.keys], np.concatenate([p.classes for p in parts]),
                   np.concatenate([p.scores for p in parts]), np.concatenate([p.boxes for p in parts]))

    @classmethod
    def of_image(cls, key: str, output: dict, width: int, height: int, to_data: np.ndarray) -> Detections:
        """One image's model output (pixel boxes, model class ids) as a record."""
        scores = output["scores"].float().cpu().numpy()
        boxes = output["boxes"].float().cpu().numpy() / np.array([width, height, width, height], dtype=np.float32)
        return cls([key] * len(scores), to_data[output["labels"].cpu().numpy()], scores, boxes)

    def select(self, rows: np.ndarray) -> Detections:
        """The rows given by an index array or a boolean mask, in that order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        return Detections([self.keys[i] for i in rows], self.classes[rows], self.scores[rows], self.boxes[rows])

    def num_images(self) -> int:
        return len(set(self.keys))
