"""Device placement, checked on the CPU: the faults that only a GPU run would otherwise show.

The CPU cannot run CUDA, so these tests make placement observable instead: the `meta` device stands
in for the engine's GPU (a module that is never moved stays on the CPU), a fake NCCL group records
where collective tensors live, and a static pass over the source finds generators made without a
device (torch.multinomial on CUDA refuses a CPU generator)."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import compose

PACKAGE = Path(__file__).resolve().parent.parent / "palmrl"
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
               "reduce_scatter", "barrier", "gather", "scatter", "reduce"}


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


@pytest.mark.unit
def test_every_generator_in_palmrl_names_its_device():
    bare = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            for path in sorted(PACKAGE.rglob("*.py")) for node in calls(path)
            if call_name(node) in ("torch.Generator", "Generator") and not any(k.arg == "device" for k in node.keywords)]
    assert bare == [], f"torch.Generator() without device= (use generate.seeded_generator): {bare}"


@pytest.mark.unit
def test_collectives_are_called_only_by_runtimes_helpers():
    """One module talks to other ranks, and builds its tensors on collective_device()."""
    outside = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {call_name(node)}"
               for path in sorted(PACKAGE.rglob("*.py")) if path.name != "runtime.py" for node in calls(path)
               if call_name(node).split(".")[-1] in COLLECTIVES
               and call_name(node).split(".")[0] in ("dist", "torch_dist", "torch.distributed")]
    assert outside == []
    runtime = PACKAGE / "runtime.py"
    made = [node for node in calls(runtime) if call_name(node) in ("torch.tensor", "torch.zeros", "torch.ones")]
    assert made and all(any(k.arg == "device" and "collective_device" in ast.unparse(k.value) for k in node.keywords)
                        for node in made)


@pytest.fixture
def fake_nccl(monkeypatch):
    """A 2-rank NCCL group whose GPU is the meta device; all_reduce records its tensor's device."""
    import torch.distributed as dist

    from palmrl import runtime

    seen = []

    class Recorded(Exception):
        pass

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Recorded

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runtime, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return seen, Recorded


@pytest.mark.unit
def test_collective_tensors_sit_on_the_nccl_device(fake_nccl):
    from palmrl import runtime

    seen, recorded = fake_nccl
    with pytest.raises(recorded):
        runtime.mean_over_ranks(1.5)
    with pytest.raises(recorded):
        runtime.any_rank(True, False)
    assert seen == [torch.device("meta")] * 2


@pytest.mark.unit
def test_collective_device_is_this_ranks_gpu_under_nccl(monkeypatch):
    import torch.distributed as dist

    from palmrl.runtime import collective_device

    assert collective_device() == torch.device("cpu") or dist.get_backend() == "nccl"
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)


@pytest.mark.unit
def test_decoder_refuses_a_generator_on_another_device():
    from palmrl.generate import Decoder, seeded_generator
    from palmrl.model.palm import ModelConfig, PaLM

    with torch.device("meta"):
        model = PaLM(ModelConfig(vocab_size=64, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=32))
    with pytest.raises(ValueError, match="generator is on cpu but the model on meta"):
        Decoder(model, [[1, 2]], max_new_tokens=2, generator=seeded_generator(0, "cpu"))


@pytest.mark.unit
def test_seeded_generator_keeps_the_cpu_stream():
    from palmrl.generate import seeded_generator

    a = torch.randint(0, 1000, (8,), generator=seeded_generator(7, "cpu"))
    b = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.unit
@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("auto", "auto", ("cpu", torch.float32)),
    ("cpu", "bf16", ("cpu", torch.bfloat16)),
    ("auto", "fp32", ("cpu", torch.float32)),
])
def test_inference_placement_on_this_machine(device, precision, expected):
    from palmrl.runtime import inference_placement

    where, dtype = inference_placement(device, precision)
    assert (where.type, dtype) == expected


@pytest.mark.unit
@pytest.mark.parametrize(("device", "precision", "message"), [
    ("cuda", "auto", "generator.device='cuda': CUDA is not available"),
    ("gpu0", "auto", "generator.device='gpu0' is not a device"),
    ("auto", "fp16", "generator.precision must be auto, fp32 or bf16"),
])
def test_inference_placement_errors_name_the_key(device, precision, message):
    from palmrl.errors import UserError
    from palmrl.runtime import inference_placement

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        inference_placement(device, precision, key="generator.")


@pytest.mark.integration
@pytest.mark.parametrize("lora", ["none", "r8"])
def test_ppo_models_outside_the_engine_land_on_its_device(tiny_chain, lora, dist_env):
    """The reference (lora=none) and a reward model with its own base are never given to DeepSpeed,
    so PPO must move them itself: on `meta` standing in for the GPU, every tensor they hold is there."""
    from palmrl import checkpoint
    from palmrl.runtime import Dist
    from palmrl.stages.ppo import PPOConfig, PPORecipe

    cfg = compose("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={tiny_chain / 'reward'}", f"lora={lora}"])
    recipe = PPORecipe.__new__(PPORecipe)
    # critic_init=policy: copying the reward head into the (not yet placed) value head is the engine's
    # business and cannot read from meta tensors
    recipe.cfg, recipe.ppo, recipe.seed = cfg, PPOConfig(critic_init="policy"), 0
    recipe.dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    recipe.policy_ckpt = checkpoint.load(cfg.policy, key="policy")
    models = recipe.build_models()

    outside = [m for m in (models.reference, models.reward_model) if m is not None]
    assert outside, "nothing outside the engine: the test would check nothing"
    engine_owned = {id(t) for t in [*models.module.parameters(), *models.module.buffers()]}
    stray = [name for m in outside for name, t in [*m.named_parameters(), *m.named_buffers()]
             if id(t) not in engine_owned and t.device.type != "meta"]
    assert stray == []
    if lora == "none":
        assert models.reference is not None and not models.shared_reward


@pytest.mark.unit
def test_other_ranks_wait_for_the_tokenizer_file_not_in_a_collective(tmp_path, monkeypatch):
    """Rank 0 may train SentencePiece for longer than NCCL's barrier timeout: ranks 1..N poll."""
    import torch.distributed as dist

    from palmrl.stages import common
    from palmrl.tokenizer import byte_tokenizer

    def no_collectives(*args, **kwargs):
        raise AssertionError("a collective while rank 0 trains the tokenizer")

    monkeypatch.setattr(dist, "barrier", no_collectives)
    monkeypatch.setattr(common, "TOKENIZER_POLL_S", 0.05)
    cfg = compose("pretrain", [f"tokenizer.path={tmp_path / 'tok'}"])
    saver = threading.Timer(0.3, lambda: byte_tokenizer().save(tmp_path / "tok"))
    saver.start()
    t0 = time.perf_counter()
    tokenizer = common.tokenizer_for_training(cfg, is_main=False)
    assert time.perf_counter() - t0 >= 0.25 and tokenizer.vocab_size == byte_tokenizer().vocab_size


@pytest.mark.unit
def test_tokenizer_training_has_a_sample_cap(monkeypatch):
    from palmrl import tokenizer as tok
    from palmrl.stages import common

    for stage in ("pretrain", "tokenizer"):
        assert compose(stage).tokenizer.max_documents == 100_000
    consumed = []

    def counting_train(texts, **kwargs):
        consumed.extend(texts)
        return tok.byte_tokenizer()

    monkeypatch.setattr(tok, "train_tokenizer", counting_train)
    common.train_tokenizer_from_cfg(compose("tokenizer", ["tokenizer.max_documents=50"]))
    assert len(consumed) == 50


@pytest.mark.unit
@pytest.mark.parametrize(("cuda", "zero", "torch_adam", "expected"), [
    (True, "stage1", None, False),          # FusedAdam
    (True, "stage3_offload", None, False),  # DeepSpeedCPUAdam on the offloaded states
    (False, "stage1", None, True),          # torch AdamW: nothing to compile on a CPU machine
    (False, "stage3_offload", None, True),
    (True, "stage1", True, True),           # forced
    (False, "stage1", False, False),
])
def test_adam_follows_the_device(cuda, zero, torch_adam, expected):
    from palmrl.engine import ds_config

    extra = [] if torch_adam is None else [f"optim.torch_adam={str(torch_adam).lower()}"]
    config = ds_config(compose("pretrain", [f"zero={zero}", *extra]), 1, cuda=cuda)
    assert config["optimizer"]["params"]["torch_adam"] is expected
    assert config["optimizer"]["params"].get("fused", False) is expected  # torch's AdamW runs fused
    # one process sums its gradients (the mean over one rank, without dividing every bucket by 1)
    assert config.get("gradient_allreduce_op", "mean") == ("mean" if zero.startswith("stage3") else "sum")
    assert ds_config(compose("pretrain", [f"zero={zero}", *extra]), 2, cuda=cuda).get("gradient_allreduce_op") is None
    assert ("zero_force_ds_cpu_optimizer" in config) == (expected and zero.endswith("offload"))


@pytest.mark.unit
def test_tf32_is_allowed_where_cuda_runs():
    from palmrl.runtime import allow_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        allow_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.unit
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch, capsys):
    """An AVX2-only CPU multiplies bf16 matrices ~100x slower than fp32 (measured on this project's
    EPYC): asking for bf16 there gets one warning line naming the key and the fast choice."""
    import torch

    from palmrl import runtime

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    runtime.warn_slow_bf16("cpu", "bf16", key="sample.precision")
    runtime.warn_slow_bf16("cpu", "fp32")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "sample.precision=bf16" in err[0] and "sample.precision=fp32" in err[0]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    runtime.warn_slow_bf16("cpu", "bf16")
    assert capsys.readouterr().err == ""


@pytest.mark.unit
def test_time_to_first_step_counts_from_the_process_start_only_for_a_commands_first_stage(tmp_path):
    """A stage's `startup_s` is what its user waited for: the imports too for a `palmrl` command's
    first stage; from the stage's own start for later stages of one process (multirun, in-process)."""
    from omegaconf import OmegaConf

    from palmrl import runtime

    cfg = OmegaConf.create({"run_name": "t", "out_dir": str(tmp_path)})
    waited = runtime.run_stage("pretrain", cfg, lambda c: runtime.run_seconds())  # in-process: the stage's own
    assert 0 <= waited < 1.0
    runtime._startup_from_process[0] = True  # as run_stage sets it for a command's first stage
    try:
        assert runtime.run_seconds() == pytest.approx(runtime.process_seconds(), abs=0.05)
        assert runtime.process_seconds() > waited  # this pytest process has run longer than that stage
    finally:
        runtime._startup_from_process[0] = False
