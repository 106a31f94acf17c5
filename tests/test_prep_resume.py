"""Killing the prep job mid-way and re-running it gives exactly the result of an uninterrupted run.

The job runs as a real ``tsd prep`` process with its own embedded Ray; the test kills the whole
process group with SIGKILL once some, but not all, shards are published.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from data_prep.synthetic import generate
from tests.conftest import REPO

N_TRAIN = 48


def _cmd(synth: Path, out: Path) -> list[str]:
    # one image per shard, big images re-encoded by the resize, one task at a time: a slow job
    return [sys.executable, "-m", "pipeline.cli", "prep", "--config", str(REPO / "configs" / "tiny.yaml"),
            "--set", f"data.root={synth}", "--output", str(out), "--split", "train", "--quiet",
            "--set", "prep.max_samples_per_shard=1", "--set", "prep.resize_short_side=320",
            "--set", "prep.num_cpus_per_task=2"]


def test_killed_prep_resumes_to_an_identical_result(tmp_path):
    synth = tmp_path / "synth"
    generate(synth, num_train=N_TRAIN, num_validation=0, seed=9, min_size=700, max_size=900)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cmd(synth, out), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reports = out / "_shards"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            done = len(list(reports.glob("*.json"))) if reports.exists() else 0
            if done >= 3 or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(reports.glob("*.json")))
    assert 3 <= done < N_TRAIN, f"the job must be killed mid-way ({done} of {N_TRAIN} shards done)"
    assert not (out / "manifest.json").exists() or "train" not in json.loads((out / "manifest.json").read_text()).get(
        "splits", {})
    # whatever is visible is complete: every published tar reads to its end
    for tar_path in out.glob("train-*.tar"):
        with tarfile.open(tar_path) as tar:
            assert len(tar.getmembers()) == 2

    resumed = subprocess.run(_cmd(synth, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = subprocess.run(_cmd(synth, tmp_path / "clean"), env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed_manifest = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    clean_manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())["splits"]["train"]
    assert resumed_manifest["counts"]["shards_skipped_complete"] >= 3
    assert resumed_manifest["shards"] == clean_manifest["shards"]
    assert (out / "train-index.parquet").read_bytes() == (tmp_path / "clean" / "train-index.parquet").read_bytes()
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in (tmp_path / "clean").glob("*.tar"))
