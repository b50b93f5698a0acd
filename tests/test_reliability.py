"""Nothing lost, nothing executed that should not be (docs/reliability.md).

kill -9 at a seeded random step of every training stage at 1 rank (pretrain and ppo also at 2
ranks), then resume=auto, gives the same weights and metrics, bit for bit, as an uninterrupted run;
a kill in the middle of a checkpoint write leaves the previous one valid and resumed from;
SIGTERM/SIGINT save and exit 0; a planted pickle is refused without running; NaN/Inf steps are
skipped or stop the run as configured; a full or read-only output folder fails before training
starts. The parents of every run are the session's `tiny_chain` checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palmrl.errors import TrainingDiverged, UserError

from conftest import CONFIG_DIR, run_stage

STEPS = 8
SMALL = {
    "pretrain": ["model=palm_tiny", "train.micro_batch_size=8", "train.seq_len=64", "optim.warmup_steps=2",
                 "train.eval_batches=2"],
    "sft": ["train.eval_examples=16", "data.train_size=512", "data.val_size=32", "train.micro_batch_size=16"],
    "reward": ["data.train_size=256", "data.val_size=64", "train.micro_batch_size=16"],
    "ppo": ["train.eval_examples=16", "ppo.rollout_batch=16", "ppo.minibatch=8", "ppo.max_new_tokens=8",
            "data.train_size=64"],
}
LOOP = [f"train.max_steps={STEPS}", "train.save_every=2", "train.log_every=1", "train.eval_every=0"]


def stage_args(stage: str, run_dir: Path) -> list[str]:
    parents = {"pretrain": [f"tokenizer.path={run_dir / 'tokenizer'}"],
               "sft": [f"init_from={run_dir / 'pretrain'}"],
               "reward": [f"init_from={run_dir / 'sft'}"],
               "ppo": [f"policy={run_dir / 'sft'}", f"reward={run_dir / 'reward'}"]}[stage]
    return [*SMALL[stage], *LOOP, *parents]


def command(stage: str, args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "palmrl", stage, *args]
    # PPO at 2 ranks under ZeRO-3: rollouts gather the partitioned policy once (ppo.gather_for_rollout)
    # and the per-forward hooks must come back for the updates, across a kill and resume
    zero = "zero=stage3" if stage == "ppo" else "zero=stage2"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "palmrl", stage, *args, zero]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PALMRL_CONFIG_DIR": str(CONFIG_DIR)}


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.endswith("}") and '"split": "train"' in line]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each worker in its own session,
    so killing the launcher's process group would leave the ranks running)."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children(current))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def comparable(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not (k.endswith("tokens_per_s") or k.startswith("time_"))} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "adapters.safetensors"):
        if (a / "final" / name).exists():
            x, y = load_file(a / "final" / name), load_file(b / "final" / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert comparable(a) == comparable(b)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs, one per (stage, ranks), made on first use and shared by the tests here."""
    root, made = tmp_path_factory.mktemp("straight"), {}

    def get(stage: str, ranks: int, run_dir: Path) -> Path:
        if (stage, ranks) not in made:
            out = root / f"{stage}-{ranks}"
            finish(command(stage, [*stage_args(stage, run_dir), f"out_dir={out}"], ranks), root)
            made[stage, ranks] = out
        return made[stage, ranks]

    return get


# ---- 1. kill -9 at a random step, then resume=auto ------------------------------------------

# every stage at 1 rank; at 2 ranks the two ends: sharded optimizer state (pretrain) and sharded
# rollouts with a frozen reference and reward model (ppo). sft and reward share pretrain's loop.
KILL_MATRIX = [pytest.param(stage, 1, marks=pytest.mark.integration, id=f"{stage}-1")
               for stage in ("pretrain", "sft", "reward", "ppo")]
KILL_MATRIX += [pytest.param(stage, 2, marks=pytest.mark.multiproc, id=f"{stage}-2") for stage in ("pretrain", "ppo")]


@pytest.mark.parametrize("stage,ranks", KILL_MATRIX)
def test_kill_at_random_step_then_resume_equals_straight_run(stage, ranks, tiny_chain, straight_runs, tmp_path):
    reference = straight_runs(stage, ranks, tiny_chain)
    kill_at = random.Random(f"{stage}-{ranks}").randint(1, STEPS - 2)  # seeded: the same step every run
    out = tmp_path / "killed"
    cmd = command(stage, [*stage_args(stage, tiny_chain), f"out_dir={out}"], ranks)
    proc = start(cmd, tmp_path)
    wait_for_step(proc, out, kill_at)
    kill_tree(proc.pid)  # the whole job: launcher and every rank, as a node loss would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()

    finish([*cmd, "resume=auto"], tmp_path)
    assert_same_run(reference, out)


@pytest.mark.integration
@pytest.mark.parametrize("where", ["deepspeed state", "consolidated folder"])
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(where, tiny_chain, straight_runs, tmp_path):
    """SIGKILL inside the save of step 4: `latest` still names step 2, which loads and verifies, and
    resuming from it reproduces the uninterrupted run."""
    from palmrl import checkpoint

    reference = straight_runs("pretrain", 1, tiny_chain)
    out = tmp_path / "killed"
    target = "torch.save" if where == "deepspeed state" else "palmrl.checkpoint.save_file"
    crash = (
        "import os, signal, sys, torch, palmrl.checkpoint as c\n"
        f"module, name = {target.rsplit('.', 1)!r}\n"
        "owner = torch if module == 'torch' else c\n"
        "real = getattr(owner, name)\n"
        "def dying(obj, path, *a, **k):\n"
        "    if 'step-000004' in str(path):\n"
        "        real(obj, path, *a, **k)  # one file written, then the machine dies\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(obj, path, *a, **k)\n"
        "setattr(owner, name, dying)\n"
        "from palmrl.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["pretrain", *stage_args("pretrain", tiny_chain), f"out_dir={out}"]
    proc = subprocess.run([sys.executable, "-c", crash, *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "deepspeed" / "latest").read_text() == "step-000002"
    previous = checkpoint.load(out / "step-000002")
    assert previous.manifest["step"] == 2 and previous.weights()  # sha256 verified
    assert not (out / "step-000004").exists()

    finish([sys.executable, "-m", "palmrl", *args, "resume=auto"], tmp_path)
    assert_same_run(reference, out)
    assert not list(out.glob(".step-*")), "temporary folders of the dead write are cleaned up"


# ---- 2. signals ------------------------------------------------------------------------------

@pytest.mark.integration
def test_sigterm_saves_then_exits_0_and_resume_reproduces(tiny_chain, straight_runs, tmp_path):
    reference = straight_runs("pretrain", 1, tiny_chain)
    out = tmp_path / "preempted"
    cmd = command("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}", "train.save_every=0"], 1)
    proc = start(cmd, tmp_path)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    message = [line for line in stderr.splitlines() if line.startswith("palmrl: pretrain: SIGTERM")]
    assert len(message) == 1 and "resume=auto" in message[0], stderr[-2000:]
    step = int((out / "deepspeed" / "latest").read_text().split("-")[1])
    assert 3 <= step < STEPS and (out / checkpoint_name(step) / "manifest.json").is_file()

    finish([*cmd, "resume=auto"], tmp_path)
    assert_same_run(reference, out)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@pytest.mark.integration
def test_second_sigint_exits_at_once_and_keeps_the_last_checkpoint(tiny_chain, tmp_path):
    """Ctrl-C, then Ctrl-C again while the (here artificially slow) checkpoint is being written: the
    process quits at once with 130, `latest` still names a complete checkpoint, resume=auto works."""
    out = tmp_path / "interrupted"
    slow_save = (
        "import sys, time, palmrl.engine as e\n"
        "real = e.Trainer.save\n"
        "def save(self, **kw):\n"
        "    if self._signal:\n"
        "        print('saving slowly', file=sys.stderr, flush=True)\n"
        "        time.sleep(30)  # a big model's checkpoint\n"
        "    return real(self, **kw)\n"
        "e.Trainer.save = save\n"
        "from palmrl.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["pretrain", *stage_args("pretrain", tiny_chain), f"out_dir={out}", "train.max_steps=400"]
    proc = start([sys.executable, "-c", slow_save, *args], tmp_path)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first Ctrl-C was taken: the checkpoint write has begun
        if "saving slowly" in line:
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, stderr[-2000:]
    assert "second SIGINT: exiting now" in stderr and "Traceback" not in stderr
    latest = (out / "deepspeed" / "latest").read_text()
    assert latest == "step-000002" and (out / latest / "manifest.json").is_file()
    finish([sys.executable, "-m", "palmrl", *args, "resume=auto", "train.max_steps=6"], tmp_path)
    assert json.loads((out / "final" / "manifest.json").read_text())["step"] == 6


@pytest.mark.multiproc
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny_chain, tmp_path):
    """Preemption that reaches one worker: the ranks agree on the step, save together, exit 0."""
    out = tmp_path / "two"
    cmd = command("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}", "train.max_steps=400",
                               "train.save_every=0"], 2)
    proc = start(cmd, tmp_path)
    wait_for_step(proc, out, 3)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    tag = (out / "deepspeed" / "latest").read_text()
    assert len(list((out / "deepspeed" / tag).glob("*optim_states.pt"))) == 2  # both ranks' shards
    assert (out / tag / "manifest.json").is_file()


# ---- 4. safe loading -------------------------------------------------------------------------

class _Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.integration
def test_planted_pickle_in_deepspeed_state_is_refused_not_run(tiny_chain, tmp_path, dist_env):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    args = [*stage_args("pretrain", tiny_chain), f"out_dir={out}", "train.stop_after=2"]
    run_stage("pretrain", args)
    for state in (out / "deepspeed" / "step-000002").glob("*.pt"):
        torch.save({"module": _Planted(marker)}, state)
    with pytest.raises(UserError, match=r"refused to load .*never unpickles code"):
        run_stage("pretrain", [*args, "resume=auto", "train.stop_after=null"])
    assert not marker.exists()
    assert not (out / "final").exists()


@pytest.mark.integration
def test_pickle_posing_as_weights_is_refused(tiny_chain, tmp_path, dist_env):
    from palmrl import checkpoint

    fake, marker = tmp_path / "fake", tmp_path / "pwned"
    shutil.copytree(tiny_chain / "sft" / "final", fake)
    torch.save({"w": _Planted(marker)}, fake / "model.safetensors")
    with pytest.raises(UserError, match="sha256"):
        checkpoint.load(fake).weights()
    manifest = json.loads((fake / "manifest.json").read_text())  # even with a matching hash
    manifest["files"]["model.safetensors"] = checkpoint.sha256_file(fake / "model.safetensors")
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="unreadable model.safetensors"):
        checkpoint.load(fake).weights()
    assert not marker.exists()


@pytest.mark.unit
def test_no_code_path_unpickles():
    """Every torch.load in palmrl is weights_only=True; no pickle.load at all."""
    root = Path(__file__).resolve().parent.parent / "palmrl"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ---- 5. numerical faults ---------------------------------------------------------------------

def _inject_nonfinite(monkeypatch, *, nan_loss_at: int, nan_grad_at: int) -> None:
    """NaN loss at one training call of lm_loss, NaN gradients (finite loss) at another."""
    import palmrl.stages.pretrain as pretrain

    real, calls = pretrain.lm_loss, {"n": 0}

    def faulty(model, tokens):
        loss = real(model, tokens)
        if not torch.is_grad_enabled():
            return loss
        calls["n"] += 1
        if calls["n"] == nan_loss_at:
            return loss * float("nan")
        if calls["n"] == nan_grad_at:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    monkeypatch.setattr(pretrain, "lm_loss", faulty)


@pytest.mark.integration
@pytest.mark.parametrize("zero,precision", [("stage0", "fp32"), ("stage2", "fp32"), ("stage1", "bf16")])
def test_nonfinite_steps_are_skipped_and_counted(zero, precision, tiny_chain, tmp_path, dist_env, monkeypatch):
    # bf16 ZeRO-1/2 finds them by the gradient norm alone (engine._one_overflow_check)
    _inject_nonfinite(monkeypatch, nan_loss_at=3, nan_grad_at=5)
    out = tmp_path / "skip"
    final = run_stage("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}", f"zero={zero}",
                                   f"precision={precision}"])
    weights = load_file(final / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = [r for r in comparable(out) if r["split"] == "train"]
    flagged = [r["step"] for r in rows if r.get("nonfinite")]
    assert flagged == [3, 5], flagged
    assert json.loads((final / "manifest.json").read_text())["metrics"]["nonfinite_steps"] == 2
    assert all(isinstance(r["loss"], float) for r in rows if r["step"] != 3)


@pytest.mark.integration
def test_nonfinite_with_stop_keeps_the_last_good_checkpoint(tiny_chain, tmp_path, dist_env, monkeypatch):
    from palmrl import checkpoint

    _inject_nonfinite(monkeypatch, nan_loss_at=5, nan_grad_at=0)
    out = tmp_path / "stop"
    args = [*stage_args("pretrain", tiny_chain), f"out_dir={out}"]
    with pytest.raises(TrainingDiverged, match=r"step 5 .*last good checkpoint: .*step-000004") as err:
        run_stage("pretrain", [*args, "train.on_nonfinite=stop"])
    assert err.value.exit_code == 3
    assert not (out / "final").exists()
    good = checkpoint.load(out / "step-000004").weights()
    assert all(torch.isfinite(w).all() for w in good.values())
    monkeypatch.undo()
    run_stage("pretrain", [*args, "resume=auto"])
    assert (out / "final" / "manifest.json").is_file()


@pytest.mark.integration
def test_a_streak_of_nonfinite_steps_stops_even_when_skipping(tiny_chain, tmp_path, dist_env, monkeypatch):
    import palmrl.stages.pretrain as pretrain

    real = pretrain.lm_loss
    monkeypatch.setattr(pretrain, "lm_loss", lambda m, t: real(m, t) * (float("nan") if torch.is_grad_enabled() else 1.0))
    with pytest.raises(TrainingDiverged, match="3 such steps in a row"):
        run_stage("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={tmp_path / 'x'}"])


# ---- 6. disk ---------------------------------------------------------------------------------

@pytest.mark.integration
def test_full_disk_fails_before_training(tiny_chain, tmp_path, dist_env, monkeypatch):
    import palmrl.engine as engine

    free = shutil.disk_usage(tmp_path)._replace(free=64 * 1024)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda path: free)
    out = tmp_path / "full"
    with pytest.raises(UserError, match=r"out_dir: only 0\.1 MiB free in .*full but one checkpoint needs about"):
        run_stage("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}"])
    assert not (out / "metrics.jsonl").exists() and not (out / "deepspeed").exists()


@pytest.mark.integration
def test_read_only_output_folder_fails_before_training(tiny_chain, tmp_path, dist_env):
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses even root
        out = Path("/sys/palmrl-reliability-test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "run"
    with pytest.raises(UserError, match=rf"out_dir: cannot create {out}"):
        run_stage("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}"])


@pytest.mark.integration
def test_a_failed_checkpoint_write_is_one_line_and_names_the_last_good_one(tiny_chain, straight_runs, tmp_path):
    """The disk fills up after the preflight (here: a 2 MiB file-size limit, under the optimizer
    state's size): one line naming the step and the last good checkpoint, exit 2, no traceback."""
    import resource

    straight_runs("pretrain", 1, tiny_chain)  # the token cache exists: only checkpoints are big

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    out = tmp_path / "full"
    proc = subprocess.run(command("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={out}"], 1),
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("palmrl: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not write step 2" in errors[0] and "no checkpoint was written yet" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "deepspeed" / "latest").exists() and not (out / "step-000002").exists()



@pytest.mark.integration
def test_pipeline_passes_sigterm_on_and_a_rerun_continues(tiny_chain, tmp_path):
    """SIGTERM to the pipeline process alone (a scheduler, `kill`): the running stage saves, the
    pipeline exits 0 saying how to continue, and the same command picks the stage up again."""
    shutil.copytree(tiny_chain / "tokenizer", tmp_path / "runs" / "p" / "tokenizer")
    cmd = [sys.executable, "-m", "palmrl", "pipeline", "run_name=p", "stages=[tokenizer,pretrain]",
           "pretrain.train.max_steps=60", "pretrain.train.log_every=1", "pretrain.train.save_every=0",
           "pretrain.train.eval_every=0", "pretrain.train.eval_batches=2"]
    proc = start(cmd, tmp_path)
    wait_for_step(proc, tmp_path / "runs" / "p" / "pretrain", 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM during pretrain" in stderr and "run_name=p" in stderr
    stopped_at = int((tmp_path / "runs" / "p" / "pretrain" / "deepspeed" / "latest").read_text().split("-")[1])
    assert 3 <= stopped_at < 60

    rerun = finish(cmd, tmp_path)
    assert "continuing" in rerun.stderr + rerun.stdout
    assert json.loads((tmp_path / "runs" / "p" / "pretrain" / "final" / "manifest.json").read_text())["step"] == 60
