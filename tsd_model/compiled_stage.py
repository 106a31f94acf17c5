"""A RoI stage's pooling and heads as one compiled graph (``roi.compile``), its shapes padded to buckets.

At one image per step the GPU waits for Python: TSD's RoI stage issues ~500 more operator calls
per inference than the sibling's (BENCHMARKS.md), each launching small kernels. Under
``torch.compile`` (inductor) the pooling of P, the head (for TSD: the offset nets, the pooling of
P-hat-c and P-hat-r, both branches) and, in training, the jointly trained sibling become one
graph whose elementwise work is fused into a few kernels; ``mode="reduce-overhead"`` replays it
as a CUDA graph. In training the stage's losses (box coding, the heads' losses and the
progressive constraints: ``RoIStage.loss_terms``, masked instead of indexed by the positives)
are in the graph too. Matching and sampling stay eager, per image, without waiting for the host
(``roi_sampling``); the post-processing's NMS waits for it and would split the graph.

One compilation serves every image size: the feature table's row count is a symbolic size of
the graph (``mark_dynamic``). The RoI count is static, padded up to ``bucket(n)`` (the next
number with four significant bits: at most 12.5 % padding, eight sizes per octave; one
compilation per bucket, and a training run's RoI count is the same every step: the sampler
draws a fixed number per image once the proposals outnumber it). The table's rows are padded to
buckets too (zero rows that nothing reads), so that CUDA graphs, which are recorded per shape,
record few. Padded RoIs are real boxes ``[0, 0, 1, 1]`` of image 0, background with loss weight
0, whose outputs are cut off, so the real RoIs' values, losses and gradients are the eager
stage's. Inside the graph P is pooled by the table gather (``ops.pool_table``): the per-level
``roi_align`` path needs the per-level counts on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import Tensor, nn

from tsd_model.heads import HeadOutput, RoIFeatures, TSDGeometry, TSDHead
from tsd_model.ops import FeatureTable, pool_table

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
CompileBackend = Literal["inductor", "aot_eager"]

# one cache entry per stage, bucket of RoIs, training / inference and autocast state: a cascade
# of three stages with a few buckets each passes torch's default limit of 8
RECOMPILE_LIMIT = 64


def bucket(n: int, minimum: int = 64) -> int:
    """``n`` rounded up to a number with four significant bits (``minimum`` at least): the padded
    size of ``n`` RoIs or table rows; at most 12.5 % larger than ``n``."""
    if n <= minimum:
        return minimum
    step = 1 << max(n.bit_length() - 4, 0)
    return -(-n // step) * step


@dataclass(frozen=True)
class CompileOptions:
    """How the stage is compiled: torch.compile's ``mode`` (inductor) or a capture-only backend.

    ``aot_eager`` traces the same graph (forward and backward) without generating code: it shows
    that the stage compiles as one graph and gives the eager values, in seconds on a CPU.
    """

    mode: CompileMode = "default"
    backend: CompileBackend = "inductor"

    def compiled(self) -> Callable[..., tuple[Tensor, ...]]:
        """The compiled ``_stage_graph``, one per options in a process (its graphs are cached by torch)."""
        return _compiled(self.mode, self.backend)

    def begin_step(self) -> None:
        """Called at the start of each forward of the model: CUDA graphs may reuse the memory of
        the previous step's outputs from here on (``torch.compiler.cudagraph_mark_step_begin``)."""
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()


@cache
def _compiled(mode: CompileMode, backend: CompileBackend) -> Callable[..., tuple[Tensor, ...]]:
    # fullgraph: a graph break would silently split the stage back into many small graphs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(_stage_graph, fullgraph=True, dynamic=False, backend=backend, **options)


@dataclass
class LossInputs:
    """A training stage's targets, what its losses need besides the heads' outputs (``RoIStage.loss_terms``)."""

    labels: Tensor  # [R] class index + 1, 0 = background
    gt_boxes: Tensor  # [R, 4] the matched gt boxes
    weights: Tensor  # [R] the sampled RoIs' loss weights
    weights_pos: Tensor | None  # [R] the positives' loss weights, or None
    ancestors: Tensor | None  # [C, C] a multi-label head's ancestor matrix, or None

    def padded(self, pad: int) -> LossInputs:
        """The targets of ``pad`` more RoIs: background, weight 0 (their box stands in for the gt box)."""
        def zeros(t: Tensor | None, *shape: int) -> Tensor | None:
            return None if t is None else torch.cat([t, t.new_zeros((pad, *shape))])

        return LossInputs(zeros(self.labels), zeros(self.gt_boxes, 4), zeros(self.weights), zeros(self.weights_pos),
                          self.ancestors)


LossTerms = Callable[..., dict[str, Tensor]]  # RoIStage.loss_terms


def _stage_graph(pool: nn.Module, head: nn.Module, sibling: nn.Module | None, rows: Tensor, base: Tensor,
                 sizes: Tensor, scales: Tensor, k_min: int, rois: Tensor, dtype: torch.dtype,
                 loss_terms: LossTerms | None, targets: LossInputs | None) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """What is compiled: P's levels and pooling, the head and the sibling, and with ``loss_terms``
    the stage's losses, on padded inputs."""
    table = FeatureTable(rows, base, sizes, scales, k_min)
    levels = pool.levels_of(table, rois[:, 1:])
    pooled = pool_table(table, rois, levels, None, pool.output_size, pool.sampling_ratio, pool.rule).to(dtype)
    features = RoIFeatures(rois, levels, pooled, table)
    main = head(features)
    out = (levels, pooled, main.logits, main.deltas, main.reg_boxes)
    if main.geometry is not None:
        out += (main.geometry.delta_c, main.geometry.delta_r)
    side = None
    if sibling is not None:
        side = sibling(features)
        out += (side.logits, side.deltas)
    losses: dict[str, Tensor] = {}
    if loss_terms is not None and targets is not None:
        losses = loss_terms(main, side, rois[:, 1:], targets.labels, targets.gt_boxes, targets.weights,
                            targets.weights_pos, targets.ancestors)
    return out, losses


def run_compiled(pool: nn.Module, head: nn.Module, sibling: nn.Module | None, features: dict[str, Tensor],
                 rois: Tensor, options: CompileOptions, loss_terms: LossTerms | None = None,
                 targets: LossInputs | None = None) -> tuple[RoIFeatures, HeadOutput, HeadOutput | None, dict[str, Tensor]]:
    """The eager ``RoIStage.run``'s outputs for ``rois`` (``[R, 5]``), through the compiled graph,
    and with ``loss_terms`` and ``targets`` the stage's losses (else an empty dict)."""
    maps = pool.maps(features)
    table = pool.table(features, num_rows=bucket(FeatureTable.rows_needed(maps), minimum=1024))
    num = rois.shape[0]
    pad = rois.new_zeros((bucket(num) - num, 5))  # made on the device: no host-to-device copy to wait for
    pad[:, 3:].fill_(1.0)  # image 0, the box [0, 0, 1, 1]
    padded = torch.cat([rois, pad])
    if targets is not None:
        targets = targets.padded(len(pad))
    torch._dynamo.mark_dynamic(table.rows, 0)  # one graph for every image size
    out, losses = options.compiled()(pool, head, sibling, table.rows, table.base, table.sizes, table.scales,
                                     table.k_min, padded, maps[0].dtype, loss_terms, targets)
    # a CUDA graph's outputs live in memory that its next replay overwrites: keep copies
    copy = options.mode == "reduce-overhead"
    keep = (lambda t: t[:num].clone()) if copy else (lambda t: t[:num])
    losses = {name: value.clone() if copy else value for name, value in losses.items()}
    levels, pooled, logits, deltas, reg_boxes, *rest = (keep(t) for t in out)
    roi_features = RoIFeatures(rois, levels, pooled, table)
    geometry = None
    if isinstance(head, TSDHead):
        delta_c, delta_r, *rest = rest
        geometry = TSDGeometry(rois[:, 1:], delta_c, delta_r, reg_boxes, head.deform_pool, head.gamma)
    main = HeadOutput(logits, deltas, reg_boxes, geometry)
    side = None
    if sibling is not None:
        side_logits, side_deltas = rest
        side = HeadOutput(side_logits, side_deltas, rois[:, 1:])
    return roi_features, main, side, losses
