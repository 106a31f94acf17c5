"""The cluster manifests: the AWS launcher config passes Ray's own schema, the KubeRay RayJob is
complete, and both agree with pyproject.toml and the CLI (versions, install, entrypoint, configs)."""

from __future__ import annotations

import copy
import io
import re
import shlex
import tomllib

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.cli import build_parser
from tests.conftest import REPO

AWS = REPO / "cluster" / "aws.yaml"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    return next(r for r in map(Requirement, _pyproject()["project"]["dependencies"]) if r.name == name)


def _pinned_ray() -> str:
    """The one Ray version of the project: pyproject.toml pins it exactly."""
    (spec,) = _requirement("ray").specifier
    assert spec.operator == "==", "pin Ray: the client and the cluster must run the same version"
    return spec.version


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _validate_aws(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_aws_launcher_config_passes_rays_schema_and_typos_do_not():
    cfg = yaml.safe_load(AWS.read_text())
    _validate_aws(cfg)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        _validate_aws(bad)


def test_aws_config_matches_the_project():
    cfg = yaml.safe_load(AWS.read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert re.match(r"p[45]", gpu["node_config"]["InstanceType"]) and gpu["max_workers"] >= gpu["min_workers"]
    for node in cfg["available_node_types"].values():
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"]  # S3 through a role
    image = cfg["docker"]["image"]
    assert re.search(r"ray:(\d+\.\d+\.\d+)", image).group(1) == _pinned_ray()
    assert "py311" in image and _pyproject()["project"]["requires-python"].startswith(">=3.11")
    mount = next(iter(cfg["file_mounts"]))
    # installs this checkout at the tested versions
    assert any("pip install" in c and f"-c {mount}/constraints.txt" in c and mount in c for c in cfg["setup_commands"])
    assert any("--head" in c and "--dashboard-host" in c for c in cfg["head_start_ray_commands"])
    assert {"data", "runs", "shards", "work", ".venv"} <= set(cfg["rsync_exclude"])  # never synced to the nodes
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"data/", "runs/", "shards/", "weights/"} <= set(ignored)


def test_kuberay_rayjob_is_complete_and_runs_a_real_command():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray()
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
                           for w in workers)
    assert all(w["template"]["spec"]["containers"][0]["image"] == head["image"] for w in workers)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline.cli"]
    args = build_parser().parse_args(argv[3:])  # the entrypoint is a valid tsd command line
    workdir = _dockerfile().structure_workdir()
    assert args.command == "train" and head["workingDir"] == workdir and args.config.startswith(workdir + "/")
    config = REPO / args.config.removeprefix(workdir + "/")  # where the image has it (Dockerfile: COPY configs)
    assert config.is_file() and config.relative_to(REPO).parts[0] in _dockerfile().copied()
    from pipeline.config import load_config

    cfg = load_config(config, args.overrides)  # and its overrides are valid config keys
    total_gpus = sum(int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]
                                             ["nvidia.com/gpu"]) for w in workers)
    assert cfg.train.use_gpu and cfg.train.num_workers == total_gpus


def test_no_shipped_config_exposes_the_dashboard_without_authentication():
    aws = yaml.safe_load(AWS.read_text())
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # loopback: `ray dashboard`'s tunnel
    for commands in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);", head).group(1)
    assert token_path in aws["file_mounts"]  # every node gets the token
    _validate_aws(aws)
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_preflight_names_the_placeholders_and_writes_a_private_token(tmp_path, monkeypatch, capsys):
    from cluster import preflight

    found = preflight.placeholders_in(AWS.read_text())
    assert any("ImageId" in p for p in found) and any("account id" in p for p in found)
    assert any("bucket" in p for p in preflight.placeholders_in(RAYJOB.read_text()))
    filled = AWS.read_text().replace("ami-0a2b3c4d5e6f7a8b9", "ami-0fedcba9876543210").replace("123456789012",
                                                                                              "210987654321")
    assert preflight.placeholders_in(filled) == []
    token = preflight.new_token(tmp_path / "t" / "ray_auth_token")
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) == 64
    monkeypatch.setattr(preflight, "TOKEN_PATH", tmp_path / "none")
    assert preflight.main([str(AWS)]) == 2
    err = capsys.readouterr().err
    assert "ImageId" in err and "no token" in err


class _Dockerfile(DockerfileParser):
    def structure_workdir(self) -> str:
        (workdir,) = [i["value"] for i in self.structure if i["instruction"] == "WORKDIR"]
        return workdir

    def copied(self) -> set[str]:
        """The repository paths the image's COPY instructions take (flags such as --chown dropped)."""
        paths = set()
        for i in self.structure:
            if i["instruction"] == "COPY":
                args = [a for a in shlex.split(i["value"]) if not a.startswith("--")]
                paths.update(args[:-1])
        return paths

    def runs(self) -> list[str]:
        return [i["value"] for i in self.structure if i["instruction"] == "RUN"]


def _dockerfile() -> _Dockerfile:
    return _Dockerfile(fileobj=io.BytesIO((REPO / "Dockerfile").read_bytes()))


def test_the_image_is_rays_pinned_image_with_the_project_at_its_tested_versions():
    dockerfile = _dockerfile()
    image, tag = dockerfile.baseimage.split(":")
    assert image == "rayproject/ray" and tag == f"{_pinned_ray()}-py311-gpu"
    assert _pyproject()["project"]["requires-python"].startswith(">=3.11")
    copied = dockerfile.copied()
    packages = {"tsd_model", "data_prep", "pipeline", "cluster"}  # pyproject's packages.find
    assert set(_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]) == {f"{p}*" for p in packages}
    assert packages | {"configs", "pyproject.toml", "constraints.txt"} <= copied
    assert all((REPO / path).exists() for path in copied)
    installs = [r for r in dockerfile.runs() if "pip install" in r]
    assert installs and all("-c constraints.txt" in r for r in installs)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data/", "runs/", "shards/", "weights/", "work/", ".venv/", ".git/"} <= set(ignored)
    job = yaml.safe_load(RAYJOB.read_text())
    containers = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [w["template"]["spec"]["containers"][0] for w in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert {c["workingDir"] for c in containers} == {dockerfile.structure_workdir()}


def test_constraints_pin_every_dependency_within_pyprojects_ranges():
    pins = _constraints()
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {requirement.name} (run make constraints)"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
        assert any(s.operator in ("==", "<") for s in requirement.specifier), f"{requirement}: no upper bound"
    assert pins["ray"] == _pinned_ray()
    import ray
    import torch

    assert ray.__version__ == pins["ray"] and torch.__version__.split("+")[0] == pins["torch"]  # what ran here
