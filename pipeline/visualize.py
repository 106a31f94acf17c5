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
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    f = max(1.0, min_side / min(pil.size))
    if f > 1:
        pil = pil.resize((round(pil.size[0] * f), round(pil.size[1] * f)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=max(12, round(min(pil.size) / 32)))
    for g in geometry:
        draw.rectangle((g["P"] * f).tolist(), outline=(255, 255, 255), width=2)
        draw.rectangle((g["P_r"] * f).tolist(), outline=(255, 40, 40), width=2)
        for x, y in (g["P_c_points"] * f).tolist():
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(40, 255, 40))
        label = names[g["label"]] if names else str(g["label"])
        _draw_label(draw, f"{label} {g['score']:.2f}", (g["P"] * f).tolist(), font, pil.size)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def _draw_label(draw, text: str, box: list[float], font, size: tuple[int, int]) -> None:
    """The class and score on a dark plate at the box's top-left corner, above the box where
    there is room and inside it otherwise, shifted to stay in the image: readable on any
    background, where plain coloured text vanished on bright ones."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 6, bottom - top + 4
    x = min(max(0.0, box[0]), max(0.0, size[0] - w))
    y = box[1] - h if box[1] - h >= 0 else min(box[1], max(0.0, size[1] - h))
    draw.rectangle((x, y, x + w, y + h), fill=(20, 20, 20))
    draw.text((x + 3 - left, y + 2 - top), text, fill=(255, 230, 0), font=font)


def _figure(title: str, x_label: str, y_label: str):
    """A matplotlib figure (headless Agg backend) with one axes, its title, labels and a grid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    return fig, ax


def ap_vs_iou_figure(reports: dict[str, dict]):
    """AP against the IoU threshold (paper Fig. 6), one line per report (TSD vs a baseline), labelled
    with its mAP@0.5."""
    fig, ax = _figure("AP vs IoU threshold (OID metric; paper Fig. 6)", "IoU threshold", "AP (mean over classes)")
    for name, report in reports.items():
        points = sorted((float(t), v) for t, v in report["ap_at_iou"].items())
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o",
                label=f"{name} (mAP@0.5 {report['mAP']:.3f})")
    ax.set_xlim(0.48, 0.97)
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    ax.legend(loc="lower left")
    return fig


def level_groups(report: dict) -> dict[str, tuple[float | None, int]]:
    """``label -> (mAP, classes)`` of a report: all classes, leaves, parents, each depth."""
    levels = report.get("by_level") or {}
    groups = {"all classes": (report.get("mAP"), report.get("num_classes_with_positives", 0))}
    for key, label in (("leaf", "leaf classes"), ("parent", "parent classes")):
        if key in levels:
            groups[label] = (levels[key]["mAP"], levels[key]["classes"])
    for depth, group in sorted(levels.get("depth", {}).items(), key=lambda kv: int(kv[0])):
        groups[f"depth {depth}"] = (group["mAP"], group["classes"])
    return groups


def ap_by_level_figure(reports: dict[str, dict]):
    """mAP@0.5 of all classes, of the leaf and parent classes and per depth of the hierarchy (the
    report's ``by_level``), grouped bars with one bar per report, each bar with its value; the
    number of classes of each group under its name."""
    fig, ax = _figure("mAP@0.5 per level of the class hierarchy (OID metric)",
                      "class group (number of classes with positives)", "mAP@0.5")
    per_report = {name: level_groups(r) for name, r in reports.items()}
    labels = list(dict.fromkeys(label for groups in per_report.values() for label in groups))
    width = 0.8 / max(1, len(per_report))
    for k, (name, groups) in enumerate(per_report.items()):
        xs = [i + (k - (len(per_report) - 1) / 2) * width for i in range(len(labels))]
        values = [groups.get(label, (None, 0))[0] for label in labels]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=name)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3f}" for v in values], fontsize="x-small",
                     padding=2)
    first = next(iter(per_report.values()), {})
    ax.set_xticks(range(len(labels)),
                  [f"{label}\n({first.get(label, (None, 0))[1]})" for label in labels], fontsize="small")
    ax.set_ylim(0.0, 1.08)
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    ax.legend(loc="lower right")
    return fig


def plot_ap_by_level(path, reports: dict[str, dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ap_by_level_figure(reports).savefig(path)


def plot_ap_vs_iou(path, reports: dict[str, dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ap_vs_iou_figure(reports).savefig(path)


def pr_curves_figure(curves: dict[int, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                     ap: np.ndarray | None = None, per_side: int = 4):
    """Precision-recall curves of the ``per_side`` best and worst classes by AP (all of them when
    there are few), each labelled with its AP."""
    classes = list(curves)
    if ap is not None:
        classes.sort(key=lambda c: -float(ap[c]))
    few = len(classes) <= 2 * per_side
    if not few:
        classes = classes[:per_side] + classes[-per_side:]
    title = "Precision-recall at IoU 0.5" + ("" if few else f": the {per_side} best and {per_side} worst classes")
    fig, ax = _figure(title, "recall", "precision")
    for rank, c in enumerate(classes):
        recall, precision = curves[c]
        label = names[c] + (f" (AP {float(ap[c]):.3f})" if ap is not None else "")
        ax.plot(recall, precision, label=label, linestyle="-" if few or rank < per_side else "--")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_pr_curves(path, curves: dict[int, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                   ap: np.ndarray | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pr_curves_figure(curves, names, ap).savefig(path)
