"""Training samplers: deterministic global batches, each rank taking its own slice.

Every epoch's sequence of global batches is a pure function of (seed, epoch) and the index, and
does not depend on the number of workers: rank r of W takes images ``[r*b, (r+1)*b)`` of every
global batch of ``W*b`` images. So ranks are disjoint, every rank gets the same number of batches
(no DDP hang at the end of an epoch), a run resumes at any iteration with the same order, and
1 worker x 2 images sees exactly the batches of 2 workers x 1 image.

Three ways to draw the stream of images, all seeded by (seed, epoch):
- ``uniform``: concatenated random permutations of the dataset;
- ``class_aware``: the OID recipe, with the semantics of the TSD authors' and mmdetection's
  ``ClassAwareSampler``: rounds over the classes in a shuffled cyclic order, drawing
  ``num_sample_class`` images of each class from that class's own shuffled cycle;
- ``repeat_factor``: detectron2/LVIS repeat-factor sampling, r(c) = max(1, sqrt(t / f(c))), an
  image repeated max over its classes of r(c) times with stochastic rounding per epoch.
Images are grouped into global batches by aspect ratio (landscape / portrait) when asked, and
each draw carries a horizontal-flip bit from the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class RandomCycle:
    """Cycles through ``items`` in a random order, reshuffled at every pass (mmdetection's RandomCycleIter)."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items)
        self.rng = rng
        self.order = rng.permutation(len(self.items))
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=self.items.dtype)
        for k in range(n):
            if self.pos == len(self.order):
                self.order = self.rng.permutation(len(self.items))
                self.pos = 0
            out[k] = self.items[self.order[self.pos]]
            self.pos += 1
        return out


def class_image_lists(labels: list[np.ndarray], num_classes: int) -> list[np.ndarray]:
    """For every class, the indices of the images that contain it."""
    image = np.repeat(np.arange(len(labels)), [len(x) for x in labels])
    cls = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    order = np.argsort(cls, kind="stable")
    bounds = np.searchsorted(cls[order], np.arange(num_classes + 1))
    return [image[order[bounds[c] : bounds[c + 1]]] for c in range(num_classes)]


def repeat_factors(labels: list[np.ndarray], num_classes: int, threshold: float) -> np.ndarray:
    """Per-image repeat factors (detectron2's RepeatFactorTrainingSampler, LVIS paper eq. 2):
    1. f(c): the fraction of images that contain class c;
    2. r(c) = max(1, sqrt(t / f(c)));
    3. r(I) = max over the classes c in I of r(c) (1 for an image without labels)."""
    counts = np.zeros(num_classes)
    for lab in labels:
        counts[np.unique(lab)] += 1
    freq = counts / max(1, len(labels))
    with np.errstate(divide="ignore"):
        r_class = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, np.inf)))
    return np.array([r_class[lab].max() if len(lab) else 1.0 for lab in labels])


@dataclass
class SamplerSpec:
    mode: str = "uniform"  # uniform | class_aware | repeat_factor
    num_sample_class: int = 1
    repeat_threshold: float = 0.001
    group_by_aspect: bool = True
    flip_prob: float = 0.5


class GlobalBatchSampler:
    """Yields this rank's batches of ``(dataset index, flip)`` for an epoch, from any iteration on."""

    def __init__(self, labels: list[np.ndarray], landscape: np.ndarray, num_classes: int, images_per_rank: int,
                 world_size: int, rank: int, seed: int, iterations_per_epoch: int, spec: SamplerSpec) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.labels = labels
        self.landscape = np.asarray(landscape, dtype=bool)
        self.num_classes = num_classes
        self.b = images_per_rank
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.iterations_per_epoch = iterations_per_epoch
        self.spec = spec
        self.global_batch = images_per_rank * world_size
        if spec.mode == "class_aware":
            self.class_images = class_image_lists(labels, num_classes)
            self.valid_classes = np.array([c for c, imgs in enumerate(self.class_images) if len(imgs)])
            if len(self.valid_classes) == 0:
                raise ValueError("class-aware sampling needs images with labels")
        elif spec.mode == "repeat_factor":
            self.factors = repeat_factors(labels, num_classes, spec.repeat_threshold)
        elif spec.mode != "uniform":
            raise ValueError(f"unknown sampler mode {spec.mode!r}")

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _stream(self, rng: np.random.Generator, chunk: int):
        """An endless stream of dataset indices, produced in chunks."""
        n = len(self.labels)
        if self.spec.mode == "uniform":
            while True:
                yield rng.permutation(n)
        elif self.spec.mode == "class_aware":
            classes = RandomCycle(self.valid_classes, rng)
            per_class = {int(c): RandomCycle(self.class_images[c], rng) for c in self.valid_classes}
            rounds = max(1, math.ceil(chunk / (len(self.valid_classes) * self.spec.num_sample_class)))
            while True:
                out = []
                for _ in range(rounds * len(self.valid_classes)):
                    c = int(classes.take(1)[0])
                    out.append(per_class[c].take(self.spec.num_sample_class))
                yield np.concatenate(out)
        else:
            while True:
                whole = np.floor(self.factors)
                reps = whole + (rng.random(n) < self.factors - whole)
                indices = np.repeat(np.arange(n), reps.astype(np.int64))
                yield indices[rng.permutation(len(indices))]

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``[iterations, global_batch]`` dataset indices and flip bits of every global batch."""
        rng = self._rng(epoch)
        need = self.iterations_per_epoch
        gb = self.global_batch
        batches: list[np.ndarray] = []
        buffers: dict[bool, list[int]] = {True: [], False: []}
        stream = self._stream(rng, need * gb)
        while len(batches) < need:
            for idx in next(stream):
                group = bool(self.landscape[idx]) if self.spec.group_by_aspect else True
                buf = buffers[group]
                buf.append(int(idx))
                if len(buf) == gb:
                    batches.append(np.array(buf))
                    buf.clear()
                    if len(batches) == need:
                        break
        indices = np.stack(batches) if batches else np.zeros((0, gb), np.int64)
        flips = rng.random(indices.shape) < self.spec.flip_prob
        return indices, flips

    def rank_batches(self, epoch: int, start: int = 0):
        """This rank's ``(indices, flips)`` for iterations ``start..`` of ``epoch``."""
        indices, flips = self.epoch_batches(epoch)
        lo, hi = self.rank * self.b, (self.rank + 1) * self.b
        for it in range(start, len(indices)):
            yield list(zip(indices[it, lo:hi].tolist(), flips[it, lo:hi].tolist(), strict=True))
