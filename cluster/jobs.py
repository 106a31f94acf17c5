"""Submitting `tsd` commands to a Ray cluster as Ray Jobs, and following them.

The driver half only: build the runtime environment (the project as ``working_dir``, extra pip
packages, environment variables), submit the entrypoint through Ray's ``JobSubmissionClient``,
report status, stream logs, stop, list. A ``tsd ...`` entrypoint is run as
``python -m pipeline.cli ...`` so that it works wherever the project is importable (installed in
the cluster's image, or uploaded as the working directory), whatever the head's ``PATH`` holds.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import TsdError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# never uploaded as a job's working directory: the local data, outputs and tools (Ray caps an upload
# near 512 MiB, and data/ is where the README puts the ~500 GB of OpenImages)
DEFAULT_EXCLUDES = ["data", ".venv", "work", "runs", "shards", "bench/out", ".git", "**/__pycache__", ".pytest_cache",
                    ".ruff_cache", "*.egg-info"]


class JobError(TsdError):
    """A job could not be submitted or found, or it ended in failure."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, wrong address, auth
        raise JobError(f"cannot reach the Ray job server at {address} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def entrypoint_for(command: list[str]) -> str:
    """The shell entrypoint of a command; a leading ``tsd`` becomes ``python -m pipeline.cli``."""
    if not command:
        raise JobError("no command given (use: tsd job submit --address URL -- tsd train --config ...)")
    if command[0] == "tsd":
        command = ["python", "-m", "pipeline.cli", *command[1:]]
    return shlex.join(command)


def runtime_env(working_dir: str | None, pip: list[str] | None, env: dict[str, str] | None,
                excludes: list[str] | None = None) -> dict:
    out: dict = {}
    if working_dir:
        path = Path(working_dir)
        if not path.is_dir():
            raise JobError(f"--working-dir {working_dir}: not a directory")
        out["working_dir"] = str(path.resolve())
        out["excludes"] = list(excludes or DEFAULT_EXCLUDES)
    if pip:
        out["pip"] = list(pip)
    if env:
        out["env_vars"] = dict(env)
    return out


def submit(address: str, command: list[str], working_dir: str | None = ".", pip: list[str] | None = None,
           env: dict[str, str] | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
           submission_id: str | None = None) -> str:
    """Submit ``command`` (e.g. ``["tsd", "train", "--config", ...]``); returns the job id."""
    client = _client(address)
    try:
        return client.submit_job(entrypoint=entrypoint_for(command), runtime_env=runtime_env(working_dir, pip, env),
                                 submission_id=submission_id, entrypoint_num_cpus=num_cpus,
                                 entrypoint_num_gpus=num_gpus, metadata={"submitted_by": "tsd job submit"})
    except Exception as exc:
        raise JobError(f"submission to {address} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def status(address: str, job_id: str) -> str:
    try:
        return str(_client(address).get_job_status(job_id).value)
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"no job {job_id} at {address} ({str(exc).splitlines()[0]})") from None


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def follow(address: str, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """Yield new log text until the job ends (polling; works on every Ray version and transport)."""
    client = _client(address)
    seen = 0
    while True:
        state = str(client.get_job_status(job_id).value)
        text = client.get_job_logs(job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if state in TERMINAL:
            text = client.get_job_logs(job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(poll_s)


def stop(address: str, job_id: str) -> bool:
    return bool(_client(address).stop_job(job_id))


def list_jobs(address: str) -> list[dict]:
    jobs = _client(address).list_jobs()
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
             "start_time": j.start_time, "end_time": j.end_time} for j in jobs]
