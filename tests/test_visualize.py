"""Fig. 5 geometry of TSD (P, P-hat-r, P-hat-c points), its drawing, and the AP-vs-IoU plot."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data_prep.synthetic import generate
from pipeline.cli import main
from pipeline.visualize import draw_tsd, tsd_geometry
from tests.conftest import REPO
from tests.model_utils import tiny_model_config, toy_batch
from tsd_model.build import build_model


def test_geometry_follows_the_offsets():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    image = toy_batch()[0][0]
    zero = tsd_geometry(model, image, top_k=3)
    assert len(zero) == 3
    for g in zero:  # fresh model: dC = dR = 0, so P-hat-r = P and the points are P's bin centers
        torch.testing.assert_close(g["P_r"], g["P"])
        x1, y1, x2, y2 = g["P"].tolist()
        pts = g["P_c_points"].view(7, 7, 2)
        torch.testing.assert_close(pts[0, 0], torch.tensor([x1 + (x2 - x1) / 14, y1 + (y2 - y1) / 14]), atol=1e-3,
                                   rtol=0)
    stage = model.roi_heads.stages[0]
    with torch.no_grad():
        stage.tsd.offsets.delta_r[-1].bias.copy_(torch.tensor([1.0, 0.0]))
    moved = tsd_geometry(model, image, top_k=3)
    for g in moved:
        w = (g["P"][2] - g["P"][0]).item()
        assert abs((g["P_r"][0] - g["P"][0]).item() - 0.1 * w) < 1e-3  # gamma * dR * w
    drawing = draw_tsd(image, moved)
    assert drawing.dtype == torch.uint8 and drawing.shape[0] == 3 and min(drawing.shape[1:]) >= 480


def test_visualize_cli_writes_fig5_and_fig6_pngs(tmp_path):
    generate(tmp_path / "synth", num_train=0, num_validation=2, seed=3)
    model = build_model(tiny_model_config())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": model.state_dict()}, ckpt / "state.pt")
    reports = []
    for name, value in (("tsd", 0.6), ("sibling", 0.55)):
        path = tmp_path / name / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"mAP": value, "ap_at_iou": {"0.50": value, "0.75": value / 2, "0.95": 0.01}}))
        reports += ["--report", str(path)]
    assert main(["visualize", "--config", str(REPO / "configs" / "tiny.yaml"), "--set",
                 f"data.root={tmp_path / 'synth'}", "--checkpoint", str(ckpt), "--images",
                 str(tmp_path / "synth" / "validation"), "--out", str(tmp_path / "vis"), *reports]) == 0
    pngs = sorted(p.name for p in (tmp_path / "vis").glob("*.png"))
    assert "ap_vs_iou.png" in pngs and sum(p.endswith("_tsd.png") for p in pngs) == 2
    assert Image.open(tmp_path / "vis" / "ap_vs_iou.png").size[0] > 400


def test_charts_have_titles_labelled_axes_values_and_legends(tmp_path, capsys):
    import numpy as np

    from pipeline.plots import ap_vs_iou_figure, pr_curves_figure

    reports = {"TSD": {"mAP": 0.6, "ap_at_iou": {"0.50": 0.6, "0.75": 0.4, "0.95": 0.05}},
               "sibling": {"mAP": 0.55, "ap_at_iou": {"0.50": 0.55, "0.75": 0.35, "0.95": 0.04}}}
    ax = ap_vs_iou_figure(reports).axes[0]
    assert ax.get_title() and ax.get_xlabel() == "IoU threshold" and ax.get_ylabel().startswith("AP")
    assert ax.get_ylim() == (0.0, 1.0) and len(ax.get_yticks()) >= 5  # values on the AP axis
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TSD (mAP@0.5 0.600)", "sibling (mAP@0.5 0.550)"]
    assert ax.xaxis._gridOnMajor if hasattr(ax.xaxis, "_gridOnMajor") else ax.xaxis.get_gridlines()[0].get_visible()
    curves = {c: (np.linspace(0, 1, 5), np.linspace(1, 0.2 + c / 20, 5)) for c in range(10)}
    ap = np.array([0.1 * c for c in range(10)])
    ax = pr_curves_figure(curves, tuple(f"class{c}" for c in range(10)), ap).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == [f"class{c} (AP {0.1 * c:.3f})" for c in (9, 8, 7, 6)]  # the best...
    assert labels[4:] == [f"class{c} (AP {0.1 * c:.3f})" for c in (3, 2, 1, 0)]  # ...and the worst
    assert "4 best and 4 worst" in ax.get_title() and ax.get_xlabel() == "recall"
    # tsd visualize: --label names the reports; without it, the run of each report's checkpoint
    paths = []
    for name in ("run-a", "run-b"):
        path = tmp_path / name / "eval-validation" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**reports["TSD"], "checkpoint": str(tmp_path / name / "checkpoint_000")}))
        paths += ["--report", str(path)]
    assert main(["visualize", *paths, "--label", "TSD", "--out", str(tmp_path / "f1")]) == 0
    assert main(["visualize", *paths, "--out", str(tmp_path / "f2")]) == 0
    assert Image.open(tmp_path / "f1" / "ap_vs_iou.png").size[0] > 600
    from pipeline.cli import _run_name

    assert _run_name(paths[1], json.loads(open(paths[3]).read())) == "run-b"


def test_the_per_level_chart_shows_every_level_with_its_values(tmp_path, capsys):
    from pipeline.plots import ap_by_level_figure

    by_level = {"leaf": {"mAP": 0.8, "classes": 7}, "parent": {"mAP": 0.9, "classes": 5},
                "depth": {"1": {"mAP": 0.85, "classes": 2}, "2": {"mAP": None, "classes": 0}}}
    reports = {"TSD": {"mAP": 0.84, "num_classes_with_positives": 12, "by_level": by_level, "ap_at_iou": {"0.50": 0.84}},
               "sibling": {"mAP": 0.5, "num_classes_with_positives": 12, "ap_at_iou": {"0.50": 0.5},
                           "by_level": {**by_level, "parent": {"mAP": 0.0, "classes": 5}}}}
    ax = ap_by_level_figure(reports).axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["all classes\n(12)", "leaf classes\n(7)", "parent classes\n(5)", "depth 1\n(2)", "depth 2\n(0)"]
    values = [t.get_text() for t in ax.texts]
    assert values[:5] == ["0.840", "0.800", "0.900", "0.850", "n/a"] and "0.000" in values[5:]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TSD", "sibling"] and ax.get_title()
    paths = []
    for name, report in reports.items():
        path = tmp_path / name / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(report))
        paths += ["--report", str(path)]
    assert main(["visualize", *paths, "--out", str(tmp_path / "out")]) == 0
    assert "ap_by_level.png" in capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "ap_by_level.png").size[0] > 600



@pytest.mark.parametrize("background", [255, 230])
def test_fig5_labels_sit_on_a_dark_plate_inside_the_image(background):
    """Plain yellow text vanished on the bright synthetic images; the label now has a dark plate
    (high contrast whatever the background) and stays in the image for a box at its top edge."""
    image = torch.full((3, 100, 120), background, dtype=torch.uint8)
    box = torch.tensor([0.0, 0.0, 60.0, 50.0])  # at the top-left corner: no room above it
    geometry = [{"P": box, "P_r": box, "P_c_points": torch.zeros(0, 2), "label": 0, "score": 0.87}]
    drawing = draw_tsd(image, geometry, ("Triangle",), min_side=480).permute(1, 2, 0).int()
    plate = drawing[4:14, 40:80]  # below the top-left corner, where the label must now be
    dark = (plate.sum(-1) < 3 * 60).float().mean().item()
    yellow = ((plate[..., 0] > 200) & (plate[..., 1] > 180) & (plate[..., 2] < 80)).any().item()
    assert dark > 0.5 and yellow


def test_report_figures_start_without_torch():
    """`tsd visualize --report` plots from JSON: its modules must not pull in torch (7 s of imports
    on these machines, before a wrong path could even be said)."""
    import subprocess
    import sys

    probe = ("import sys; import pipeline.cli, pipeline.plots; "
             "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0
