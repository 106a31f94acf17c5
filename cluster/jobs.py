"""Submitting `tsd` commands to a Ray cluster as Ray Jobs, and following them.

The driver half only: build the runtime environment (the project as ``working_dir``, extra pip
packages, environment variables), submit the entrypoint through Ray's ``JobSubmissionClient``,
report status, stream logs, stop, list. A ``tsd ...`` entrypoint is run as
``python -m pipeline.cli ...`` so that it works wherever the project is importable (installed in
the cluster's image, or uploaded as the working directory), whatever the head's ``PATH`` holds.

The address is the job server's URL: ``http://HEAD:8265``, or ``https://HOST:PORT`` when a TLS-terminating
proxy (an ingress, a load balancer) sits in front of the dashboard. An https server's certificate is verified
against the CA bundle named by ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``), else the default one (certifi).
A cluster with token authentication (``RAY_AUTH_MODE=token``) is given its token the way Ray takes it:
``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``. A refused token, an untrusted
certificate or a failed TLS handshake is one ``JobError`` line that says what to set.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import ssl
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


CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")  # the ones requests honours, in its order
TOKEN_HINT = "give the cluster's token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN=TOKEN or RAY_AUTH_TOKEN_PATH=FILE"


def _verify(address: str) -> bool | str:
    """Ray's ``verify`` for ``address``: the CA bundle requests would use, given explicitly (so that every
    transport of Ray's client trusts the same CA), else True (the default bundle)."""
    if not address.lower().startswith("https://"):
        return True
    for name in CA_BUNDLE_VARIABLES:
        path = os.environ.get(name)
        if path:
            if not os.path.exists(path):
                raise JobError(f"{name}={path}: no such file (it names the CA certificates that the https job "
                               f"server's certificate is verified with)")
            try:
                ssl.create_default_context(**({"capath": path} if os.path.isdir(path) else {"cafile": path}))
            except (ssl.SSLError, OSError) as exc:
                raise JobError(f"{name}={path}: not a PEM file of CA certificates ({exc})") from None
            return path
    return True


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it: causes, contexts, and the ones that requests and urllib3
    wrap (``MaxRetryError.reason``, an exception passed as an argument)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        behind = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [e for e in behind if isinstance(e, BaseException)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _explained(address: str, exc: BaseException) -> str | None:
    """One line for a failure with a known remedy (TLS trust, TLS handshake, token), else None."""
    from ray.exceptions import AuthenticationError

    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            why = e.verify_message or e.reason or _first_line(e)
            if "mismatch" in str(why).lower():
                return (f"the TLS certificate of {address} is not valid for that host ({why}): use the host name "
                        f"or IP address the certificate was issued for")
            return (f"the server's TLS certificate is not trusted ({address}: {why}): set REQUESTS_CA_BUNDLE="
                    f"/path/to/ca.pem to the certificate of the CA that signed it (of the server itself if it is "
                    f"self-signed), or use a certificate from a CA in the default bundle")
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return (f"the TLS handshake with {address} failed ({e.reason or _first_line(e)}): is it an https "
                    f"endpoint? (a dashboard without a TLS proxy in front is http://HOST:8265)")
    for e in chain:
        if isinstance(e, AuthenticationError):
            message = _first_line(e)
            if "couldn't find" in message or "no authentication token" in message:
                return f"no authentication token found here for {address}: {TOKEN_HINT}"
            reason = message.split(": ", 1)[-1].rstrip(".")  # "Authentication failed: Forbidden: ..." -> "Forbidden: ..."
            return f"the Ray job server at {address} refused the request ({reason}): {TOKEN_HINT}"
    return None


@contextlib.contextmanager
def _errors(address: str, describe):
    """Any failure inside becomes one ``JobError`` line: an explained one, else ``describe(reason)``."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        raise JobError(_explained(address, exc) or describe(_first_line(exc))) from None


ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's client prefers to its argument


@contextlib.contextmanager
def _without_address_variables():
    """Ray's client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given; the
    CLI has already chosen (``--address``, else $RAY_ADDRESS), so the given address must win."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    verify = _verify(address)
    # connection refused, wrong address, TLS, auth: the constructor already asks the server for its version
    with _errors(address, lambda why: f"cannot reach the Ray job server at {address} ({why})"), \
            _without_address_variables():
        return JobSubmissionClient(address, verify=verify)


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
    with _errors(address, lambda why: f"submission to {address} failed: {why}"):
        return client.submit_job(entrypoint=entrypoint_for(command), runtime_env=runtime_env(working_dir, pip, env),
                                 submission_id=submission_id, entrypoint_num_cpus=num_cpus,
                                 entrypoint_num_gpus=num_gpus, metadata={"submitted_by": "tsd job submit"})


def _job_errors(address: str, job_id: str):
    return _errors(address, lambda why: f"no job {job_id} at {address} ({why})")


def status(address: str, job_id: str) -> str:
    client = _client(address)
    with _job_errors(address, job_id):
        return str(client.get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    client = _client(address)
    with _job_errors(address, job_id):
        return client.get_job_logs(job_id)


def follow(address: str, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """Yield new log text until the job ends (polling; works on every Ray version and transport)."""
    client = _client(address)
    seen = 0
    while True:
        with _job_errors(address, job_id):
            state = str(client.get_job_status(job_id).value)
            text = client.get_job_logs(job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if state in TERMINAL:
            with _job_errors(address, job_id):
                text = client.get_job_logs(job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(poll_s)


def stop(address: str, job_id: str) -> bool:
    client = _client(address)
    with _job_errors(address, job_id):
        return bool(client.stop_job(job_id))


def list_jobs(address: str) -> list[dict]:
    client = _client(address)
    with _errors(address, lambda why: f"listing the jobs at {address} failed: {why}"):
        jobs = client.list_jobs()
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
             "start_time": j.start_time, "end_time": j.end_time} for j in jobs]
