"""The KubeRay RayJob manifests (jobs/k8s/), checked offline against the package they run.

Each manifest must load as one `ray.io/v1` RayJob; every container runs the one image built by
jobs/k8s/Dockerfile, whose base is the Ray (and Python) that pyproject pins and cluster.yaml uses; the
entrypoint runs an existing jobs/*.py from where the Dockerfile puts the checkout, and its arguments
are accepted by the same parser and config loader `fipray` uses (an unknown flag or key fails here).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "jobs" / "k8s"
MANIFESTS = sorted(K8S.glob("rayjob-*.yaml"))


def _dockerfile() -> tuple[str, str]:
    """(base image, the folder the checkout is copied to) from jobs/k8s/Dockerfile."""
    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M)
    assert base and workdir, "jobs/k8s/Dockerfile needs FROM and WORKDIR"
    return base.group(1), workdir.group(1)


def _pinned_ray() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins no ray version"
    return m.group(1)


def _containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    pods += [job["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in job["spec"] else []
    return [c for p in pods for c in p["spec"]["containers"]]


def test_there_is_a_manifest_for_paths_and_for_sweep():
    assert [m.name for m in MANIFESTS] == ["rayjob-paths.yaml", "rayjob-sweep.yaml"]


def test_dockerfile_base_matches_the_pinned_ray_and_cluster_yaml():
    base, _ = _dockerfile()
    ray_version = _pinned_ray()
    assert base.startswith(f"rayproject/ray:{ray_version}-py{sys.version_info.major}{sys.version_info.minor}")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == base  # one image family for `ray up` and for KubeRay


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_a_rayjob_consistent_with_the_package(manifest):
    from fipray.cli import _load_job, _parser, commands

    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == _pinned_ray()
    assert spec["shutdownAfterJobFinishes"] is True  # no GPU cluster left running after the job
    # One image everywhere (head, workers, submitter): the one the Dockerfile builds.
    images = {c["image"] for c in _containers(job)}
    assert len(images) == 1, images
    # The entrypoint: python <workdir>/jobs/<command>.py, a file of this repository, and arguments that
    # fipray's own parser and config loader accept.
    _, workdir = _dockerfile()
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(workdir + "/")
    script = ROOT / argv[1][len(workdir) + 1:]
    assert script.is_file() and script.parent.name == "jobs", argv[1]
    command = script.stem
    assert command in ("paths", "sweep") and manifest.name == f"rayjob-{command}.yaml"
    args = _parser(commands()).parse_args([command, *argv[2:]])
    assert str(args.config).startswith(workdir + "/")
    args.config = ROOT / str(args.config)[len(workdir) + 1:]
    assert args.config.is_file(), args.config
    jc = _load_job(args, command == "sweep", [])
    # Storage a cluster without a shared filesystem can use, and GPUs Ray can pack onto the workers.
    assert jc.ray.storage_path.startswith("s3://")
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert jc.cfg.device.startswith("cuda") and 0 < jc.ray.gpus_per_path <= max(gpus)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"  # drivers only on the head
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    # Credentials from a Secret (or a service account), never written into the manifest.
    text = manifest.read_text()
    assert "AWS_SECRET_ACCESS_KEY:" not in text and not re.search(r"AKIA[0-9A-Z]{12,}", text)
    for c in _containers(job):
        for e in c.get("env", []):
            assert not e["name"].startswith("AWS_"), e
