"""Pretrained weights a real run uses: `tsd train` refuses a paper config whose ImageNet file is
missing (naming it and where it is published), trains from scratch only when told, checks an
official file's sha256 prefix, and reads weights from S3 into a local copy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from data_prep.errors import ConfigError, InputError
from pipeline.config import load_config
from pipeline.weights_files import check_weights, local_copy
from tests.conftest import REPO
from tsd_model.weights import IMAGENET_FILES, verify_official_file

PAPER = REPO / "configs" / "faster_rcnn_r50_fpn_tsd_oid.yaml"


def test_every_paper_config_names_its_official_imagenet_file():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.model.backbone.name == "tiny" or path.name == "oid_challenge_data.yaml":
            continue
        official = IMAGENET_FILES[cfg.model.backbone.name]
        assert cfg.model.weights.backbone == f"weights/{official.file_name}", path.name
        assert official.url.endswith("/" + official.file_name)


def test_a_missing_imagenet_file_is_refused_with_where_to_get_it(tmp_path):
    cfg = load_config(PAPER, [f"model.weights.backbone={tmp_path}/resnet50-0676ba61.pth"])
    with pytest.raises(ConfigError, match=r"resnet50-0676ba61.pth not found .*https://download.pytorch.org/models/"
                                          r"resnet50-0676ba61.pth"):
        check_weights(cfg.model, None)
    no_file = load_config(PAPER, ["model.weights.backbone=null"])
    with pytest.raises(ConfigError, match="would train from random init.*from_scratch=true"):
        check_weights(no_file.model, None)
    check_weights(load_config(PAPER, ["model.weights.backbone=null", "model.weights.from_scratch=true"]).model, None)
    with pytest.raises(ConfigError, match="choose one"):
        check_weights(load_config(PAPER, ["model.weights.from_scratch=true"]).model, None)
    check_weights(load_config(REPO / "configs" / "tiny.yaml").model, None)  # no ImageNet weights exist for it


def test_tsd_train_refuses_before_anything_starts(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(PAPER),
                          "--set", f"data.shards={tmp_path}/no-shards"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "weights/resnet50-0676ba61.pth not found" in run.stderr and "download.pytorch.org" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_official_name_with_other_bytes_is_refused(tmp_path):
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(InputError, match="does not start with 0676ba61"):
        verify_official_file(str(path))
    renamed = tmp_path / "my-resnet50.pth"
    path.rename(renamed)
    verify_official_file(str(renamed))  # not an official name: nothing to check against


def test_weights_in_s3_are_checked_and_copied_once(s3_server, s3_bucket, tmp_path):
    import boto3

    body = b"weights bytes"
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="weights/r50.pth", Body=body)
    uri = f"s3://{s3_bucket}/weights/r50.pth"
    check_weights(load_config(PAPER, [f"model.weights.backbone={uri}"]).model, s3_server)
    with pytest.raises(ConfigError, match="not found"):
        check_weights(load_config(PAPER, [f"model.weights.backbone={uri}.missing"]).model, s3_server)
    first = local_copy(uri, s3_server, tmp_path)
    assert first.endswith("/r50.pth") and open(first, "rb").read() == body
    assert local_copy(uri, s3_server, tmp_path) == first
    assert local_copy(str(tmp_path / "local.pth"), s3_server, tmp_path) == str(tmp_path / "local.pth")
