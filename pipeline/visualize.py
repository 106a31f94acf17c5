"""Drawing detections and TSD's proposals on images, for TensorBoard and PNG files (figures of
reports are in ``plots``)."""

from __future__ import annotations

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
