"""Drawing detections for TensorBoard and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def draw_detections(image: Tensor, gt_boxes: Tensor | None, pred_boxes: Tensor | None,
                    pred_scores: Tensor | None = None, score_thresh: float = 0.3) -> Tensor:
    """uint8 ``[3, H, W]`` with ground truth in green and predictions above ``score_thresh`` in red."""
    out = image.detach().to("cpu", torch.uint8)
    if gt_boxes is not None and len(gt_boxes):
        out = draw_bounding_boxes(out, gt_boxes.detach().cpu().float(), colors="lime", width=2)
    if pred_boxes is not None and len(pred_boxes):
        keep = pred_scores.detach().cpu() >= score_thresh if pred_scores is not None else slice(None)
        boxes = pred_boxes.detach().cpu().float()[keep]
        if len(boxes):
            out = draw_bounding_boxes(out, boxes, colors="red", width=1)
    return out


@torch.no_grad()
def tsd_geometry(model, image: Tensor, top_k: int = 5) -> list[dict]:
    """TSD's derived proposals for the ``top_k`` best-scoring proposals of one image (paper Fig. 5):
    the proposal P, the translated P-hat-r and where each of P-hat-c's k x k bins samples, in the
    pixels of ``image``, as the head's own ``TSDGeometry`` gives them. The model must have a TSD head."""
    from torchvision.ops import nms

    was_training = model.training
    model.eval()
    try:
        x = image.float().div(255) if image.dtype == torch.uint8 else image
        batch, _ = model.transform([x])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        stage = model.roi_heads.stages[-1]
        if stage.tsd is None:
            raise ValueError("the model has no TSD head")
        out = stage.run(features, proposals, with_sibling=False).main
        geometry = out.geometry
        scores, labels = torch.softmax(out.logits.float(), dim=1)[:, 1:].max(dim=1)
        keep = nms(geometry.boxes.float(), scores, 0.5)[:top_k]
        centres = geometry.centres_c()[keep]  # [n, k, k, 2]
        h, w = image.shape[-2:]
        (rh, rw) = batch.image_sizes[0]
        scale = torch.tensor([w / rw, h / rh], device=centres.device)
        result = []
        for i, j in enumerate(keep.tolist()):
            result.append({
                "P": (geometry.boxes[j].float().view(2, 2) * scale).flatten().cpu(),
                "P_r": (geometry.boxes_r[j].float().view(2, 2) * scale).flatten().cpu(),
                "P_c_points": (centres[i].reshape(-1, 2) * scale).cpu(),
                "score": float(scores[j]),
                "label": int(labels[j]),
            })
        return result
    finally:
        model.train(was_training)


def draw_tsd(image: Tensor, geometry: list[dict], names: tuple[str, ...] | None = None,
             min_side: int = 480) -> Tensor:
    """P in white, P-hat-r in red, the P-hat-c sampling points in green (paper Fig. 5); small
    images are enlarged to ``min_side`` so that the 49 points stay visible."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    f = max(1.0, min_side / min(pil.size))
    if f > 1:
        pil = pil.resize((round(pil.size[0] * f), round(pil.size[1] * f)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(pil)
    for g in geometry:
        draw.rectangle((g["P"] * f).tolist(), outline=(255, 255, 255), width=2)
        draw.rectangle((g["P_r"] * f).tolist(), outline=(255, 40, 40), width=2)
        for x, y in (g["P_c_points"] * f).tolist():
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(40, 255, 40))
        label = names[g["label"]] if names else str(g["label"])
        draw.text((g["P"][0].item() * f + 3, g["P"][1].item() * f + 2), f"{label} {g['score']:.2f}",
                  fill=(255, 255, 0))
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aa5500"]


def line_chart(path, series: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str,
               x_range: tuple[float, float] = (0.0, 1.0), x_ticks: tuple[float, ...] = (), markers: bool = False) -> None:
    """A small PNG line chart (y in [0, 1]) drawn with Pillow, so that no plotting library is needed."""
    from PIL import Image, ImageDraw

    size, margin = 480, 45
    image = Image.new("RGB", (size + 200, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, 10, size - 10, size - margin), outline="black")
    draw.text((size // 2 - 30, size - 25), x_label, fill="black")
    draw.text((2, 10), y_label, fill="black")
    w, h = size - 10 - margin, size - margin - 10
    x0, x1 = x_range

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + (x - x0) / (x1 - x0) * w, size - margin - y * h

    for t in x_ticks:
        draw.text((at(t, 0)[0] - 8, size - margin + 4), f"{t:g}", fill="black")
    for k, (name, points) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = [at(x, y) for x, y in points]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        if markers:
            for x, y in pts:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.text((size + 5, 15 + 16 * k), name[:30], fill=color)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def plot_ap_vs_iou(path, reports: dict[str, dict]) -> None:
    """AP against the IoU threshold (paper Fig. 6), one line per report (e.g. TSD vs the baseline)."""
    series = [(f"{name} ({report['mAP']:.3f})", sorted((float(t), v) for t, v in report["ap_at_iou"].items()))
              for name, report in reports.items()]
    line_chart(path, series, "IoU threshold", "AP", (0.5, 0.95), (0.5, 0.6, 0.7, 0.8, 0.9), markers=True)


def plot_pr_curves(path, curves: dict[int, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                   max_classes: int = 12) -> None:
    """Precision-recall curves of up to ``max_classes`` classes."""
    series = [(names[cls], list(zip(recall.tolist(), precision.tolist(), strict=True)))
              for cls, (recall, precision) in list(curves.items())[:max_classes]]
    line_chart(path, series, "recall", "precision", (0.0, 1.0), (0.0, 0.5, 1.0))
