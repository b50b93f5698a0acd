"""Shared test setup: one-process torch.distributed (gloo), offline trackers, a private data cache,
helpers to compose stage configs the way the CLI does, the two session runs of `palmrl pipeline`
(`tiny_chain` for plumbing, `pipeline_run` for the quality gates), and the marker check.

Every test carries exactly the marker of its kind (registered in pyproject.toml):
  unit         fast, in-process; no stage runs beyond tiny ones (`make test-fast`)
  integration  stage runs on the tiny chain, CLI subprocesses
  multiproc    2 ranks under torchrun or the deepspeed launcher
  quality      gates measured on the full demo pipeline (`pipeline_run`)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

# Under pytest-xdist (`make test` runs two workers) each worker, and what it launches, gets one thread:
# two 2-thread processes on 2 cores spin in each other's OpenMP barriers (several times slower).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ.setdefault("WANDB_MODE", "disabled")
if XDIST_WORKER:  # forced: the controller that started the worker may have set 2 in its own environment
    os.environ["OMP_NUM_THREADS"] = "1"
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


KINDS = ("unit", "integration", "multiproc", "quality")


QUALITY_FILES = ("test_pipeline.py", "test_pipeline_rl.py")  # where the gates on the demo pipeline live


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config, items):
    """Refuse a test without exactly one of the four kinds; run the quality gates last."""
    unmarked = [item.nodeid for item in items if sum(item.get_closest_marker(kind) is not None for kind in KINDS) != 1]
    if unmarked:
        raise pytest.UsageError(f"tests without exactly one marker of {'/'.join(KINDS)} (see tests/conftest.py):\n  "
                                + "\n  ".join(unmarked))
    quality = {id(item): item.get_closest_marker("quality") is not None for item in items}
    elsewhere = [item.nodeid for item in items if quality[id(item)] and item.path.name not in QUALITY_FILES]
    if elsewhere:  # `make test` hands whole files to its two workers: the gates must stay in their files
        raise pytest.UsageError(f"quality tests live in tests/{' or tests/'.join(QUALITY_FILES)} (one xdist worker "
                                "runs the demo pipeline for them):\n  " + "\n  ".join(elsewhere))
    if XDIST_WORKER:  # with --dist loadfile whole files go to workers in this order: test_pipeline.py first,
        # so one worker builds the pipeline while the other takes the rest; test_pipeline_rl.py last, so
        # whichever worker is free by then runs those gates beside it (waiting for the pipeline if need be)
        rank = {QUALITY_FILES[0]: 0, QUALITY_FILES[1]: 2}
        items.sort(key=lambda item: rank.get(item.path.name, 1))
    else:  # one process: the pipeline ran before the first test, its gates run last
        items.sort(key=lambda item: quality[id(item)])


# The test profile of `palmrl pipeline`: the demo's code path with fewer steps (see test_pipeline.py).
PIPELINE_ARGS = ["run_name=ci", "rl=[ppo,grpo,dpo]"]  # the demo, with all three RL stages from one SFT

# A few dozen steps per stage: checkpoints of every stage for plumbing, reliability and bad-input
# tests, in about a minute. Not trained to any quality: assertions on it are about mechanics.
TINY_CHAIN_ARGS = [
    "run_name=tiny", "stages=[tokenizer,pretrain,sft,reward,ppo]",
    "pretrain.train.max_steps=20", "pretrain.train.micro_batch_size=8", "pretrain.train.seq_len=64",
    "pretrain.train.eval_every=0", "pretrain.train.eval_batches=2", "pretrain.train.save_every=0",
    "sft.train.max_steps=20", "sft.train.micro_batch_size=16", "sft.train.eval_every=0", "sft.train.eval_examples=16",
    "sft.train.save_every=0", "sft.data.train_size=512", "sft.data.val_size=32",
    "reward.train.max_steps=20", "reward.train.micro_batch_size=16", "reward.train.eval_every=0",
    "reward.train.save_every=0", "reward.data.train_size=256", "reward.data.val_size=64", "reward.data.policy_negatives=0",
    "ppo.train.max_steps=4", "ppo.train.eval_every=0", "ppo.train.eval_examples=16", "ppo.train.save_every=0",
    "ppo.ppo.rollout_batch=16", "ppo.ppo.minibatch=8", "ppo.ppo.max_new_tokens=8", "ppo.data.train_size=64",
]


@pytest.fixture(scope="session")
def pipeline_args():
    return list(PIPELINE_ARGS)


@pytest.fixture(scope="session")
def tiny_chain_args():
    return list(TINY_CHAIN_ARGS)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, tiny_chain_args):
    """tokenizer → pretrain → sft → reward → ppo through `palmrl pipeline` with a few dozen steps each,
    once per session; returns runs/tiny. PALMRL_TEST_TINY_CHAIN=<an earlier runs/tiny> reuses one."""
    reuse = os.environ.get("PALMRL_TEST_TINY_CHAIN")
    if reuse:
        return Path(reuse)
    return once_per_run(tmp_path_factory, "tiny-chain", lambda work: _run_tiny_chain(work, tiny_chain_args))


def _run_tiny_chain(work: Path, args: list[str]) -> Path:
    proc = palmrl_cli("pipeline", *args, cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "runs" / "tiny"


def once_per_run(tmp_path_factory, name: str, build) -> Path:
    """build(folder) once per pytest run, shared by xdist workers: the first to ask builds under a
    file lock, the others wait for it and reuse the result (pytest-xdist's documented recipe)."""
    shared = tmp_path_factory.getbasetemp().parent if XDIST_WORKER else tmp_path_factory.getbasetemp()
    work, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if done.exists():
            return Path(done.read_text())
        work.mkdir(exist_ok=True)
        result = build(work)
        done.write_text(str(result))
        return result


class BackgroundPipeline:
    """The demo pipeline as a subprocess in its own session (so it can be killed whole); its output
    goes to files (a pipe could fill up and stall it)."""

    def __init__(self, work: Path, args: list[str]):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env["PALMRL_CONFIG_DIR"] = str(CONFIG_DIR)
        # under xdist it runs with one thread, beside the other worker: float sums then differ from a
        # 2-thread `make demo` in the last digits, so the gates carry noise margins, not exact figures
        self.work, self.log = work, work / "pipeline.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "palmrl", "pipeline", *args], cwd=work, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> Path:
        code = self.proc.wait(timeout=timeout)
        assert code == 0, self.log.read_text()[-4000:]
        return self.work / "runs" / "ci"

    def stop(self) -> None:
        if self.proc.poll() is None:  # the session ended before a quality test needed it
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _demo_pipeline(request, tmp_path_factory, pipeline_args, _private_cache):
    """Run the demo pipeline before the first test when a selected test needs `pipeline_run`.

    It runs alone, not beside the other tests: on 2 cores a 2-thread pipeline next to 2-thread
    in-process tests oversubscribes the cores, and OpenMP's spinning barriers made both several
    times slower than one after the other (measured: a 1.2-minute HF test took over 15)."""
    wanted = any("pipeline_run" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if not wanted or XDIST_WORKER or os.environ.get("PALMRL_TEST_PIPELINE_RUN"):
        yield None
        return
    background = BackgroundPipeline(tmp_path_factory.mktemp("pipeline"), pipeline_args)
    background.wait(timeout=1800)
    yield background
    background.stop()


@pytest.fixture(scope="session")
def pipeline_run(_demo_pipeline, tmp_path_factory, pipeline_args):
    """The whole demo pipeline, run once per session (before the first test);
    returns runs/<run_name>. Only the quality gates use it: everything else uses `tiny_chain`.

    PALMRL_TEST_PIPELINE_RUN=<runs/ci folder of an earlier `palmrl pipeline run_name=ci`> reuses that
    run instead (a development shortcut; CI always runs the pipeline)."""
    reuse = os.environ.get("PALMRL_TEST_PIPELINE_RUN")
    if reuse:
        return Path(reuse)
    if XDIST_WORKER:  # the first worker to ask builds it (test_pipeline.py comes first); the other waits for it
        return once_per_run(tmp_path_factory, "pipeline",
                            lambda work: BackgroundPipeline(work, pipeline_args).wait(timeout=1800))
    return _demo_pipeline.wait(timeout=1800)
