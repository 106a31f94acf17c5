"""The one inference loop, and the evaluator contract it feeds.

Evaluation (`tsd evaluate`), submissions (`tsd submission`), evaluation during training and the
benchmarks all detect through ``inference_on_batches``: batches of ``(key, image)`` go through the
model (``torch.inference_mode``, autocast on CUDA, TTA when the config asks for it, detections
expanded to ancestor classes when it asks for that), each batch becomes a typed ``Detections``
record in the data's label space, and an evaluator consumes it with detectron2's contract:

- ``reset()`` before the first batch,
- ``process(detections)`` for each batch (or each task's or rank's part, on the driver),
- ``evaluate()`` at the end: the evaluator's result.

``DetectionsCollector`` (here) keeps the records for a Ray task to return; ``OIDEvaluator`` and
``COCOEvaluator`` (``pipeline.evaluators``) score them. ``inference_plan`` sizes the Ray tasks of a
run from the ``inference`` config section and the cluster's resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.errors import InputError
from pipeline.checkpoint import load_state
from pipeline.config import ExperimentConfig
from pipeline.detections import Detections


def load_model_for_inference(cfg: ExperimentConfig, checkpoint: str, device: torch.device):
    """The config's model with the weights of a ``tsd train`` checkpoint."""
    from tsd_model.build import build_model

    model = build_model(cfg.model, load_weights=False)  # every weight comes from the checkpoint
    state = load_state(checkpoint, cfg.data.s3_endpoint_url)
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
    from pipeline.classes import model_classes

    matrix = model_classes(cfg).model_ancestor_matrix()  # an expert expands within its own classes
    expansion = AncestorExpansion.from_matrix(matrix, test.expand_dedup, test.nms_iou)
    return expansion if expansion.has_parents else None


def to_data_ids(cfg: ExperimentConfig) -> np.ndarray:
    """Model id -> data id (identity unless the model is a class-subset expert)."""
    if cfg.data.format == "coco" or not cfg.model.classes:
        return np.arange(cfg.model.num_classes, dtype=np.int64)
    from pipeline.classes import model_classes

    return model_classes(cfg).to_data


def infer_images(model, images: list[torch.Tensor], cfg: ExperimentConfig, device: torch.device,
                 expansion=None) -> list[dict]:
    """Detections of ``images`` in their pixels and the model's class ids; with ``expansion``, at
    every level of the hierarchy."""
    test = cfg.model.test
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        images = [i.to(device) for i in images]
        if test.tta_scales or test.tta_flip:
            outs = model.detect_tta(images, list(test.tta_scales), test.tta_flip, test)
        else:
            outs = model(images)
        return [expansion(out) for out in outs] if expansion is not None else outs


class DatasetEvaluator:
    """What consumes detections: ``reset()``, ``process(detections)`` per part, ``evaluate()``."""

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, detections: Detections) -> None:
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError


class DetectionsCollector(DatasetEvaluator):
    """Keeps every part; ``evaluate()`` is their concatenation (what a Ray task or a rank returns)."""

    def __init__(self) -> None:
        self._parts: list[Detections] = []

    def reset(self) -> None:
        self._parts = []

    def process(self, detections: Detections) -> None:
        self._parts.append(detections)

    def evaluate(self) -> Detections:
        return Detections.concat(self._parts)


def inference_on_batches(model, cfg: ExperimentConfig, batches: Iterable[list[tuple[str, torch.Tensor]]],
                         device: torch.device, evaluator: DatasetEvaluator) -> Any:
    """Detect every ``(key, image)`` of ``batches`` and feed each batch's record to ``evaluator``;
    returns ``evaluator.evaluate()``."""
    expansion = expansion_for(cfg)
    to_data = to_data_ids(cfg)
    evaluator.reset()
    for batch in batches:
        if not batch:
            continue
        outs = infer_images(model, [image for _, image in batch], cfg, device, expansion)
        evaluator.process(Detections.concat([
            Detections.of_image(key, out, image.shape[-1], image.shape[-2], to_data)
            for (key, image), out in zip(batch, outs, strict=True)]))
    return evaluator.evaluate()


def shard_batches(ds, start: int, stop: int, batch_size: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Batches of ``(key, image)`` of a prepared split's images ``[start, stop)``, in order; S3 shards
    read the next images while a batch is detected (``ShardDataset.plan_batches``)."""
    stop = min(stop, len(ds))
    batches = [[(i, False) for i in range(lo, min(stop, lo + batch_size))] for lo in range(start, stop, batch_size)]
    ds.plan_batches(batches)
    for batch in batches:
        yield [(ds.index.key(it["index"]), it["image"]) for it in ds.__getitems__(batch)]


def detect_range(model, cfg: ExperimentConfig, split: str, start: int, stop: int, batch_size: int,
                 device: torch.device) -> Detections:
    """Detections of the prepared split's images ``[start, stop)``."""
    from pipeline.loader import ShardDataset

    ds = ShardDataset(cfg.data.shards, split, cfg.model.input.min_size, cfg.model.input.max_size,
                      cfg.data.s3_endpoint_url, read_ahead=cfg.loader.read_ahead)
    if ds.skipped:
        raise InputError(f"{cfg.data.shards}: split '{split}' has missing or truncated shards {ds.skipped}; "
                         f"evaluating without them would change the metric -- re-run `tsd prep`")
    return inference_on_batches(model, cfg, shard_batches(ds, start, stop, batch_size), device, DetectionsCollector())


@dataclass(frozen=True)
class InferencePlan:
    """How many Ray tasks a run uses and what each asks for."""

    tasks: int
    num_gpus: float
    num_cpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def inference_plan(cfg: ExperimentConfig, items: int) -> InferencePlan:
    """Ray tasks for ``items`` images from the ``inference`` section and the cluster's resources
    (call with Ray initialised): one task per GPU, or per ``cpus_per_task`` CPUs, never more tasks
    than images."""
    import ray

    inf = cfg.inference
    if inf.cpus_per_task <= 0 or inf.images_per_batch < 1 or (inf.num_tasks is not None and inf.num_tasks < 1):
        raise InputError("inference: cpus_per_task must be > 0, images_per_batch and num_tasks >= 1")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if inf.use_gpu is None else inf.use_gpu
    if use_gpu and gpus == 0:
        raise InputError("inference.use_gpu is true but the Ray cluster has no GPU")
    default = gpus if use_gpu else int(resources.get("CPU", 1) // inf.cpus_per_task)
    tasks = max(1, min(items, inf.num_tasks or max(1, default)))
    return InferencePlan(tasks, 1.0 if use_gpu else 0.0, inf.cpus_per_task)
