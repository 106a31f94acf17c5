"""``roi.compile``: a RoI stage as one compiled graph gives the eager stage's values and gradients,
and its padded shapes let one graph serve every batch of a bucket.

On the CPU the graph is captured by ``aot_eager`` (the same dynamo + AOT-autograd capture,
``fullgraph=True`` so that any graph break fails, without inductor's minute of code generation);
``tests/test_cuda.py`` runs inductor and CUDA graphs on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.model_utils import tiny_model_config, toy_batch
from tsd_model.build import build_model
from tsd_model.compiled_stage import CompileOptions, bucket, run_compiled
from tsd_model.ops import FeatureTable, pool_table

CAPTURE = CompileOptions("default", "aot_eager")


def test_bucket_pads_at_most_an_eighth_and_never_shrinks():
    sizes = [bucket(n) for n in range(1, 70_000)]
    assert sizes[:64] == [64] * 64
    for n, size in enumerate(sizes, start=1):
        assert n <= size <= max(64, n * 9 // 8)
    assert sizes == sorted(sizes)
    assert len(set(sizes)) < 100  # few distinct shapes: few compilations
    assert bucket(1000) == 1024 and bucket(1024) == 1024 and bucket(1025) == 1152


def test_a_padded_feature_table_pools_the_same_and_its_extra_rows_are_zero():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 8, 20, 24, generator=g), torch.randn(2, 8, 10, 12, generator=g)]
    rois = torch.tensor([[0, 4.0, 6, 50, 40], [1, 30, 2, 90, 70], [1, 0, 0, 95, 79]])
    levels = torch.tensor([0, 1, 1])
    offsets = torch.randn(3, 7, 7, 2, generator=g) * 0.1
    plain = FeatureTable.build(maps, [0.25, 0.125])
    padded = FeatureTable.build(maps, [0.25, 0.125], num_rows=FeatureTable.rows_needed(maps) + 100)
    assert padded.rows.shape[0] == plain.rows.shape[0] + 100
    assert padded.rows[plain.rows.shape[0]:].eq(0).all()
    torch.testing.assert_close(pool_table(padded, rois, levels, offsets, 7), pool_table(plain, rois, levels, offsets, 7),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot hold"):
        FeatureTable.build(maps, [0.25, 0.125], num_rows=10)


def eager_and_compiled(*overrides: str, options: CompileOptions = CAPTURE):
    """Two tiny detectors with the same weights, one eager, one with ``options``; their offsets
    start random, so that P-hat-c and P-hat-r differ from P. Shared with ``tests/test_cuda.py``."""
    torch.manual_seed(0)
    eager = build_model(tiny_model_config("tsd.offset_init=kaiming_normal", *overrides))
    compiled = build_model(tiny_model_config("tsd.offset_init=kaiming_normal", f"roi.compile={options.mode}",
                                             f"roi.compile_backend={options.backend}", *overrides))
    compiled.load_state_dict(eager.state_dict())
    assert all(s.compile == options for s in compiled.roi_heads.stages)
    assert all(s.compile is None for s in eager.roi_heads.stages)
    return eager, compiled


@pytest.mark.parametrize(("overrides", "boxless"), [((), False), (("roi.head=sibling",), False),
                                                   (("cascade.enabled=true",), False),
                                                   (("roi.classification=sigmoid",), False),
                                                   (("cascade.enabled=true", "cascade.class_agnostic=true"), True)],
                         ids=["tsd", "sibling", "cascade-tsd", "sigmoid-tsd", "agnostic-cascade-boxless-image"])
def test_compiled_stages_give_the_eager_losses_gradients_and_detections(overrides, boxless):
    """The losses are computed in the compiled graph (masked, on padded RoIs of weight 0): equal to
    the eager stage's, for every loss of every head, with an image without boxes too."""
    images, targets = toy_batch()
    if boxless:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    results = []
    for model in eager_and_compiled(*overrides):
        torch.manual_seed(1)  # the RoI samplers draw the same RoIs
        model.train()
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values())
        model.eval()
        with torch.no_grad():
            detections = model(images)
        results.append((losses, grads, detections))
    (losses, grads, detections), (c_losses, c_grads, c_detections) = results
    assert losses.keys() == c_losses.keys() and grads.keys() == c_grads.keys()
    for name in losses:
        torch.testing.assert_close(c_losses[name], losses[name], rtol=1e-5, atol=1e-6, msg=name)
    head_grads = [n for n in grads if n.startswith("roi_heads.")]
    assert any(".tsd.offsets." in n for n in head_grads) == ("roi.head=sibling" not in overrides)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(len(d["boxes"]) for d in detections)
    for eager, compiled in zip(detections, c_detections, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-4)


def _features(height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, 32, height // stride, width // stride, generator=g)
            for name, stride in zip("0123", (4, 8, 16, 32), strict=True)}


def _rois(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * 100
    return torch.cat([torch.zeros(count, 1), xy, xy + torch.rand(count, 2, generator=g) * 90 + 2], dim=1)


def test_one_graph_serves_every_image_size_and_every_roi_count_of_a_bucket():
    _, model = eager_and_compiled()
    stage = model.roi_heads.stages[0].eval()
    torch._dynamo.reset()  # graphs of the other tests' (alike) models would serve these shapes too
    head, pool = stage.tsd, stage.pool
    # 160 x 224 and 192 x 192 fill 2,975 and 3,060 rows (bucket 3,072); 66 and 72 RoIs: bucket 72
    cases = [(160, 224, 66), (192, 192, 72), (192, 192, 66)]
    assert len({(bucket(FeatureTable.rows_needed(list(_features(h, w, 0).values())[:4]), 1024), bucket(n))
                for h, w, n in cases}) == 1
    graphs = []
    for i, (height, width, count) in enumerate(cases):
        features, rois = _features(height, width, i), _rois(count, i)
        with torch.no_grad():
            _, main, _, _ = run_compiled(pool, head, None, features, rois, CAPTURE)
            stage.compile = None
            eager = stage.run(features, [rois[:, 1:]], with_sibling=False).main
            stage.compile = CAPTURE
        graphs.append(counters["stats"]["unique_graphs"])
        assert main.logits.shape[0] == count
        torch.testing.assert_close(main.logits, eager.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(main.reg_boxes, eager.reg_boxes)
        torch.testing.assert_close(main.geometry.delta_c, eager.geometry.delta_c)
    assert graphs[1] == graphs[2] == graphs[0]  # no recompilation after the first batch
    with torch.no_grad():  # images 4x the size, another bucket of rows: the same graph
        _, main, _, _ = run_compiled(pool, head, None, _features(320, 448, 3), _rois(70, 3), CAPTURE)
    assert counters["stats"]["unique_graphs"] == graphs[0]
    with torch.no_grad():  # another bucket of RoIs: one more graph
        run_compiled(pool, head, None, _features(160, 224, 3), _rois(200, 3), CAPTURE)
    assert counters["stats"]["unique_graphs"] == graphs[0] + 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_model_that_ran_under_inference_mode_still_trains(compiled):
    """What the model caches (box-coder weights, the feature table's layout) is made outside
    ``torch.inference_mode``: inference tensors would fail the next training step's backward."""
    model = eager_and_compiled()[int(compiled)]
    images, targets = toy_batch()
    model.eval()
    with torch.inference_mode():
        model(images)
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert model.roi_heads.stages[0].tsd.branches.cls_score.weight.grad is not None
