"""The tsd command line: subcommands run, user errors are one line with a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.cli import EXIT_USER_ERROR, main
from tests.conftest import REPO


def _tsd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_synth_writes_the_dataset_and_a_summary(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--num-train", "5", "--num-validation", "2", "--quiet"]) == 0
    assert "train: 5 images" in capsys.readouterr().out
    assert (tmp_path / "synth-summary.json").is_file() and len(list((tmp_path / "train").glob("*.jpg"))) == 5


@pytest.mark.parametrize("args, message", [
    (["prep", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: config file not found"),
    (["prep", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "prep.bogus=1"],
     "unknown config key 'prep.bogus'"),
    (["prep", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "data.root=/nonexistent"],
     "/nonexistent/classes-description.csv: no such file"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
    result = _tsd(*args)
    assert result.returncode == EXIT_USER_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("tsd prep: error:")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = _tsd("--debug", "prep", "--config", "/nonexistent.yaml")
    assert result.returncode not in (0, EXIT_USER_ERROR) and "Traceback" in result.stderr
    assert "ConfigError" in result.stderr


def test_missing_split_is_named(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--num-train", "2", "--num-validation", "1", "--quiet"]) == 0
    result = _tsd("prep", "--config", str(REPO / "configs" / "tiny.yaml"), "--split", "test",
                  "--set", f"data.root={tmp_path}", "--output", str(tmp_path / "out"))
    assert result.returncode == EXIT_USER_ERROR
    assert "data.splits has no split 'test' (configured: ['train', 'validation'])" in result.stderr


def test_installed_console_script_runs():
    tsd = os.path.join(os.path.dirname(sys.executable), "tsd")
    if not os.path.exists(tsd):
        pytest.skip("the console script is installed by `pip install -e .` (make test does it)")
    result = subprocess.run([tsd, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "synth" in result.stdout and "prep" in result.stdout


def test_version_and_debug_after_the_subcommand():
    result = _tsd("--version")
    assert result.returncode == 0 and result.stdout.startswith("tsd-oid ")
    result = _tsd("prep", "--config", "/nonexistent.yaml", "--debug")
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_wrong_flag_shows_the_subcommands_usage():
    result = _tsd("synth", "--out", "x", "--bogus")
    assert result.returncode == 2
    assert "usage: tsd synth" in result.stderr and "unrecognized arguments: --bogus" in result.stderr
    result = _tsd("job", "status", "--address", "http://127.0.0.1:1", "id", "--bogus")
    assert "usage: tsd job status" in result.stderr


def test_errors_are_prefixed_once(tmp_path):
    result = _tsd("submission", "--out", str(tmp_path / "s.csv"))
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip() == ("tsd submission: error: give --check FILE, or --config, --checkpoint, "
                                     "--images and --out")


def test_a_closed_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = (f"{sys.executable} -m pipeline.cli model-info --config {REPO / 'configs' / 'tiny.yaml'} --no-flops"
           " | head -1")
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.startswith("tiny:") and len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_visualize_names_a_missing_or_foreign_report(tmp_path):
    result = _tsd("visualize", "--report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "figs"))
    assert result.returncode == EXIT_USER_ERROR and "missing.json: no such report" in result.stderr
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    result = _tsd("visualize", "--report", str(other), "--out", str(tmp_path / "figs"))
    assert result.returncode == EXIT_USER_ERROR and "not a report of `tsd evaluate`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_show_prints_the_resolved_config(capsys):
    import yaml

    assert main(["config", "show", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.weight_decay=1e-3",
                 "--set", "model.tsd.pooling=authors"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["weight_decay"] == 0.001 and shown["model"]["tsd"]["pooling"] == "authors"
    assert shown["model"]["rpn"]["nms_iou"] == 0.7  # defaults the file does not name are shown too
