"""Ray Jobs: a real local head (`ray start --head` on 127.0.0.1 with the job server) runs a tiny
`tsd prep` and `tsd train` submitted with `tsd job submit`; logs are followed to the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import jobs
from data_prep.synthetic import generate
from pipeline.cli import main
from tests.conftest import REPO, free_port


def _start_head(auth: dict[str, str]):
    """`ray start --head` on 127.0.0.1 with the job server; (process, job server address)."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    env = {**os.environ, **auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's `python`
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--temp-dir", temp_dir, "--num-cpus", "2", "--block"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not start")
            time.sleep(1)
    return proc, address


def _stop_head(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def head():
    proc, address = _start_head({"RAY_AUTH_MODE": "disabled"})
    deadline = time.monotonic() + 120
    while True:  # the dashboard port opens before the job server answers
        try:
            jobs.list_jobs(address)
            break
        except Exception:
            if time.monotonic() > deadline:
                _stop_head(proc)
                pytest.fail("the Ray job server did not answer")
            time.sleep(1)
    yield address
    _stop_head(proc)


def test_tsd_job_against_a_head_with_token_authentication():
    """A cluster started as the shipped configs start theirs (RAY_AUTH_MODE=token): `tsd job` works
    with the token from the environment, and without it fails in one clear line."""
    token = "tsd-test-" + "0123456789abcdef" * 2
    proc, address = _start_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        def tsd_job(*args, **auth):
            env = {**os.environ, "PYTHONPATH": str(REPO), **auth}
            env.pop("RAY_ADDRESS", None)
            return subprocess.run([sys.executable, "-m", "pipeline.cli", "job", *args, "--address", address],
                                  capture_output=True, text=True, env=env, timeout=180)

        deadline = time.monotonic() + 120
        while (ok := tsd_job("list", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"tsd job list with the token failed: {ok.stderr[-2000:]}")
            time.sleep(2)
        refused = tsd_job("list", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token-" + "x" * 18)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    finally:
        _stop_head(proc)


def test_entrypoint_and_runtime_env():
    assert jobs.entrypoint_for(["tsd", "train", "--config", "a b.yaml"]) == "python -m pipeline.cli train --config 'a b.yaml'"
    env = jobs.runtime_env(str(REPO), ["boto3"], {"A": "1"})
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"] and env["pip"] == ["boto3"]
    assert {"data", "runs", "shards", "work"} <= set(env["excludes"])  # the OID data is never uploaded
    with pytest.raises(jobs.JobError, match="no command"):
        jobs.entrypoint_for([])


def test_unreachable_job_server_is_one_clear_error(capsys):
    assert main(["job", "list", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err


def test_prep_and_train_jobs_run_on_the_cluster(head, tmp_path, capsys):
    generate(tmp_path / "synth", num_train=12, num_validation=0, seed=1)
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.root={tmp_path / 'synth'}",
              "--set", f"data.shards={tmp_path / 'shards'}"]
    rc = main(["job", "submit", "--address", head, "--working-dir", str(REPO), "--env", "RAY_AUTH_MODE=disabled",
               "--follow", "--", "tsd", "prep", *common, "--split", "train", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-2000:]
    job_id = out.out.splitlines()[0].strip()
    assert jobs.status(head, job_id) == "SUCCEEDED"
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["counts"]["images_written"] == 12
    assert "train: 12 images" in jobs.logs(head, job_id)

    rc = main(["job", "submit", "--address", head, "--working-dir", str(REPO), "--no-wait", "--", "tsd", "train", *common,
               "--set", "train.max_iterations=3", "--set", "train.checkpoint_every=3",
               "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", f"train.local_dir={tmp_path / 'runs'}",
               "--set", "train.run_name=job", "--set", "loader.num_workers=0"])
    job_id = capsys.readouterr().out.strip().splitlines()[0]
    assert rc == 0
    assert main(["job", "logs", job_id, "--address", head, "--follow"]) == 0
    followed = capsys.readouterr().out
    assert "run job: finished at iteration 3" in followed
    assert list((tmp_path / "runs" / "job").glob("checkpoint_*/state.pt"))
    assert main(["job", "list", "--address", head]) == 0
    assert job_id in capsys.readouterr().out


def test_a_failing_job_gives_a_failing_exit_code(head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", head)  # as `ray job` does; and submit follows the logs by default
    rc = main(["job", "submit", "--working-dir", str(REPO), "--", "tsd", "prep", "--config", "/nonexistent.yaml"])
    out = capsys.readouterr()
    assert rc == 1 and "config file not found" in out.out and "FAILED" in out.err


def test_a_job_command_needs_an_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["job", "list"]) == 2
    assert "give --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err
