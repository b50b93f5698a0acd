"""A non-editable install works: build the wheel, install it with --no-deps into a fresh venv that
borrows this environment's dependencies, and run the CLI from another folder. The configs must come
from inside the installed package (no PALMRL_CONFIG_DIR, no checkout on the path)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(ROOT)], check=True, capture_output=True, text=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    wheel = next((work / "dist").glob("palmrl-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages (torch, deepspeed, hydra, ...) as a plain path entry: its .pth
    # files, and so the editable palmrl, are not processed
    Path(purelib, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PALMRL_CONFIG_DIR", "PYTHONPATH")}
    return wheel, venv, env, work


def test_wheel_holds_the_configs_and_every_package(wheel_env):
    wheel = wheel_env[0]
    names = zipfile.ZipFile(wheel).namelist()
    assert "palmrl/configs/pretrain.yaml" in names and "palmrl/configs/model/palm_1b.yaml" in names
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "palmrl").rglob("__init__.py")}
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert missing == [], f"packages left out of the wheel (add them to pyproject's packages): {missing}"
    yamls = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert {n.removeprefix("palmrl/configs/") for n in names if n.startswith("palmrl/configs/")} >= yamls
    data = {str(p.relative_to(ROOT)) for pattern in ("serving/page/*", "selfinstruct/*.jsonl")
            for p in (ROOT / "palmrl").glob(pattern)}
    assert data and data <= set(names), f"package data left out of the wheel: {sorted(data - set(names))}"


def test_installed_cli_composes_from_another_folder(wheel_env):
    _, venv, env, work = wheel_env
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    palmrl = str(venv / "bin" / "palmrl")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import palmrl.config as c; print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    usage = subprocess.run([palmrl, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert usage.returncode == 0 and "pretrain" in usage.stdout

    job = subprocess.run([palmrl, "pretrain", "model=palm_1b", "data=pile", "zero=stage3", "--cfg", "job"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "depth: 16" in job.stdout  # palm_1b from the installed model group
    assert "stage: 3" in job.stdout
    assert not (elsewhere / "runs").exists()  # --cfg job prints; it starts nothing
