"""Shared test helpers: the real OID fixtures, a moto S3 server on loopback, small real JPEGs."""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "oid"  # copies of the real files; see its README
SHARED_FIXTURES = (REPO.parent / "shared" / "fixtures" / "oid").resolve()
CHALLENGE_CLASSES = FIXTURES / "challenge2019" / "challenge-2019-classes-description-500.csv"
CHALLENGE_HIERARCHY = FIXTURES / "challenge2019" / "challenge-2019-label500-hierarchy.json"
OIDV6_HIERARCHY = FIXTURES / "oidv6" / "bbox_labels_600_hierarchy.json"

# Everything in the tests talks to 127.0.0.1 only; an embedded Ray stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials for the moto S3 server; set before any Ray worker starts so that workers inherit them.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"})
os.environ.pop("AWS_PROFILE", None)
# Ray Train's controller polls its workers every 2 s by default: a test's runs last seconds, and each
# would wait up to a poll to start and to end. Every Ray process the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Caches (index columns, checkpoint and weights copies) in a directory of the test session, not in ~/.cache
os.environ.setdefault("TSD_CACHE", tempfile.mkdtemp(prefix="tsd-test-cache-"))


def jpeg_bytes(width: int = 32, height: int = 24, mode: str = "RGB", color=(200, 30, 30), exif=None,
               quality: int = 90) -> bytes:
    image = Image.new(mode, (width, height), color if mode in ("RGB", "CMYK") else 120)
    out = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(out, format="JPEG", quality=quality, **kwargs)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1, used through boto3 with endpoint_url."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def tiny_config(synth_root, shards, *overrides: str):
    """The bundled tiny config pointed at a synthetic dataset and an output location."""
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.root={synth_root}", f"data.shards={shards}", *overrides])


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (2 CPUs, loopback only) shared by a test module."""
    from data_prep.ray_runtime import init_ray, shutdown_ray

    started = init_ray(None, num_cpus=2)
    yield
    shutdown_ray(started)
