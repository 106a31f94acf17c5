"""A real learning check: the tiny TSD detector overfits a few synthetic images on the CPU."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from data_prep.labels import LabelSpace
from data_prep.oid_files import ImageCoder, read_boxes
from data_prep.rejects import RejectLog
from data_prep.synthetic import generate
from tests.model_utils import tiny_model_config
from tsd_model.build import build_model


def _load(root):
    labels = LabelSpace.from_csv_text((root / "classes-description.csv").read_text())
    coder, log = ImageCoder(), RejectLog()
    table = read_boxes(str(root / "train-annotations-bbox.csv"), labels, coder, log)
    images, targets = [], []
    for code, image_id in enumerate(coder.ids):
        pixels = np.array(Image.open(root / "train" / f"{image_id}.jpg").convert("RGB"))
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        h, w = image.shape[1:]
        rows = table.rows_of(code)
        boxes = torch.from_numpy(table.boxes[rows]) * torch.tensor([w, h, w, h], dtype=torch.float32)
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.from_numpy(table.label[rows].astype(np.int64))})
    return images, targets


def test_tiny_tsd_overfits_a_few_images(tmp_path):
    generate(tmp_path, num_train=4, num_validation=0, seed=2)
    images, targets = _load(tmp_path)
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(160):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    assert sum(last.values()) < 0.15 * sum(first.values())
    for key in ("loss_tsd_cls", "loss_tsd_box", "loss_sibling_cls", "loss_objectness"):
        assert last[key] < 0.3 * first[key], key
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    found = total = 0
    for out, target in zip(outputs, targets, strict=True):
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            total += 1
            same = (out["labels"] == label) & (out["scores"] > 0.3)
            found += bool(same.any() and box_iou(box[None], out["boxes"][same]).max() >= 0.5)
    assert found >= 0.8 * total, f"{found} of {total} boxes detected"
