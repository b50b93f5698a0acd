"""End to end: pretrain palm_tiny on the embedded corpus; exact resume; 2 ranks under torchrun;
multirun sweeps; sampling from the checkpoint; bad input ends with one line and exit code 2.
(The validation loss of a real pretraining run: test_pipeline.py, on the demo pipeline's.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIG_DIR, compose, palmrl_cli, run_stage

TINY = ["model=palm_tiny", "train.micro_batch_size=8", "train.seq_len=64", "train.log_every=5",
        "train.eval_batches=4", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_chain):
    """The session's sentencepiece tokenizer on the embedded corpus (the tiny chain's tokenizer stage)."""
    out = tiny_chain / "tokenizer"
    assert (out / "tokenizer.model").is_file()
    return out


def overrides(tmp, tokenizer_dir, *extra):
    return [*TINY, f"tokenizer.path={tokenizer_dir}", f"out_dir={tmp}", *extra]


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_resume_reproduces_uninterrupted_run(tmp_path, tokenizer_dir, dist_env):
    common = ["train.max_steps=12", "train.eval_every=6", "train.save_every=0", "train.log_every=1"]
    straight = tmp_path / "straight"
    run_stage("pretrain", overrides(straight, tokenizer_dir, *common))
    broken = tmp_path / "broken"
    stopped = run_stage("pretrain", overrides(broken, tokenizer_dir, *common, "train.stop_after=6"))
    assert stopped.name == "step-000006" and not (broken / "final").exists()
    run_stage("pretrain", overrides(broken, tokenizer_dir, *common, "resume=auto"))

    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("tokens_per_s")} for m in ms]
    assert strip(metrics(straight)) == strip(metrics(broken))


@pytest.mark.integration
def test_wandb_tags_group_notes_and_a_resumed_run_continues_its_wandb_run(tmp_path, tokenizer_dir, dist_env,
                                                                           monkeypatch):
    import wandb

    calls = []
    real_init = wandb.init

    def init(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    logger = ["logger=wandb", "logger.mode=offline", "logger.tags=[baseline,tiny]", "logger.group=sweep-7",
              "logger.notes=first try", "train.save_every=2", "train.eval_every=0"]
    run_stage("pretrain", overrides(out, tokenizer_dir, *logger, "train.max_steps=4", "train.stop_after=2"))
    run_id = (out / "wandb_run_id").read_text().strip()
    run_stage("pretrain", overrides(out, tokenizer_dir, *logger, "train.max_steps=4", "resume=auto"))
    assert [c["id"] for c in calls] == [run_id, run_id] and calls[1]["resume"] == "allow"
    assert calls[0]["tags"] == ["baseline", "tiny"] and calls[0]["group"] == "sweep-7"
    assert calls[0]["notes"] == "first try" and calls[0]["job_type"] == "pretrain"
    offline = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), offline  # one run, synced as one
    run_stage("pretrain", overrides(out, tokenizer_dir, *logger, "train.max_steps=2", "overwrite=true"))
    assert calls[2]["id"] != run_id  # a replaced run is a new wandb run


@pytest.mark.integration
def test_existing_run_is_never_overwritten(tmp_path, tokenizer_dir, dist_env):
    from palmrl.errors import UserError

    out = tmp_path / "run"
    run_stage("pretrain", overrides(out, tokenizer_dir, "train.max_steps=2"))
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="resume=auto"):
        run_stage("pretrain", overrides(out, tokenizer_dir, "train.max_steps=2"))
    assert (out / "final" / "model.safetensors").read_bytes() == before


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", ["stage2", "stage3"])
def test_two_ranks_then_one_process_eval(tmp_path, tokenizer_dir, zero):
    from palmrl import checkpoint
    from palmrl.checkpoint import model_from_checkpoint
    from palmrl.data.sources import load_texts, source_fingerprint
    from palmrl.data.tokens import TokenBatches, build_token_shards
    from palmrl.stages.pretrain import lm_loss

    out = tmp_path / zero
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "palmrl",
           "pretrain", *overrides(out, tokenizer_dir, "train.max_steps=6", "train.eval_every=0", f"zero={zero}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "stage: " + zero[-1] in config
    ckpt = checkpoint.load(out, stages=["pretrain"])
    assert ckpt.manifest["config"]["zero"]["stage"] == int(zero[-1])

    model = model_from_checkpoint(ckpt).eval()
    cfg = compose("pretrain", overrides(out, tokenizer_dir))
    splits = build_token_shards(lambda: load_texts(cfg.data), ckpt.tokenizer(), fingerprint=source_fingerprint(cfg.data),
                                cache_dir=os.path.join(os.environ["PALMRL_CACHE_DIR"], "tokens"),
                                val_fraction=float(cfg.data.val_fraction))
    val = TokenBatches(splits.val, seq_len=64, batch_size=8, seed=0)
    with torch.no_grad():
        losses = [lm_loss(model, t).item() for t in val.eval_batches(4)]
    assert sum(losses) / len(losses) == pytest.approx(ckpt.manifest["metrics"]["loss"], abs=1e-4)


@pytest.mark.multiproc
def test_two_srun_tasks_form_one_world_from_slurm_variables(tmp_path, tokenizer_dir):
    """What `srun --ntasks=2 palmrl pretrain ...` gives each task: SLURM's variables only (no RANK,
    WORLD_SIZE, MASTER_ADDR/PORT). The two processes must find each other and train as one world."""
    import socket

    for job_id in range(4000, 10000, 97):  # the port both tasks derive from the job id must be free
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
                break
            except OSError:
                continue
    out = tmp_path / "srun"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost", "OMP_NUM_THREADS": "1",
             "PALMRL_CONFIG_DIR": str(CONFIG_DIR)}
    cmd = [sys.executable, "-m", "palmrl", "pretrain",
           *overrides(out, tokenizer_dir, "train.max_steps=2", "train.eval_every=0", "zero=stage2")]
    procs = [subprocess.Popen(cmd, env={**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert re.search(r"world size\W+2", results[0][1]), results[0][1][-2000:]
    shards = sorted(p.name for p in (out / "deepspeed").glob("*/*optim_states.pt"))
    assert len(shards) == 2 and any("rank_1" in name for name in shards), shards  # each rank saved its part


@pytest.mark.integration
def test_multirun_makes_one_folder_per_job(tmp_path, tokenizer_dir):
    proc = palmrl_cli("pretrain", "--multirun", "optim.lr=1e-3,3e-4", "run_name=sweep",
                      *TINY, f"tokenizer.path={tokenizer_dir}", "train.max_steps=2", "train.eval_batches=1",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "runs" / "sweep" / "pretrain").glob("*/final"))
    assert len(jobs) == 2 and all("optim.lr=" in j for j in jobs), jobs  # Hydra names them by the overrides


@pytest.mark.integration
def test_a_sweep_through_hydras_submitit_launcher(tmp_path, tokenizer_dir):
    """hydra/launcher=submitit_local: the launcher SLURM sweeps use (submitit_slurm, configs/hydra/launcher/
    slurm.yaml), here with local processes: two jobs, two run folders."""
    proc = palmrl_cli("pretrain", "--multirun", "hydra/launcher=submitit_local", "optim.lr=1e-3,3e-4",
                      "run_name=submitit", *TINY, f"tokenizer.path={tokenizer_dir}", "train.max_steps=2",
                      "train.eval_batches=1", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "runs" / "submitit" / "pretrain").glob("*/final"))
    assert len(jobs) == 2 and all("optim.lr=" in j for j in jobs), jobs
    assert list((tmp_path / "runs" / "submitit" / "pretrain" / ".submitit").iterdir())  # submitit ran them


@pytest.mark.unit
def test_the_slurm_preset_composes_one_task_per_gpu():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("pretrain", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_ and launcher.tasks_per_node == 4


@pytest.mark.integration
def test_pipeline_multirun_gives_each_job_its_own_run(tmp_path):
    """A run name built from a choice resolves per job (it failed: "HydraConfig was not set"); without
    one, each job runs under runs/<run_name>/<its overrides>/ instead of all sharing runs/<run_name>."""
    byte = ["stages=[tokenizer]", "tokenizer.tokenizer.kind=byte"]
    built = palmrl_cli("pipeline", "--multirun", "run_name=s_${hydra:runtime.choices.model}",
                       "model=palm_tiny,palm_small", *byte, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    plain = palmrl_cli("pipeline", "--multirun", "seed=1,2", *byte, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    made = sorted(str(p.parent.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").glob("**/tokenizer.json"))
    assert made == ["default/seed=1/tokenizer", "default/seed=2/tokenizer",
                    "s_palm_small/tokenizer", "s_palm_tiny/tokenizer"], made


@pytest.mark.integration
def test_cfg_job_prints_resolved_config(tmp_path):
    proc = palmrl_cli("pretrain", "model=palm_1b", "data=pile", "zero=stage3", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stage: 3" in proc.stdout and "pile" in proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_sample_from_pretrain_checkpoint(tmp_path, tokenizer_dir, dist_env):
    out = tmp_path / "pretrain"
    run_stage("pretrain", overrides(out, tokenizer_dir, "train.max_steps=4"))
    proc = palmrl_cli("sample", f"ckpt={out}", "prompt=Hi there", "max_new_tokens=12", "num_samples=2",
                      "format=jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "Hi there" and r["tokens"] <= 12 for r in rows)
    piped = palmrl_cli("sample", f"ckpt={out}", "max_new_tokens=4", "format=jsonl", cwd=tmp_path, stdin="one\ntwo\n")
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert [json.loads(line)["prompt"] for line in piped.stdout.splitlines()] == ["one", "two"]


@pytest.mark.integration
@pytest.mark.parametrize("args,culprit", [
    (["nosuchstage"], "nosuchstage"),
    (["pretrain", "zero=stage9"], "zero/stage9"),
    (["pretrain", "model=palm_nope"], "model/palm_nope"),
    (["pretrain", "train.nokey=1"], "nokey"),
    (["pretrain", "data=local", "data.path=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["sample", "ckpt=/no/such/ckpt", "prompt=x"], "/no/such/ckpt"),
    (["sample", "prompt=x"], "ckpt"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, culprit):
    proc = palmrl_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("palmrl: error:")]
    assert len(lines) == 1 and culprit in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_bad_checkpoint_and_empty_corpus_and_vocab_mismatch(tmp_path, tokenizer_dir):
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / "weights.bin").write_bytes(b"x")
    proc = palmrl_cli("sample", f"ckpt={tmp_path / 'notackpt'}", "prompt=x", cwd=tmp_path)
    assert proc.returncode == 2 and "not a palmrl checkpoint" in proc.stderr and "Traceback" not in proc.stderr

    (tmp_path / "empty.txt").write_text("")
    proc = palmrl_cli("pretrain", "data=local", f"data.path={tmp_path / 'empty.txt'}", *TINY,
                      f"tokenizer.path={tokenizer_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "empty" in proc.stderr.lower() and "Traceback" not in proc.stderr

    proc = palmrl_cli("pretrain", "model.vocab_size=4096", *TINY, f"tokenizer.path={tokenizer_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "vocab_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "default" / "pretrain" / "final").exists()


@pytest.mark.multiproc
def test_deepspeed_launcher_two_ranks(tmp_path, tokenizer_dir):
    """The CPU analogue of `deepspeed --num_gpus 8 --module palmrl pretrain ...` on a GPU node."""
    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.pop("OMP_NUM_THREADS", None)  # the launcher leaves it unset: palmrl must pick threads per rank itself
    env["PALMRL_CONFIG_DIR"] = str(CONFIG_DIR)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", "29531", "--module", "palmrl", "pretrain",
           *overrides(out, tokenizer_dir, "train.max_steps=3", "train.eval_every=0", "zero=stage1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["step"] == 3
    shards = sorted((out / "deepspeed" / "step-000003").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO-1 over 2 ranks: one optimizer shard each


@pytest.mark.integration
def test_activation_checkpointing_trains_the_same_model(tmp_path, tokenizer_dir, dist_env):
    """train.activation_checkpointing=true through DeepSpeed: same losses, same weights (fp32)."""
    common = ["train.max_steps=4", "train.eval_every=0", "train.save_every=0", "train.log_every=1"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    run_stage("pretrain", overrides(plain, tokenizer_dir, *common))
    run_stage("pretrain", overrides(recomputed, tokenizer_dir, *common, "train.activation_checkpointing=true"))
    a = load_file(plain / "final" / "model.safetensors")
    b = load_file(recomputed / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = lambda folder: [m["loss"] for m in metrics(folder) if "loss" in m]
    assert losses(plain) and losses(plain) == pytest.approx(losses(recomputed), rel=1e-5)


@pytest.mark.integration
def test_training_never_loads_deepspeeds_muon_and_trains_the_same():
    """DeepSpeed's Muon modules torch.compile their kernels as they load (2-3 s of each training
    command's start). Behind palmrl's stand-ins (palmrl.runtime.skip_deepspeed_muon) DeepSpeed's bf16
    and ZeRO-1/2/3 optimizers train without loading them, to the same weights as with the real
    modules, loaded afterwards in the same process through a name the stand-ins lack."""
    code = """
import json, sys, torch, deepspeed
from palmrl.runtime import DEEPSPEED_MUON, init_distributed, skip_deepspeed_muon

def train():
    sums = []
    for stage, bf16 in ((0, True), (1, False), (2, True), (3, False)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
                  "bf16": {"enabled": bf16}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        for _ in range(2):
            x = torch.randn(4, 8, dtype=torch.bfloat16 if bf16 else torch.float32)
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            sums.append(sum(p.double().sum().item() for p in model.parameters()))
    return sums

skip_deepspeed_muon()
init_distributed()
stand_in = train()
loaded = "torch._inductor.compile_fx" in sys.modules
from deepspeed.runtime.zero.muon.original_muon import adam_update  # not a stand-in's name: the real module loads
real_module = sys.modules["deepspeed.runtime.zero.muon.original_muon"].__file__
del sys.modules["deepspeed.runtime.zero.muon.muon_optimizer"]  # the other one, for the comparison
print(json.dumps({"stand_in": stand_in, "loaded": loaded, "real_module": real_module, "real": train(),
                  "after": "torch._inductor.compile_fx" in sys.modules}))
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env={**env, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["loaded"] is False and run["after"] is True
    assert run["real_module"].endswith("deepspeed/runtime/zero/muon/original_muon.py")
    assert run["stand_in"] == run["real"]  # the same updates, bit for bit
