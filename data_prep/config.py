"""Configuration of the data layer: where the official files are and how to shard them.

Plain dataclasses with the defaults of the real OpenImages challenge; ``pipeline.config`` loads
them from YAML (unknown keys are errors) and applies ``--set`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SplitFiles:
    """The files of one split. Relative paths are resolved against ``DataConfig.root``."""

    boxes: str | None = None  # box CSV, train (13 columns) or validation layout
    labels: str | None = None  # image-level label CSV (verified positives and negatives)
    images: str = ""  # directory or s3:// prefix holding {ImageID}.jpg


@dataclass
class DataConfig:
    """Where the dataset lives (local paths or s3:// URIs) and where its shards go.

    ``format: coco`` reads COCO ``instances_*.json`` files instead: ``classes`` is then an
    instances JSON whose categories define the label space, each split's ``boxes`` is its
    instances JSON, ``labels`` and ``hierarchy`` are unused (the hierarchy is flat).
    """

    format: Literal["oid", "coco"] = "oid"
    root: str = "data/oid"
    classes: str = "challenge-2019-classes-description-500.csv"
    hierarchy: str = "challenge-2019-label500-hierarchy.json"
    splits: dict[str, SplitFiles] = field(default_factory=dict)
    shards: str = "shards/oid"  # output of `tsd prep`, input of training and evaluation
    s3_endpoint_url: str | None = None  # any S3-compatible store; None = AWS (or $AWS_ENDPOINT_URL)


@dataclass
class PrepConfig:
    """How `tsd prep` turns a split into webdataset shards."""

    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    # a smaller first run: these classes (MIDs or display names), their descendants and their ancestors;
    # every other annotation is dropped and counted (data_prep.class_subset). Empty: all classes.
    classes: list[str] = field(default_factory=list)
    shard_size_mb: float = 1000.0  # target size of one tar shard
    max_samples_per_shard: int | None = None  # optional cap on samples per shard
    resize_short_side: int | None = None  # None: keep the original JPEG bytes (no re-encode)
    resize_max_long_side: int | None = None  # cap on the long side when resizing
    jpeg_quality: int = 90  # for images that must be re-encoded (resize, mode or EXIF conversion)
    seed: int = 0  # seeded shuffle that assigns images to shards
    expand_labels: bool = True  # add every ancestor of a box's class as a training target (OID recipe)
    verify_decode: bool = False  # fully decode every image (slower; catches damage inside the JPEG data)
    # images above this many pixels are rejected from their header alone (no decode): a few-hundred-byte
    # "decompression bomb" can claim 60000 x 60000, which a loader would try to allocate (10.8 GB)
    max_image_pixels: int = 100_000_000
    drop_duplicate_boxes: bool = True  # exact duplicate CSV rows are rejected (and counted)
    keep_images_without_boxes: bool = True  # images with only image-level labels (hard negatives)
    num_cpus_per_task: float = 1.0  # Ray resources of one shard-writing task
    max_rejects_listed: int = 10_000  # per reason in the manifest; counts stay exact
