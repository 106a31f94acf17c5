"""Ray Jobs: a real local head (`ray start --head` on 127.0.0.1 with the job server) runs a tiny
`tsd prep` and `tsd train` submitted with `tsd job submit`; logs are followed to the end. A second head
runs with token authentication, reached directly and over https through a TLS-terminating relay (as an
ingress or a load balancer serves a production dashboard)."""

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
from tests.tls_relay import TlsRelay, self_signed_certificate

TOKEN = "tsd-test-" + "0123456789abcdef" * 2
# what a `tsd job` subprocess gets from the test's environment only where a test asks for it
CLIENT_ONLY = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "REQUESTS_CA_BUNDLE",
               "CURL_CA_BUNDLE")


def _start_head(auth: dict[str, str]):
    """`ray start --head` on 127.0.0.1 with the job server; (process, job server address)."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    # the agents' fixed default ports (52365, ...) are taken by any other Ray on this machine: a second head
    # then has no job agent ("No available agent to submit job")
    agent_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                    "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
                   for arg in (flag, str(free_port()))]
    env = {**os.environ, **auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's `python`
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--temp-dir", temp_dir, "--num-cpus", "2", "--block", *agent_ports],
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
    try:  # the raylet and the workers are gone in seconds; the GCS server lingers ~30 s more, for nothing here
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def head():
    proc, address = _start_head({"RAY_AUTH_MODE": "disabled"})
    _wait_for_job_server(proc, lambda: jobs.list_jobs(address) is not None, "the Ray job server")
    yield address
    _stop_head(proc)


def _wait_for_job_server(proc, answers, what: str) -> None:
    """Until ``answers()`` is true (the dashboard port opens before the job server answers)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if answers():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            _stop_head(proc)
            pytest.fail(f"{what} did not answer")
        time.sleep(1)


@pytest.fixture(scope="class")
def token_head():
    """A head started as the shipped configs start theirs (RAY_AUTH_MODE=token); its http address. Class
    scope: it is stopped before the module's other head starts (two heads on a small CI machine crawl)."""
    import requests

    proc, address = _start_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
    _wait_for_job_server(proc, lambda: requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"},
                                                    timeout=5).status_code == 200,
                         "the Ray job server (token authentication)")
    yield address
    _stop_head(proc)


def _tsd_job(address: str, *args: str, command: tuple[str, ...] = (), **env: str):
    """`tsd job ARGS --address ADDRESS [-- COMMAND]` in a process of its own (Ray reads the token once per
    process), with no token, CA bundle or address from the test's environment unless given in ``env``."""
    full_env = {k: v for k, v in os.environ.items() if k not in CLIENT_ONLY}
    full_env.update({"PYTHONPATH": str(REPO), **env})
    argv = [sys.executable, "-m", "pipeline.cli", "job", *args, "--address", address, *(("--", *command) if command else ())]
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=180, cwd=REPO)


def _one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class TestAHeadWithTokenAuthentication:
    """One head with RAY_AUTH_MODE=token for these tests (the `token_head` fixture, class scope)."""

    def test_tsd_job_against_a_head_with_token_authentication(self, token_head):
        """`tsd job` works with the token from the environment, and with a wrong one fails in one clear line."""
        ok = _tsd_job(token_head, "list", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        assert ok.returncode == 0, ok.stderr[-2000:]
        refused = _tsd_job(token_head, "list", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token-" + "x" * 18)
        assert "refused" in _one_error_line(refused) and "RAY_AUTH_TOKEN" in refused.stderr

    def test_tsd_job_over_https_through_a_tls_proxy_with_token_authentication(self, token_head, tmp_path, capsys):
        """The dashboard behind a TLS-terminating proxy (https://HOST:PORT), token authentication on: a job is
        submitted, followed to SUCCEEDED and its logs read back, with the proxy's certificate trusted through
        REQUESTS_CA_BUNDLE and the token from RAY_AUTH_TOKEN_PATH. Without the token, or without trusting the
        certificate, it is one error line that says what to set."""
        cert, key = self_signed_certificate(tmp_path / "tls")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        with TlsRelay(int(token_head.rsplit(":", 1)[1]), cert, key) as relay:
            https = f"https://127.0.0.1:{relay.port}"
            trusted = {"REQUESTS_CA_BUNDLE": str(cert)}
            auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}

            submitted = _tsd_job(https, "submit", command=("python", "-c", "print('hello from a job over https')"),
                                 **trusted, **auth)
            assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
            job_id = submitted.stdout.splitlines()[0].strip()
            assert "hello from a job over https" in submitted.stdout
            assert f"job {job_id}: SUCCEEDED" in submitted.stderr
            read_back = _tsd_job(https, "logs", job_id, **trusted, **auth)
            assert read_back.returncode == 0 and "hello from a job over https" in read_back.stdout, read_back.stderr
            assert relay.connections >= 2  # it did go through the proxy

            # no token sent (RAY_AUTH_MODE at its default, disabled): the server refuses, and the line says what to set
            no_token = _one_error_line(_tsd_job(https, "list", RAY_AUTH_MODE="disabled", **trusted))
            assert "refused" in no_token and "RAY_AUTH_TOKEN" in no_token, no_token
            # token mode on, but no token here (HOME without ~/.ray/auth_token)
            no_file = _one_error_line(_tsd_job(https, "list", RAY_AUTH_MODE="token", HOME=str(tmp_path), **trusted))
            assert "no authentication token" in no_file and "RAY_AUTH_TOKEN_PATH" in no_file, no_file
            # the certificate not trusted (the default CA bundle): the line names the certificate and the remedy
            untrusted = _one_error_line(_tsd_job(https, "list", **auth))
            assert "certificate is not trusted" in untrusted and "REQUESTS_CA_BUNDLE" in untrusted, untrusted

        # https to a dashboard that speaks plain http: the TLS handshake fails, in one line
        assert main(["job", "list", "--address", token_head.replace("http://", "https://")]) == 2
        err = capsys.readouterr().err
        assert "TLS handshake" in err and "https" in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_ca_bundle_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    assert main(["job", "list", "--address", f"https://127.0.0.1:{free_port()}"]) == 2
    assert "REQUESTS_CA_BUNDLE=/nonexistent/ca.pem: no such file" in capsys.readouterr().err


def test_a_certificate_for_another_host_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """A trusted certificate that does not name the host in the address: the line says so (no Ray head
    needed: the TLS handshake fails before any request)."""
    cert, key = self_signed_certificate(tmp_path, hosts=("localhost",))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with TlsRelay(free_port(), cert, key) as relay:
        assert main(["job", "list", "--address", f"https://127.0.0.1:{relay.port}"]) == 2
    err = capsys.readouterr().err
    assert "not valid for that host" in err and "127.0.0.1" in err and len(err.strip().splitlines()) == 1, err


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


def test_an_explicit_address_wins_over_ray_address(monkeypatch):
    """Ray's client silently prefers $RAY_ADDRESS to the address it is given: `tsd job --address X`
    went to the cluster of $RAY_ADDRESS. The address the CLI chose is the one used."""
    from cluster.jobs import JobError, _client

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    with pytest.raises(JobError) as info:
        _client("http://127.0.0.1:7")  # nothing listens on either
    assert "127.0.0.1:7" in str(info.value).split("(", 1)[1] and "127.0.0.1:9" not in str(info.value)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # left as it was
