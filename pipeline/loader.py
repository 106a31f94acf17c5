"""The training loader: random access into the tar shards through the prep index.

Stages, each a small function: read the sample's bytes (one range read covering its ``.jpg`` and
``.json`` members, from local disk or S3) -> decode (``torchvision.io.decode_jpeg``) -> shrink an
image larger than the model input (antialiased, on the uint8 tensor) -> collate. Images stay uint8
until they reach the training device, where they are flipped and brought to the input size by the
model's transform; a batch crosses the DataLoader's process boundary as a handful of tensors (one
padded uint8 image tensor, one concatenated box tensor with per-image counts).
Which sample and whether it is flipped come from the sampler (``pipeline.sampler``), so the data
order is reproducible and resumable. ``streaming_dataset`` is the other mode: webdataset over the
shards, resampled, for uniform sampling without the index.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from data_prep.errors import InputError
from data_prep.index import LabelSets, ShardIndex
from data_prep.storage import is_s3, open_storage


def resize_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """The size that makes the shorter side ``min_size`` with the longer side at most ``max_size``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale)), scale


def shrink_to_input(image: Tensor, boxes: Tensor, min_size: int, max_size: int) -> tuple[Tensor, Tensor]:
    """Downscale an image larger than the model's input size (antialiased), with its pixel boxes.

    A smaller image is left as it is: the model's transform brings every image to the input size
    on the training device anyway (bilinear, as torchvision's), which for an enlargement computes
    what an antialiased resize would, so the loader's cores and batches carry the smaller image.
    """
    h, w = image.shape[-2:]
    nh, nw, scale = resize_shape(h, w, min_size, max_size)
    if scale >= 1.0:
        return image, boxes
    return TF.resize(image, [nh, nw], antialias=True), boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """The boxes of the horizontally flipped image (the pixels flip on the device, see ``unpack``)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class ShardDataset(Dataset):
    """Map-style dataset over the shards; an item is ``(index, flip)`` from the sampler.

    On opening, every shard's size is checked against the index: the samples of a truncated or
    missing shard are left out (``skipped``: shard -> samples lost, reported by the callers),
    so that one damaged file does not stop a run; a sample that is damaged inside its bytes is
    an error naming the shard and the key.
    """

    def __init__(self, shards_uri: str, split: str, min_size: int, max_size: int,
                 endpoint_url: str | None = None, use_expanded_labels: bool = False,
                 label_map: np.ndarray | None = None, read_ahead: int = 0) -> None:
        self.storage = open_storage(shards_uri, endpoint_url)
        # S3 answers in tens of ms: keep this many range requests in flight per loader process, for
        # the samples of this process's next batches (``plan_batches``); local disk reads inline
        self.read_ahead = read_ahead if is_s3(shards_uri) else 0
        self._plan: list[list[tuple[int, bool]]] | None = None
        self._reader: _ReadAhead | None = None
        self.index = ShardIndex.load(self.storage, split)
        self.min_size, self.max_size = min_size, max_size
        self.use_expanded_labels = use_expanded_labels
        self.label_map = label_map  # data id -> model id (-1: not a class of the model), for experts
        self.skipped: dict[str, int] = {}
        ix = self.index
        sizes = np.array([self.storage.size(n) if self.storage.exists(n) else -1 for n in ix.shard_names], np.int64)
        complete = ix.ends() <= sizes[ix.shard_ids]
        if not complete.all():
            lost = np.bincount(ix.shard_ids[~complete], minlength=len(ix.shard_names))
            self.skipped = {ix.shard_names[k]: int(lost[k]) for k in np.flatnonzero(lost)}
            self.index = ix.take(np.flatnonzero(complete))
            if len(self.index) == 0:
                raise InputError(f"{shards_uri}: every shard of split '{split}' is missing or truncated "
                                 f"({sorted(self.skipped)[:3]}...); re-run `tsd prep`")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sample_labels(self) -> LabelSets:
        """Every sample's label ids in the model's label space (what the samplers balance)."""
        if self.label_map is None:
            return self.index.labels
        return self.index.labels.mapped(self.label_map)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None  # threads and futures stay in the process that made them
        return state

    def plan_batches(self, batches: list[list[tuple[int, bool]]]) -> None:
        """The batches this rank will ask for, in order (the sampler's plan): the DataLoader hands
        batch k to worker k mod W, so each worker knows its own next samples and reads them ahead."""
        self._plan = [list(b) for b in batches]
        self._reader = None

    def read_blob(self, i: int) -> bytes:
        """The sample's bytes: one range read covering its .jpg and .json members."""
        ix = self.index
        return self.storage.read_range(ix.shard(i), int(ix.starts[i]), int(ix.lengths[i]))

    def _parse(self, i: int, blob: bytes) -> tuple[bytes, dict]:
        ix = self.index
        jpg = blob[: int(ix.jpg_sizes[i])]
        meta = json.loads(blob[int(ix.json_starts[i]) :])
        if meta.get("image_id") != ix.key(i):
            raise InputError(f"{self.storage.uri(ix.shard(i))}: the index does not match the shard at {ix.key(i)}")
        return jpg, meta

    def read(self, i: int) -> tuple[bytes, dict]:
        return self._parse(i, self.read_blob(i))

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        i, flip = item
        return self._sample(i, flip, self.read_blob(i))

    def __getitems__(self, items: list[tuple[int, bool]]) -> list[dict]:
        """A whole batch (what the DataLoader asks for when the dataset has this method): with
        read-ahead, its samples come from requests already in flight, and the next ones are sent."""
        if self.read_ahead <= 0:
            return [self[item] for item in items]
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = _ReadAhead(self, self._worker_plan())
        blobs = self._reader.batch(list(items))
        return [self._sample(i, flip, blob) for (i, flip), blob in zip(items, blobs, strict=True)]

    def _worker_plan(self) -> list[list[tuple[int, bool]]] | None:
        if self._plan is None:
            return None
        info = torch.utils.data.get_worker_info()
        return self._plan[info.id :: info.num_workers] if info is not None else self._plan

    def _sample(self, i: int, flip: bool, blob: bytes) -> dict:
        try:
            jpg, meta = self._parse(i, blob)
            image = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (ValueError, RuntimeError) as exc:  # bad JSON or JPEG bytes inside a complete-looking shard
            raise InputError(f"{self.storage.uri(self.index.shard(i))} [{self.index.key(i)}]: damaged sample "
                             f"({type(exc).__name__}: {str(exc)[:120]}); re-run `tsd prep` for this split") from None
        boxes, labels = training_targets(meta, self.use_expanded_labels, self.label_map)
        image, boxes = shrink_to_input(image, boxes, self.min_size, self.max_size)
        if flip:
            boxes = flip_boxes(boxes, image.shape[-1])
        return {"image": image, "boxes": boxes, "labels": labels, "index": i, "flip": bool(flip)}


class _ReadAhead:
    """Range requests of one loader process in flight on a thread pool: the current batch's and the
    next batches' of the process's plan, at most ``read_ahead`` samples (at least one batch)."""

    def __init__(self, dataset: ShardDataset, plan: list[list[tuple[int, bool]]] | None) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.pid = os.getpid()
        self.dataset, self.plan = dataset, plan
        self.pool = ThreadPoolExecutor(max_workers=dataset.read_ahead, thread_name_prefix="tsd-read-ahead")
        self.inflight: deque = deque()  # futures of the samples of plan[cursor:submitted], in order
        self.cursor = self.submitted = 0

    def _submit(self, batch: list[tuple[int, bool]]) -> None:
        self.inflight.extend(self.pool.submit(self.dataset.read_blob, i) for i, _ in batch)

    def batch(self, items: list[tuple[int, bool]]) -> list[bytes]:
        plan = self.plan
        if plan is None or self.cursor >= len(plan) or plan[self.cursor] != items:  # not the planned batch
            for future in self.inflight:
                future.cancel()
            self.inflight.clear()
            self.plan = None  # from here on, batch by batch
            return [f.result() for f in [self.pool.submit(self.dataset.read_blob, i) for i, _ in items]]
        if self.submitted == self.cursor:
            self._submit(plan[self.cursor])
            self.submitted += 1
        mine = [self.inflight.popleft() for _ in items]
        self.cursor += 1
        while (self.submitted < len(plan) and self.submitted <= self.cursor + 64
               and len(self.inflight) + len(plan[self.submitted]) <= self.dataset.read_ahead):
            self._submit(plan[self.submitted])
            self.submitted += 1
        return [f.result() for f in mine]


def training_targets(meta: dict, use_expanded_labels: bool, label_map: np.ndarray | None = None
                     ) -> tuple[Tensor, Tensor]:
    """A sample's boxes (pixels) and labels; without ``use_expanded_labels``, only the annotated
    ones (not the copies prep made for ancestor classes, ``is_expanded``). With ``label_map``
    (data id -> model id, ``pipeline.classes``), in the model's ids, boxes of other classes dropped."""
    boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(meta["labels"], dtype=torch.int64)
    if not use_expanded_labels and meta.get("is_expanded"):
        keep = torch.tensor(meta["is_expanded"]) == 0
        boxes, labels = boxes[keep], labels[keep]
    if label_map is not None:
        labels = torch.from_numpy(label_map)[labels]
        keep = labels >= 0
        boxes, labels = boxes[keep], labels[keep]
    return boxes, labels


def collate(samples: list[dict], size_divisible: int = 32) -> dict[str, Tensor]:
    """One padded uint8 image tensor, image sizes, concatenated boxes/labels with per-image counts.

    The batch is ``[N, H, W, 3]`` (channels last): ``decode_jpeg`` and the resize hand back
    images whose memory is already height x width x channel, so each one is copied as is instead
    of being transposed (which took a fifth of a sample's loading time). ``unpack`` returns the
    usual ``[3, h, w]`` views on the device. In a DataLoader worker every field is written into
    one shared-memory segment (``batch_transfer.allocate_shared``): handing the batch to the
    training process then copies nothing and passes one segment, not one per tensor.
    """
    h = max(s["image"].shape[1] for s in samples)
    w = max(s["image"].shape[2] for s in samples)
    h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
    small = {
        "sizes": torch.tensor([s["image"].shape[1:] for s in samples], dtype=torch.int64),
        "boxes": torch.cat([s["boxes"] for s in samples]),
        "labels": torch.cat([s["labels"] for s in samples]),
        "counts": torch.tensor([len(s["labels"]) for s in samples], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "flips": torch.tensor([s.get("flip", False) for s in samples], dtype=torch.bool),
    }
    shape = (len(samples), h, w, 3)
    if torch.utils.data.get_worker_info() is not None:
        from pipeline.batch_transfer import allocate_shared

        batch = allocate_shared({"images": (torch.uint8, shape), **{k: (v.dtype, tuple(v.shape)) for k, v in small.items()}})
        for k, v in small.items():
            batch[k].copy_(v)
    else:
        batch = {"images": torch.empty(shape, dtype=torch.uint8), **small}
    images = batch["images"]
    for k, s in enumerate(samples):
        ih, iw = s["image"].shape[1:]
        images[k, :ih, :iw] = s["image"].permute(1, 2, 0)
        images[k, ih:] = 0  # zero only the padding
        images[k, :ih, iw:] = 0
    return batch


def unpack(batch: dict[str, Tensor], device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The model's inputs from a collated batch, moved to ``device`` (images still uint8)."""
    images = batch["images"].to(device, non_blocking=True)
    boxes = batch["boxes"].to(device).split(batch["counts"].tolist())
    labels = batch["labels"].to(device).split(batch["counts"].tolist())
    flips = batch["flips"].tolist() if "flips" in batch else [False] * len(images)
    out_images = []
    for k, ((h, w), flipped) in enumerate(zip(batch["sizes"].tolist(), flips, strict=True)):
        image = images[k, :h, :w].permute(2, 0, 1)  # [3, h, w] view of the channels-last batch
        out_images.append(image.flip(-1) if flipped else image)
    return out_images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def streaming_dataset(shards_uri: str, split: str, min_size: int, max_size: int, epoch_samples: int,
                      seed: int, flip_prob: float = 0.5, use_expanded_labels: bool = False,
                      label_map: np.ndarray | None = None):
    """Uniform sampling without the index: webdataset over the split's shards, resampled, with a fixed
    epoch length (equal batches on every rank). Local shards only (S3 shards: use the index mode)."""
    import random

    import webdataset as wds

    storage = open_storage(shards_uri)
    # the index names the split's shards: a stray tar left by another plan is never read
    names = sorted(ShardIndex.load(storage, split).shard_names)
    if not names:
        raise InputError(f"{shards_uri}: no shards for split '{split}'")
    urls = [storage.uri(n) for n in names]
    rngs: dict[int, random.Random] = {}

    def flip_rng() -> random.Random:
        """One generator per DataLoader process, seeded by (seed, worker): forked workers would
        otherwise all draw the same flips from a copy of one generator."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if worker not in rngs:
            rngs[worker] = random.Random(f"{seed}/{worker}")
        return rngs[worker]

    def to_sample(sample: dict) -> dict:
        meta = json.loads(sample["json"])
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:  # damaged bytes: say which shard and sample
            raise InputError(f"{sample.get('__url__', '?')} [{sample.get('__key__', '?')}]: damaged sample "
                             f"({type(exc).__name__}: {str(exc)[:120]}); re-run `tsd prep` for this split") from None
        boxes, labels = training_targets(meta, use_expanded_labels, label_map)
        image, boxes = shrink_to_input(image, boxes, min_size, max_size)
        flip = flip_rng().random() < flip_prob
        if flip:
            boxes = flip_boxes(boxes, image.shape[-1])
        return {"image": image, "boxes": boxes, "labels": labels, "index": -1, "flip": flip}

    return wds.WebDataset(urls, resampled=True, seed=seed, nodesplitter=wds.split_by_node,
                          empty_check=False).map(to_sample).with_epoch(epoch_samples)
