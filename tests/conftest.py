"""Shared test setup: one-process torch.distributed (gloo), offline trackers, a private data cache,
and helpers to compose stage configs the way the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("palmrl-cache")
    os.environ["PALMRL_CACHE_DIR"] = str(cache)
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache / "hf"))
    yield cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP barriers
    made such tests up to 20x slower; the thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dist_env():
    """torch.distributed with one gloo process, as a plain `palmrl` run sets it up."""
    from palmrl.runtime import init_distributed

    return init_distributed()


def compose(stage: str, overrides: list[str] | None = None):
    """The stage config exactly as `palmrl <stage> overrides...` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra_compose(config_name=stage, overrides=list(overrides or []))


def run_stage(stage: str, overrides: list[str]):
    """Run a stage in this process (the CLI's path minus argv parsing)."""
    from palmrl.cli import stage_runner
    from palmrl.runtime import run_stage as _run

    return _run(stage, compose(stage, overrides), stage_runner(stage))


def palmrl_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, stdin: str | None = None):
    """Run the real `palmrl` command in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        full_env.pop(key, None)
    full_env["PALMRL_CONFIG_DIR"] = str(CONFIG_DIR)
    return subprocess.run([sys.executable, "-m", "palmrl", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=stdin)


# The test profile of `palmrl pipeline`: the demo's code path with fewer steps (see test_pipeline.py).
PIPELINE_ARGS = ["run_name=ci"]


@pytest.fixture(scope="session")
def pipeline_args():
    return list(PIPELINE_ARGS)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, pipeline_args):
    """Run the whole pipeline once per session; returns runs/<run_name>.

    PALMRL_TEST_PIPELINE_RUN=<runs/ci folder of an earlier `palmrl pipeline run_name=ci`> reuses that
    run instead (a development shortcut; CI always runs the pipeline)."""
    reuse = os.environ.get("PALMRL_TEST_PIPELINE_RUN")
    if reuse:
        return Path(reuse)
    work = tmp_path_factory.mktemp("pipeline")
    proc = palmrl_cli("pipeline", *pipeline_args, cwd=work, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "runs" / "ci"
