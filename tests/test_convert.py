"""Converting other code bases' checkpoints: torchvision's Faster R-CNN gives torchvision's own
detections in our model; the TSD authors' mmdetection-v1 layout lands every tensor where it belongs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from data_prep.errors import InputError
from pipeline.config import load_config
from tests.conftest import REPO
from tsd_model.build import build_model
from tsd_model.convert import mmdet_v1_tsd, torchvision_faster_rcnn
from tsd_model.heads import RoIFeatures


def _config(overrides: list[str], *extra: str):
    return load_config(REPO / "configs" / "faster_rcnn_r50_fpn_sibling_coco.yaml", [*overrides, *extra]).model


def test_a_converted_torchvision_faster_rcnn_gives_torchvisions_detections():
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81, min_size=320, max_size=480).eval()
    with torch.no_grad():  # confident random classes, so that detections pass the 0.05 threshold
        tv.roi_heads.box_predictor.cls_score.weight.mul_(60)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(20)
    converted = torchvision_faster_rcnn(tv.state_dict())
    assert "model.roi.pooling=torchvision_legacy" in converted.overrides
    cfg = _config(converted.overrides, "model.input.min_size=320", "model.input.max_size=480")
    ours = build_model(cfg, load_weights=False).eval()
    result = ours.load_state_dict(converted.state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    image = torch.rand(3, 300, 400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tv([image])[0]
        got = ours([image])[0]
    assert len(expected["boxes"]) >= 20  # a real comparison, not of two empty lists
    assert len(got["boxes"]) == len(expected["boxes"])
    torch.testing.assert_close(got["labels"] + 1, expected["labels"])  # torchvision counts background as 0
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-2, rtol=1e-4)


def _authors_tsd_state(num_outputs: int = 81, stages: tuple[str, ...] = ("",), dcn: bool = False) -> dict:
    """A state dict in the layout of the authors' released Faster R-CNN R50-FPN TSD checkpoints
    (Sense-X/TSD, mmdetection v1: ResNet ``backbone.``, ``neck.``, ``rpn_head.``, ``bbox_head.``), with
    random values: the key names and shapes of their modules, written out here independently."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    state = {"backbone.conv1.weight": t(64, 3, 7, 7)}
    for name in ("bn1",):
        state |= {f"backbone.{name}.{p}": t(64) for p in ("weight", "bias", "running_mean", "running_var")}
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1):
        for b in range(blocks):
            pre = f"backbone.layer{layer}.{b}"
            cin = inplanes if b == 0 else planes * 4
            state[f"{pre}.conv1.weight"] = t(planes, cin, 1, 1)
            state[f"{pre}.conv2.weight"] = t(planes, planes, 3, 3)
            state[f"{pre}.conv3.weight"] = t(planes * 4, planes, 1, 1)
            if dcn and layer >= 2:
                state[f"{pre}.conv2_offset.weight"] = t(18, planes, 3, 3)
                state[f"{pre}.conv2_offset.bias"] = t(18)
            for i, c in ((1, planes), (2, planes), (3, planes * 4)):
                state |= {f"{pre}.bn{i}.{p}": t(c) for p in ("weight", "bias", "running_mean", "running_var")}
            if b == 0:
                state[f"{pre}.downsample.0.weight"] = t(planes * 4, cin, 1, 1)
                state |= {f"{pre}.downsample.1.{p}": t(planes * 4) for p in ("weight", "bias", "running_mean",
                                                                               "running_var")}
        inplanes = planes * 4
    for i, c in enumerate((256, 512, 1024, 2048)):
        state[f"neck.lateral_convs.{i}.conv.weight"], state[f"neck.lateral_convs.{i}.conv.bias"] = t(256, c, 1, 1), t(256)
        state[f"neck.fpn_convs.{i}.conv.weight"], state[f"neck.fpn_convs.{i}.conv.bias"] = t(256, 256, 3, 3), t(256)
    state |= {"rpn_head.rpn_conv.weight": t(256, 256, 3, 3), "rpn_head.rpn_conv.bias": t(256),
              "rpn_head.rpn_cls.weight": t(3, 256, 1, 1), "rpn_head.rpn_cls.bias": t(3),
              "rpn_head.rpn_reg.weight": t(12, 256, 1, 1), "rpn_head.rpn_reg.bias": t(12)}
    for stage in stages:
        head = f"bbox_head.{stage}" if stage else "bbox_head."
        shapes = {"shared_fc.0": (256, 12544), "delta_c.0": (256, 256), "delta_c.2": (98, 256),
                  "delta_r.0": (256, 256), "delta_r.2": (2, 256), "shared_fcs.0": (1024, 12544),
                  "shared_fcs.1": (1024, 1024), "fc_cls": (num_outputs, 1024), "fc_reg": (4 * num_outputs, 1024),
                  "TSD_pc_fcs.0": (1024, 12544), "TSD_pc_fcs.1": (1024, 1024), "TSD_pr_fcs.0": (1024, 12544),
                  "TSD_pr_fcs.1": (1024, 1024), "TSD_fc_cls": (num_outputs, 1024),
                  "TSD_fc_reg": (4 * num_outputs, 1024)}
        for name, (rows, cols) in shapes.items():
            state[f"{head}{name}.weight"], state[f"{head}{name}.bias"] = t(rows, cols) * 0.01, t(rows) * 0.01
    return state


def test_the_authors_tsd_checkpoint_converts_with_their_offset_layout():
    state = _authors_tsd_state()
    converted = mmdet_v1_tsd(state)
    cfg = _config(converted.overrides, "model.backbone.norm=frozen_bn")
    assert cfg.roi.head == "tsd" and cfg.tsd.pooling == "authors" and cfg.num_classes == 80
    model = build_model(cfg, load_weights=False).eval()
    result = model.load_state_dict(converted.state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result.missing_keys[:3]
    params = model.state_dict()
    torch.testing.assert_close(params["backbone.fpn.inner_blocks.2.0.weight"], state["neck.lateral_convs.2.conv.weight"])
    torch.testing.assert_close(params["rpn.head.cls_logits.bias"], state["rpn_head.rpn_cls.bias"])
    torch.testing.assert_close(params["roi_heads.stages.0.tsd.branches.bbox_pred.weight"],
                               state["bbox_head.TSD_fc_reg.weight"])
    # the offsets: their dC is `view(n, 2, k, k)` of the last layer's output, ours `view(n, k, k, 2)`
    stage = model.roi_heads.stages[0]
    pooled = torch.randn(5, 256, 7, 7)
    with torch.no_grad():
        delta_c, delta_r = stage.tsd.offsets(pooled)
        hidden = torch.relu(pooled.flatten(1) @ state["bbox_head.shared_fc.0.weight"].T + state["bbox_head.shared_fc.0.bias"])
        h_c = torch.relu(hidden @ state["bbox_head.delta_c.0.weight"].T + state["bbox_head.delta_c.0.bias"])
        theirs = (h_c @ state["bbox_head.delta_c.2.weight"].T + state["bbox_head.delta_c.2.bias"]).view(5, 2, 7, 7)
        torch.testing.assert_close(delta_c, theirs.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
        assert delta_c[2, 1, 4, 0].item() == pytest.approx(theirs[2, 0, 1, 4].item(), rel=1e-4)  # dx of bin (1, 4)
        assert delta_c[2, 1, 4, 1].item() == pytest.approx(theirs[2, 1, 1, 4].item(), rel=1e-4)  # its dy
        features = RoIFeatures(torch.tensor([[0.0, 8, 8, 120, 100]]).expand(5, 5).contiguous(),
                               torch.zeros(5, dtype=torch.long), pooled, stage.pool.table(
                                   {k: torch.randn(1, 256, 64 // 2**i, 64 // 2**i) for i, k in enumerate("0123")}))
        out = stage.tsd(features)
        assert out.logits.shape == (5, 81) and out.deltas.shape == (5, 81, 4)


def test_a_cascade_and_dcn_checkpoint_of_the_authors_converts():
    state = _authors_tsd_state(stages=("0.", "1.", "2."), dcn=True)
    converted = mmdet_v1_tsd(state)
    assert "model.cascade.enabled=true" in converted.overrides
    cfg = _config(converted.overrides, "model.backbone.dcn=v1")
    model = build_model(cfg, load_weights=False)
    result = model.load_state_dict(converted.state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    torch.testing.assert_close(model.state_dict()["backbone.body.layer3.2.conv2.offset_conv.weight"],
                               state["backbone.layer3.2.conv2_offset.weight"])
    torch.testing.assert_close(model.state_dict()["roi_heads.stages.2.sibling.cls_score.weight"],
                               state["bbox_head.2.fc_cls.weight"])


def test_conversion_errors_name_what_is_wrong():
    with pytest.raises(InputError, match="not a TSD checkpoint"):
        mmdet_v1_tsd({"backbone.conv1.weight": torch.zeros(1)})
    state = _authors_tsd_state()
    state["bbox_head.mystery.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="bbox_head.mystery.weight"):
        mmdet_v1_tsd(state)
    with pytest.raises(InputError, match="not a torchvision Faster R-CNN"):
        torchvision_faster_rcnn({"x": torch.zeros(1)})
