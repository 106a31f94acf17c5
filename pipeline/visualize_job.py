"""`tsd visualize --images`: the Fig. 5 drawing of TSD's derived proposals for image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.classes import model_classes, resolve_class_selection
from pipeline.config import load_config
from pipeline.inference import load_model_for_inference
from pipeline.visualize import draw_tsd, tsd_geometry


def visualize_images(config: str, overrides: list[str], checkpoint: str, images: str, out: Path,
                     limit: int = 8) -> list[Path]:
    cfg = resolve_class_selection(load_config(config, overrides))
    model = load_model_for_inference(cfg, checkpoint, torch.device("cpu"))
    names = model_classes(cfg).model.names
    source = Path(images)
    files = [source] if source.is_file() else sorted(p for p in source.iterdir()
                                                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    written = []
    for path in files:
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        drawing = draw_tsd(image, tsd_geometry(model, image), names)
        target = out / f"{path.stem}_tsd.png"
        Image.fromarray(drawing.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written
