"""The ``tsd`` command line: one subcommand per job of the pipeline.

Errors a user can fix are printed as one line naming the file, row or key, with a non-zero exit
code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from data_prep.errors import TsdError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML experiment file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set prep.seed=3 (repeatable)")


def cmd_synth(args: argparse.Namespace) -> int:
    from data_prep.synthetic import generate

    summary = generate(args.out, num_train=args.num_train, num_validation=args.num_validation, seed=args.seed,
                       progress=not args.quiet)
    if args.coco:
        from data_prep.synthetic import export_coco

        summary["coco"] = export_coco(args.out)
    Path(args.out, "synth-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for split, s in summary["splits"].items():
        print(f"{split}: {s['images_count']} images, {s['boxes_count']} boxes, "
              f"{s['image_labels_count']} image-level labels -> {Path(args.out, s['images'])}")
    return 0


def cmd_prep(args: argparse.Namespace) -> int:
    from data_prep.prep import run_prep, summary_lines
    from pipeline.config import dump_config, load_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"data.shards={args.output}")
    if args.s3_endpoint_url:
        overrides.append(f"data.s3_endpoint_url={args.s3_endpoint_url}")
    if args.split:
        overrides.append(f"prep.splits=[{','.join(args.split)}]")
    cfg = load_config(args.config, overrides)
    manifest = run_prep(cfg.data, cfg.prep, address=args.address, progress=not args.quiet,
                        resolved_config=dump_config(cfg), verify=args.verify)
    for line in summary_lines(manifest):
        print(line)
    print(f"manifest: {manifest['output'].rstrip('/')}/manifest.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train import run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, address=args.address, resume=args.resume, verbose=args.verbose)
    metrics = summary["metrics"] or {}
    print(f"run {summary['run']}: finished at iteration {metrics.get('iteration')} "
          f"(epoch {metrics.get('epoch')}, {metrics.get('restarts', 0)} restarts, "
          f"{metrics.get('nonfinite_skipped', 0)} non-finite steps skipped)")
    print(f"  last checkpoint: {summary['checkpoint']}")
    print(f"  resolved config: {summary['config']}")
    print(f"  TensorBoard:     tensorboard --logdir {summary['tensorboard']} --host 127.0.0.1")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import print_summary, run_demo

    print_summary(run_demo(args.workdir, args.config, args.overrides, verbose=args.verbose))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.oid_metric import COCO_STYLE_THRESHOLDS
    from pipeline.scoring import level_summary, score_files, write_report

    thresholds = (0.5,) if not args.all_thresholds else (0.5, *[t for t in COCO_STYLE_THRESHOLDS if t != 0.5])
    data = score_files(args.boxes, args.labels, args.hierarchy, args.classes, args.predictions, thresholds,
                       args.s3_endpoint_url)
    write_report(args.out, data)
    print(f"mAP@0.5 = {data['mAP']:.4f} over {data['num_classes_with_positives']} classes, "
          f"{data['num_images']} images, {data['num_predictions']} predictions -> {args.out}")
    if level_summary(data):
        print(f"  {level_summary(data)}")
    bad = data["predictions_rejected_non_finite"]
    if bad["rows"]:
        print(f"tsd score: warning: {bad['rows']} prediction rows with NaN / inf values were left out "
              f"(lines {', '.join(map(str, bad['lines'][:5]))}{', ...' if bad['rows'] > 5 else ''})", file=sys.stderr)
    dropped = (data.get("ground_truth_rejects") or {}).get("counts") or {}
    if dropped:
        print(f"tsd score: warning: {sum(dropped.values())} ground-truth rows were dropped "
              f"({', '.join(f'{k}: {v}' for k, v in dropped.items())}; report: ground_truth_rejects)", file=sys.stderr)
    return 0


def cmd_submission(args: argparse.Namespace) -> int:
    from pipeline.submission import check_submission

    if args.check:
        known = None
        if args.classes:
            from data_prep.labels import LabelSpace
            from data_prep.storage import read_source

            known = set(LabelSpace.from_csv_text(read_source(args.classes).decode("utf-8-sig"), args.classes).mids)
        expected = None
        if args.images:
            from pipeline.submission import expected_image_ids

            expected = expected_image_ids(args.images)
        counts = check_submission(args.check, known, expected)
        print(f"{args.check}: valid, {counts['images']} images, {counts['detections']} detections"
              + (f", every one of the {len(expected)} expected images listed once" if expected is not None else ""))
        return 0
    from pipeline.config import load_config
    from pipeline.evaluate import run_submission

    if not (args.config and args.images and args.out):
        raise TsdError("give --check FILE, or --config, --checkpoint, --images and --out")
    cfg = load_config(args.config, args.overrides)
    if not (args.checkpoint or cfg.ensemble.members):
        raise TsdError("give --checkpoint (several for an ensemble) or ensemble.members in the config")
    counts = run_submission(cfg, args.checkpoint, args.images, args.out, address=args.address)
    print(f"{args.out}: {counts['images']} images, {counts['detections']} detections")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import checkpoint_iteration
    from pipeline.config import load_config
    from pipeline.evaluate import run_evaluation
    from pipeline.scoring import level_summary

    cfg = load_config(args.config, args.overrides)
    if not (args.checkpoint or cfg.ensemble.members):
        raise TsdError("give --checkpoint (several for an ensemble) or ensemble.members in the config")
    single = args.checkpoint[0] if len(args.checkpoint) == 1 and not cfg.ensemble.members else None
    data = run_evaluation(cfg, args.checkpoint, args.split, args.out, address=args.address,
                          tensorboard_dir=args.tensorboard,
                          iteration=single and checkpoint_iteration(single, cfg.data.s3_endpoint_url))
    if "metric" in data:  # COCO datasets
        print(f"{args.split}: COCO AP = {data['AP']:.4f}, AP50 = {data['AP50']:.4f}, AP75 = {data['AP75']:.4f} "
              f"({data['num_images']} images, {data['num_detections']} detections)")
    else:
        print(f"{args.split}: mAP@0.5 = {data['mAP']:.4f} over {data['num_classes_with_positives']} classes "
              f"({data['num_images']} images, {data['num_detections']} detections); "
              f"mAP@[.5:.95] = {data.get('mAP_50_95', float('nan')):.4f}")
        if level_summary(data):
            print(f"  {level_summary(data)}")
    for name, path in data["files"].items():
        print(f"  {name}: {path}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from cluster import jobs

    args.address = args.address or os.environ.get("RAY_ADDRESS")
    if not args.address:
        raise TsdError("give --address http://HEAD:8265 or set RAY_ADDRESS (as `ray job` does)")
    if args.job_command == "submit":
        env = dict(item.split("=", 1) for item in args.env)
        job_id = jobs.submit(args.address, args.cmd, working_dir=args.working_dir, pip=args.pip or None,
                             env=env or None, num_cpus=args.entrypoint_num_cpus, submission_id=args.job_id)
        print(job_id)
        if not args.no_wait:  # like `ray job submit`: follow the logs, exit code = the job's outcome
            return _follow(jobs, args.address, job_id)
        return 0
    if args.job_command == "status":
        print(jobs.status(args.address, args.job_id))
        return 0
    if args.job_command == "logs":
        if args.follow:
            return _follow(jobs, args.address, args.job_id)
        print(jobs.logs(args.address, args.job_id), end="")
        return 0
    if args.job_command == "stop":
        print("stopped" if jobs.stop(args.address, args.job_id) else "not running")
        return 0
    for job in jobs.list_jobs(args.address):
        print(f"{job['job_id']}\t{job['status']}\t{job['entrypoint']}")
    return 0


def _follow(jobs, address: str, job_id: str) -> int:
    for chunk in jobs.follow(address, job_id):
        print(chunk, end="", flush=True)
    state = jobs.status(address, job_id)
    print(f"\njob {job_id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def _read_report(path: str) -> dict:
    """A ``report.json`` of `tsd evaluate` / `tsd score`, or one clear error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TsdError(f"{path}: no such report") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TsdError(f"{path}: not a JSON report ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or "ap_at_iou" not in data or "mAP" not in data:
        raise TsdError(f"{path}: not a report of `tsd evaluate` or `tsd score` (no 'mAP' / 'ap_at_iou')")
    return data


def _run_name(path: str, data: dict) -> str:
    """A report's default label: the name of the run its checkpoint belongs to (else its folder)."""
    checkpoint = Path(str(data.get("checkpoint") or ""))
    if checkpoint.name:
        return checkpoint.parent.name if checkpoint.name.startswith(("checkpoint", "state")) else checkpoint.name
    return Path(path).resolve().parent.name


def cmd_visualize(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        from pipeline.plots import plot_ap_vs_iou

        labels = list(args.label or [])
        if len(labels) > len(args.report):
            raise TsdError(f"{len(labels)} --label for {len(args.report)} --report")
        reports: dict[str, dict] = {}
        for k, path in enumerate(args.report):
            data = _read_report(path)
            label = labels[k] if k < len(labels) else _run_name(path, data)
            reports[label if label not in reports else f"{label} #{k + 1}"] = data
        plot_ap_vs_iou(out / "ap_vs_iou.png", reports)
        print(f"{out / 'ap_vs_iou.png'}")
        if all("by_level" in r for r in reports.values()):  # OID reports: AP of leaves, parents, depths
            from pipeline.plots import plot_ap_by_level

            plot_ap_by_level(out / "ap_by_level.png", reports)
            print(f"{out / 'ap_by_level.png'}")
    if args.images:
        if not (args.config and args.checkpoint):
            raise TsdError("--images needs --config and --checkpoint")
        from pipeline.visualize_job import visualize_images

        for path in visualize_images(args.config, args.overrides, args.checkpoint, args.images, out, args.limit):
            print(path)
    if not (args.report or args.images):
        raise TsdError("give --images (with --config and --checkpoint) and/or --report")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from tsd_model.build import build_model
    from tsd_model.info import model_info

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, load_weights=False)  # counts and FLOPs need no weights
    info = model_info(model, None if args.no_flops else (args.height, args.width))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{cfg.name}: {cfg.model.backbone.name} backbone, {cfg.model.roi.head} head"
          f"{' (cascade)' if cfg.model.cascade.enabled else ''}, {cfg.model.num_classes} classes")
    print(f"  parameters, total:        {info['total_params']:>13,}")
    print(f"  parameters, at inference: {info['inference_params']:>13,}"
          + (f"  (without {', '.join(info['skipped_at_inference'])})" if info["skipped_at_inference"] else ""))
    for name, n in info["params_by_module"].items():
        print(f"    {name:<22} {n:>13,}")
    if "flops" in info:
        h, w = info["flops_image"]
        print(f"  FLOPs for one {h}x{w} image: {info['flops'] / 1e9:,.1f} G")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    import torch

    from tsd_model.convert import convert_file

    converted = convert_file(args.source, args.input)
    from data_prep.storage import write_atomically

    out = Path(args.out)
    checkpoint = {"model": converted.state, "converted_from": {"source": args.source, "file": str(args.input)}}
    write_atomically(out, lambda f: torch.save(checkpoint, f))
    print(f"{args.input} ({args.source}) -> {out}: {len(converted.state)} tensors")
    print("run it with these settings (a config's model section, or --set):")
    for line in [*converted.overrides, f"model.weights.checkpoint={out}"]:
        print(f"  --set {line}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tsd-oid")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


class _SubcommandParsers(argparse._SubParsersAction):
    """Subcommand parsers that also take the common options (``--debug`` after the subcommand too)."""

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show tracebacks of errors")
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsd", description="TSD object detectors on OpenImages, on Ray.")
    parser.register("action", "parsers", _SubcommandParsers)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"tsd-oid {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a small synthetic dataset in the official OID formats")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-validation", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coco", action="store_true", help="also write COCO instances JSON files (annotations/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prep", help="shard the OID files and images into webdataset tars (Ray tasks)")
    _add_config_args(p)
    p.add_argument("--split", action="append", help="split(s) to prepare (default: prep.splits)")
    p.add_argument("--output", help="local dir or s3://bucket/prefix (overrides data.shards)")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (overrides data.s3_endpoint_url)")
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); default: a local Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="first re-check every shard against the manifest (size, then S3's kept CRC32 or a full "
                        "sha256 read), rewrite the bad ones, and write verify-report.json")
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("train", help="train a detector with Ray Train (DDP), with checkpoints and TensorBoard")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); default: a local Ray")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")
    p.add_argument("--verbose", action="store_true", help="Ray Train's own log lines too (kept at warnings otherwise)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the whole job end to end on the bundled synthetic dataset")
    p.add_argument("--workdir", default="work", help="where the dataset, shards and runs go")
    p.add_argument("--verbose", action="store_true", help="Ray Train's own log lines too (kept at warnings otherwise)")
    _add_config_args(p, required=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="distributed inference on a prepared split + the official OID metric")
    _add_config_args(p)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a run, checkpoint directory or state.pt of `tsd train`; give it several times for an "
                        "ensemble (merged by ensemble.method; or list ensemble.members in the config)")
    p.add_argument("--split", default="validation")
    p.add_argument("--out", help="output directory (default: next to the checkpoint)")
    p.add_argument("--tensorboard", help="log the mAP into this TensorBoard directory (the run's)")
    p.add_argument("--address", help="Ray cluster to join; default: a local Ray")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score a predictions file with the official OID challenge metric")
    p.add_argument("--boxes", required=True, help="ground-truth box CSV (validation layout or train layout)")
    p.add_argument("--labels", help="image-level label CSV (verified positives and negatives)")
    p.add_argument("--hierarchy", required=True, help="the class hierarchy JSON")
    p.add_argument("--classes", required=True, help="the class-description CSV (the label space)")
    p.add_argument("--predictions", required=True, help="TF-evaluator CSV or Kaggle submission CSV")
    p.add_argument("--out", required=True, help="report.json to write")
    p.add_argument("--all-thresholds", action="store_true", help="also AP at IoU 0.55..0.95 and mAP@[.5:.95]")
    p.add_argument("--s3-endpoint-url")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("submission", help="write a Kaggle submission file, or validate one (--check)")
    p.add_argument("--check", metavar="FILE", help="validate FILE and report the first bad lines")
    p.add_argument("--classes", help="with --check: reject MIDs outside this class-description CSV")
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a run, checkpoint directory or state.pt of `tsd train`; several for an ensemble")
    p.add_argument("--images", help="directory or s3:// prefix of the test images; with --check, also a file "
                                    "listing the expected ImageIDs (CSV with an ImageID column, or one per line)")
    p.add_argument("--out", help="submission.csv to write")
    p.add_argument("--address", help="Ray cluster to join; default: a local Ray")
    p.set_defaults(func=cmd_submission)

    p = sub.add_parser("job", help="submit tsd commands to a Ray cluster (Ray Jobs) and follow them")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    q = jsub.add_parser("submit", help="submit a command: tsd job submit --address URL -- tsd train --config ...")
    q.add_argument("--address", help="the job server, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    q.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    q.add_argument("--pip", action="append", help="extra pip requirement for the job's environment (repeatable)")
    q.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable (repeatable). The value is stored in the job's runtime environment, "
                        "which anyone with access to the dashboard can read: never pass secrets here, use the "
                        "cloud's own mechanisms (an IAM instance role on AWS, a Kubernetes Secret on KubeRay)")
    q.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the entrypoint process")
    q.add_argument("--job-id", help="a submission id of your choice")
    q.add_argument("--no-wait", action="store_true", help="return once submitted (default: follow the logs until "
                                                             "the job ends, exit code = its outcome)")
    q.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    q.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    for action in ("status", "logs", "stop"):
        q = jsub.add_parser(action, help=f"{action} of a job")
        q.add_argument("job_id")
        q.add_argument("--address", help="the job server (default: $RAY_ADDRESS)")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends; exit code = outcome")
    q = jsub.add_parser("list", help="the cluster's jobs")
    q.add_argument("--address", help="the job server (default: $RAY_ADDRESS)")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("visualize", help="TSD's P, P-hat-r and P-hat-c on images (paper Fig. 5); AP vs IoU plots")
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", help="a run, checkpoint directory or state file of `tsd train`")
    p.add_argument("--images", help="a directory of images (or one image file)")
    p.add_argument("--limit", type=int, default=8, help="at most this many images")
    p.add_argument("--report", action="append", help="report.json of `tsd evaluate` (repeat: TSD vs baseline)")
    p.add_argument("--label", action="append", help="the legend label of each --report, in order (default: its run)")
    p.add_argument("--out", required=True, help="output directory for the PNG files")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("config", help="print a config as it resolves (defaults, file, --set overrides)")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("show", help="tsd config show --config FILE [--set key=value ...]: the resolved YAML")
    _add_config_args(q)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("weights", help="convert checkpoints of torchvision or the TSD authors into ours")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    q = wsub.add_parser("convert", help="tsd weights convert --from torchvision|mmdet-v1-tsd IN.pth OUT.pt")
    q.add_argument("--from", dest="source", required=True, choices=["torchvision", "mmdet-v1-tsd"],
                   help="torchvision: a Faster R-CNN state dict (fasterrcnn_resnet50_fpn); mmdet-v1-tsd: a checkpoint "
                        "released by the TSD authors (Sense-X/TSD)")
    q.add_argument("input", help="the source file (.pth)")
    q.add_argument("out", help="our checkpoint to write (load it with model.weights.checkpoint)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("model-info", help="parameter counts and FLOPs of a config's detector")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it runs one forward pass)")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.set_defaults(func=cmd_model_info)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)subcommand's own parser, for its usage line in an error."""
    current = parser
    for dest in ("command", "job_command", "weights_command", "config_command"):
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest]
        name = getattr(args, dest, None)
        if not actions or name not in actions[0].choices:
            break
        current = actions[0].choices[name]
    return current


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not (getattr(args, "cmd", None) is not None and args.command == "job"):
        _subcommand_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args)
    except BrokenPipeError:  # `tsd model-info ... | head -1`: the reader left; end quietly, as a shell tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _run(args: argparse.Namespace) -> int:
    if not getattr(args, "address", None) and not os.environ.get("RAY_ADDRESS") and args.command != "job":
        from data_prep.ray_runtime import keep_on_loopback

        keep_on_loopback()  # before anything imports ray: a local Ray listens on 127.0.0.1 only
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TsdError as exc:
        if args.debug:
            raise
        print(f"tsd {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"tsd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
