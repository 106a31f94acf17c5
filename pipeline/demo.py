"""`tsd demo`: the whole job end to end on the bundled synthetic dataset, on an embedded Ray.

synthesise the OID-format dataset -> shard it with Ray tasks -> train the tiny TSD model with two
Ray Train workers -> evaluate it on the validation split with the official OID metric -> write a
challenge submission for the validation images -> draw TSD's derived proposals (paper Fig. 5)
-> print where everything is. Re-running reuses the dataset and the shards (prep
resumes) and starts a new training run. Writes ``demo-summary.json`` in the work directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_prep.prep import load_label_space, run_prep, summary_lines
from data_prep.ray_runtime import init_ray, shutdown_ray
from data_prep.synthetic import generate
from pipeline.config import dump_config, load_config
from pipeline.evaluate import run_evaluation, run_submission
from pipeline.files import write_text_atomic
from pipeline.train import run_training

REPO = Path(__file__).resolve().parents[1]


def run_demo(workdir: str | Path, config: str | Path | None = None, overrides: list[str] | None = None,
             verbose: bool = False) -> dict:
    work = Path(workdir).resolve()
    synth, shards, runs = work / "synth", work / "shards", work / "runs"
    run_name = time.strftime("tiny-%Y%m%d-%H%M%S")
    cfg = load_config(config or REPO / "configs" / "tiny.yaml",
                      [f"data.root={synth}", f"data.shards={shards}", f"train.storage_path={runs}",
                       f"train.local_dir={runs}", f"train.run_name={run_name}", *(overrides or [])])
    t0 = time.perf_counter()
    print("== 1/6 synthesising the OID-format dataset", flush=True)
    if not (synth / "synth-summary.json").exists():
        summary = generate(synth, num_train=200, num_validation=50, seed=0, progress=True)
        (synth / "synth-summary.json").write_text(json.dumps(summary, indent=1))
    else:
        print(f"   reusing {synth}")
    started = init_ray(None)
    try:
        print("== 2/6 sharding it with Ray tasks", flush=True)
        manifest = run_prep(cfg.data, cfg.prep, resolved_config=dump_config(cfg))
        for line in summary_lines(manifest):
            print("   " + line)
        print(f"== 3/6 training the tiny TSD model with {cfg.train.num_workers} Ray workers", flush=True)
        trained = run_training(cfg, verbose=verbose)
        print("== 4/6 evaluating it on the validation split (official OID metric)", flush=True)
        evaluation = run_evaluation(cfg, trained["checkpoint"], "validation", str(runs / run_name / "eval-validation"),
                                    tensorboard_dir=trained["tensorboard"],
                                    iteration=(trained["metrics"] or {}).get("iteration"))
        print("== 5/6 writing a challenge submission for the validation images", flush=True)
        submission = runs / run_name / "submission.csv"
        counts = run_submission(cfg, trained["checkpoint"], str(synth / "validation"), str(submission))
        print("== 6/6 drawing TSD's derived proposals (paper Fig. 5) and AP vs IoU (Fig. 6)", flush=True)
        figures = visualize_demo(cfg, trained["checkpoint"], synth / "validation", runs / run_name / "figures",
                                 evaluation["files"]["report"])
    finally:
        shutdown_ray(started)
    result = {
        "seconds": round(time.perf_counter() - t0, 1),
        "dataset": str(synth),
        "shards": str(shards),
        "manifest": str(shards / "manifest.json"),
        "run": trained["run"],
        "checkpoint": trained["checkpoint"],
        "final_metrics": trained["metrics"],
        "tensorboard": trained["tensorboard"],
        "config": trained["config"],
        "mAP@0.5": evaluation["mAP"],
        "mAP@[.5:.95]": evaluation.get("mAP_50_95"),
        "mAP_by_level": evaluation.get("by_level"),
        "report": evaluation["files"]["report"],
        "pr_curves": evaluation["files"]["pr_curves"],
        "submission": str(submission),
        "submission_counts": counts,
        "figures": [str(p) for p in figures],
    }
    write_text_atomic(work / "demo-summary.json", json.dumps(result, indent=1, default=str))
    return result


def visualize_demo(cfg, checkpoint: str, images: Path, out: Path, report: str) -> list[Path]:
    """Fig. 5 (P, P-hat-r, P-hat-c) on three validation images and Fig. 6 (AP vs IoU) of the report."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.inference import load_model_for_inference
    from pipeline.plots import plot_ap_by_level, plot_ap_vs_iou
    from pipeline.visualize import draw_tsd, tsd_geometry

    out.mkdir(parents=True, exist_ok=True)
    model = load_model_for_inference(cfg, checkpoint, torch.device("cpu"))
    names = load_label_space(cfg.data)[0].names
    written = []
    for path in sorted(images.glob("*.jpg"))[:3]:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        drawing = draw_tsd(image, tsd_geometry(model, image), names)
        written.append(out / f"{path.stem}_tsd.png")
        Image.fromarray(drawing.permute(1, 2, 0).numpy()).save(written[-1])
    data = json.loads(Path(report).read_text())
    plot_ap_vs_iou(out / "ap_vs_iou.png", {"TSD (tiny)": data})
    plot_ap_by_level(out / "ap_by_level.png", {"TSD (tiny)": data})
    return [*written, out / "ap_vs_iou.png", out / "ap_by_level.png"]


def print_summary(result: dict) -> None:
    metrics = result["final_metrics"] or {}
    losses = {k: v for k, v in metrics.items() if k.startswith("loss_")}
    print(f"\ndemo finished in {result['seconds']:.0f} s")
    print(f"  dataset:     {result['dataset']}")
    print(f"  shards:      {result['shards']}  (manifest: {result['manifest']})")
    print(f"  run:         {result['run']}, {metrics.get('iteration')} iterations, "
          f"final loss {sum(losses.values()):.3f}")
    print(f"  checkpoint:  {result['checkpoint']}")
    print(f"  validation:  mAP@0.5 = {result['mAP@0.5']:.3f} (official OID metric), mAP@[.5:.95] = "
          f"{result['mAP@[.5:.95]']:.3f}; report {result['report']}")
    if result.get("mAP_by_level"):
        from pipeline.scoring import level_summary

        print(f"               {level_summary({'by_level': result['mAP_by_level']})}")
    print(f"  submission:  {result['submission']} ({result['submission_counts']['images']} images, "
          f"{result['submission_counts']['detections']} detections, validated)")
    print(f"  figures:     {', '.join(result['figures'])}")
    print(f"  TensorBoard: tensorboard --logdir {result['tensorboard']} --host 127.0.0.1")
