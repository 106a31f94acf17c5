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

from data_prep.index import LabelSets


def _label_sets(labels) -> LabelSets:
    return labels if isinstance(labels, LabelSets) else LabelSets.from_lists(list(labels))


def class_image_lists(labels, num_classes: int) -> list[np.ndarray]:
    """For every class, the indices of the images that contain it."""
    flat, bounds = _class_images_flat(_label_sets(labels), num_classes)
    return [flat[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def _class_images_flat(labels: LabelSets, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class's images as one array sorted by class (int32), and each class's bounds in it."""
    image = labels.sample_of_each().astype(np.int32)
    cls = labels.values if labels.values.dtype.itemsize <= 2 else labels.values.astype(np.int64)
    order = np.argsort(cls, kind="stable")  # a radix sort for the index's int16 class ids
    return image[order], np.searchsorted(cls[order], np.arange(num_classes + 1))


def repeat_factors(labels, num_classes: int, threshold: float) -> np.ndarray:
    """Per-image repeat factors (detectron2's RepeatFactorTrainingSampler, LVIS paper eq. 2):
    1. f(c): the fraction of images that contain class c;
    2. r(c) = max(1, sqrt(t / f(c)));
    3. r(I) = max over the classes c in I of r(c) (1 for an image without labels)."""
    labels = _label_sets(labels)
    n = len(labels)
    pairs = labels.sample_of_each() * num_classes + labels.values.astype(np.int64)
    # an image counts once per class: the pairs are grouped by image already, so a stable sort (runs
    # of a few values) and a comparison with the neighbour remove repeats cheaply
    pairs.sort(kind="stable")
    first = np.concatenate([[True], pairs[1:] != pairs[:-1]]) if len(pairs) else np.zeros(0, bool)
    freq = np.bincount(pairs[first] % num_classes, minlength=num_classes) / max(1, n)
    with np.errstate(divide="ignore"):
        r_class = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, np.inf)))
    out = np.ones(n)
    counts = labels.counts()
    has = counts > 0
    if has.any():
        out[has] = np.maximum.reduceat(r_class[labels.values], labels.offsets[:-1][has])
    return out


def _cycle_draws(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The first ``n`` draws of a cycle through ``images`` reshuffled at every pass (mmdetection's
    RandomCycleIter): whole random permutations, then the start of one more, without a Python loop."""
    size = len(images)
    passes, rest = divmod(n, size)
    parts = [images[rng.permuted(np.tile(np.arange(size), (passes, 1)), axis=1).ravel()]] if passes else []
    if rest:
        parts.append(images[rng.choice(size, rest, replace=False)])  # the start of a random permutation
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass
class SamplerSpec:
    mode: str = "uniform"  # uniform | class_aware | repeat_factor
    num_sample_class: int = 1
    repeat_threshold: float = 0.001
    group_by_aspect: bool = True
    flip_prob: float = 0.5


class GlobalBatchSampler:
    """Yields this rank's batches of ``(dataset index, flip)`` for an epoch, from any iteration on."""

    def __init__(self, labels: LabelSets | list[np.ndarray], landscape: np.ndarray, num_classes: int,
                 images_per_rank: int, world_size: int, rank: int, seed: int, iterations_per_epoch: int,
                 spec: SamplerSpec) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        labels = _label_sets(labels)
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
            self.class_flat, self.class_bounds = _class_images_flat(labels, num_classes)
            self.valid_classes = np.flatnonzero(np.diff(self.class_bounds) > 0)
            if len(self.valid_classes) == 0:
                raise ValueError("class-aware sampling needs images with labels")
        elif spec.mode == "repeat_factor":
            self.factors = repeat_factors(labels, num_classes, spec.repeat_threshold)
        elif spec.mode != "uniform":
            raise ValueError(f"unknown sampler mode {spec.mode!r}")

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _draws(self, rng: np.random.Generator, at_least: int) -> np.ndarray:
        """At least ``at_least`` dataset indices of the epoch's stream, drawn in a few numpy calls."""
        n = len(self.labels)
        if self.spec.mode == "uniform":
            return np.concatenate([rng.permutation(n) for _ in range(max(1, -(-at_least // n)))])
        if self.spec.mode == "class_aware":
            # rounds of visits to every class in a shuffled order (a cycle over the classes), each visit
            # taking the next num_sample_class images of the class's own cycle; a class is visited once
            # per round, so its p-th visit takes draws [p*k, (p+1)*k) of its cycle
            k, valid = self.spec.num_sample_class, self.valid_classes
            rounds = max(1, math.ceil(at_least / (len(valid) * k)))
            order = rng.permuted(np.tile(np.arange(len(valid)), (rounds, 1)), axis=1)  # [rounds, V] class positions
            draws = np.stack([_cycle_draws(self.class_flat[self.class_bounds[c] : self.class_bounds[c + 1]],
                                           rounds * k, rng).reshape(rounds, k) for c in valid])  # [V, rounds, k]
            return draws[order, np.arange(rounds)[:, None]].reshape(-1).astype(np.int64)
        parts, total = [], 0
        while total < at_least:
            whole = np.floor(self.factors)
            reps = whole + (rng.random(n) < self.factors - whole)
            indices = np.repeat(np.arange(n), reps.astype(np.int64))
            parts.append(indices[rng.permutation(len(indices))])
            total += len(indices)
        return np.concatenate(parts)

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``[iterations, global_batch]`` dataset indices and flip bits of every global batch.

        Draws are grouped by aspect ratio when asked: each group fills its own batches in stream
        order, and batches come out in the order they complete (what a loop with one buffer per
        group produces). (need + 2) x global_batch draws always complete ``need`` batches: each of
        the two groups leaves fewer than one batch unfilled."""
        rng = self._rng(epoch)
        need, gb = self.iterations_per_epoch, self.global_batch
        stream = self._draws(rng, (need + 2) * gb)
        groups = self.landscape[stream] if self.spec.group_by_aspect else np.ones(len(stream), bool)
        batches, completed = [], []
        for value in (True, False):
            pos = np.flatnonzero(groups == value)
            full = len(pos) // gb
            batches.append(stream[pos[: full * gb]].reshape(full, gb))
            completed.append(pos[gb - 1 :: gb][:full])
        order = np.argsort(np.concatenate(completed), kind="stable")[:need]
        indices = np.concatenate(batches)[order].astype(np.int64) if need else np.zeros((0, gb), np.int64)
        flips = rng.random(indices.shape) < self.spec.flip_prob
        return indices, flips

    def rank_batches(self, epoch: int, start: int = 0):
        """This rank's ``(indices, flips)`` for iterations ``start..`` of ``epoch``."""
        indices, flips = self.epoch_batches(epoch)
        lo, hi = self.rank * self.b, (self.rank + 1) * self.b
        for it in range(start, len(indices)):
            yield list(zip(indices[it, lo:hi].tolist(), flips[it, lo:hi].tolist(), strict=True))
