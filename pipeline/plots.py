"""Figures of evaluation reports: AP against the IoU threshold (paper Fig. 6), mAP per level of the
class hierarchy, precision-recall curves. matplotlib and numpy only, no torch, so that
``tsd visualize --report`` starts in about a second (drawings on images are in ``visualize``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(title: str, x_label: str, y_label: str):
    """A matplotlib figure (headless Agg backend) with one axes, its title, labels and a grid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    return fig, ax


def ap_vs_iou_figure(reports: dict[str, dict]):
    """AP against the IoU threshold (paper Fig. 6), one line per report (TSD vs a baseline), labelled
    with its mAP@0.5."""
    fig, ax = _figure("AP vs IoU threshold (OID metric; paper Fig. 6)", "IoU threshold", "AP (mean over classes)")
    for name, report in reports.items():
        points = sorted((float(t), v) for t, v in report["ap_at_iou"].items())
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o",
                label=f"{name} (mAP@0.5 {report['mAP']:.3f})")
    ax.set_xlim(0.48, 0.97)
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    ax.legend(loc="lower left")
    return fig


def level_groups(report: dict) -> dict[str, tuple[float | None, int]]:
    """``label -> (mAP, classes)`` of a report: all classes, leaves, parents, each depth."""
    levels = report.get("by_level") or {}
    groups = {"all classes": (report.get("mAP"), report.get("num_classes_with_positives", 0))}
    for key, label in (("leaf", "leaf classes"), ("parent", "parent classes")):
        if key in levels:
            groups[label] = (levels[key]["mAP"], levels[key]["classes"])
    for depth, group in sorted(levels.get("depth", {}).items(), key=lambda kv: int(kv[0])):
        groups[f"depth {depth}"] = (group["mAP"], group["classes"])
    return groups


def ap_by_level_figure(reports: dict[str, dict]):
    """mAP@0.5 of all classes, of the leaf and parent classes and per depth of the hierarchy (the
    report's ``by_level``), grouped bars with one bar per report, each bar with its value; the
    number of classes of each group under its name."""
    fig, ax = _figure("mAP@0.5 per level of the class hierarchy (OID metric)",
                      "class group (number of classes with positives)", "mAP@0.5")
    per_report = {name: level_groups(r) for name, r in reports.items()}
    labels = list(dict.fromkeys(label for groups in per_report.values() for label in groups))
    width = 0.8 / max(1, len(per_report))
    for k, (name, groups) in enumerate(per_report.items()):
        xs = [i + (k - (len(per_report) - 1) / 2) * width for i in range(len(labels))]
        values = [groups.get(label, (None, 0))[0] for label in labels]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=name)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3f}" for v in values], fontsize="x-small",
                     padding=2)
    first = next(iter(per_report.values()), {})
    ax.set_xticks(range(len(labels)),
                  [f"{label}\n({first.get(label, (None, 0))[1]})" for label in labels], fontsize="small")
    ax.set_ylim(0.0, 1.08)
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    ax.legend(loc="lower right")
    return fig


def plot_ap_by_level(path, reports: dict[str, dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ap_by_level_figure(reports).savefig(path)


def plot_ap_vs_iou(path, reports: dict[str, dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ap_vs_iou_figure(reports).savefig(path)


def pr_curves_figure(curves: dict[int, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                     ap: np.ndarray | None = None, per_side: int = 4):
    """Precision-recall curves of the ``per_side`` best and worst classes by AP (all of them when
    there are few), each labelled with its AP."""
    classes = list(curves)
    if ap is not None:
        classes.sort(key=lambda c: -float(ap[c]))
    few = len(classes) <= 2 * per_side
    if not few:
        classes = classes[:per_side] + classes[-per_side:]
    title = "Precision-recall at IoU 0.5" + ("" if few else f": the {per_side} best and {per_side} worst classes")
    fig, ax = _figure(title, "recall", "precision")
    for rank, c in enumerate(classes):
        recall, precision = curves[c]
        label = names[c] + (f" (AP {float(ap[c]):.3f})" if ap is not None else "")
        ax.plot(recall, precision, label=label, linestyle="-" if few or rank < per_side else "--")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_pr_curves(path, curves: dict[int, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                   ap: np.ndarray | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pr_curves_figure(curves, names, ap).savefig(path)
