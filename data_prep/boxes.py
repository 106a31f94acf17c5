"""Box conventions at the edges of the system; inside it boxes are ``(x1, y1, x2, y2)``.

- OID CSVs: normalized ``XMin, XMax, YMin, YMax`` (x, x, y, y) -- parsed in ``oid_files``.
- Shards and the model: ``(x1, y1, x2, y2)``, normalized in ``boxes_norm`` and in pixels of the
  stored image in ``boxes`` (no +1 pixel convention, as in the official metric).
- Challenge submission: normalized ``XMin YMin XMax YMax`` -- written by the submission module.
"""

from __future__ import annotations

import numpy as np


def normalized_to_pixels(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[N, 4]`` normalized x1, y1, x2, y2 -> pixels of a ``width`` x ``height`` image (float32)."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale


def pixels_to_normalized(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale


def xyxy_to_oid_columns(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Normalized x1, y1, x2, y2 -> the CSV columns ``XMin, XMax, YMin, YMax``."""
    b = np.asarray(boxes).reshape(-1, 4)
    return {"XMin": b[:, 0], "XMax": b[:, 2], "YMin": b[:, 1], "YMax": b[:, 3]}
