"""`palmrl plan`: its model-state numbers are DeepSpeed's own estimates, the GPU presets fit their
GPUs, and a config that cannot fit is refused with the fix. (Its totals against measured peak
memory of CPU runs: scripts/bench_plan_memory.py.)"""

from __future__ import annotations

import pytest
import torch

from conftest import compose

pytestmark = pytest.mark.unit

PRESETS = ["palm_1b_8xa100_80g", "palm_1b_8xa100_40g", "palm_8b_8xa100_80g", "palm_8b_8xa100_40g"]


@pytest.mark.parametrize("params", [125_000_000, 1_013_000_000, 8_600_000_000])
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_are_deepspeeds_estimates(params, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from palmrl.plan import model_state_bytes

    largest = params // 20

    def ours(zero, offload_optimizer=False, offload_param=False):
        return sum(model_state_bytes(0, params, largest, gpus=gpus, zero=zero, bf16=True,
                                     offload_optimizer=offload_optimizer, offload_param=offload_param))

    def close(a, b):
        return abs(a - b) <= 8  # integer divisions on either side

    assert close(ours(2), estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=False)[1])
    assert close(ours(2, offload_optimizer=True), estimate_zero2_model_states_mem_needs(params, gpus, 1)[1])
    for offload_param in (False, True):
        ds = estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=True,
                                                   cpu_offload_params=offload_param)[1]
        assert close(ours(3, offload_optimizer=True, offload_param=offload_param), ds)
    assert close(ours(3), estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=False)[1])


@pytest.mark.parametrize("model", ["palm_tiny", "palm_small", "palm_1b", "palm_8b"])
def test_parameter_count_is_the_models(model):
    from omegaconf import OmegaConf

    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.plan import Shape

    config = ModelConfig.from_dict(OmegaConf.to_container(compose("pretrain", [f"model={model}"]).model))
    with torch.device("meta"):
        built = PaLM(config)
    assert Shape.of(config).params == built.num_params()


def test_fine_tunes_plan_the_parent_checkpoints_model_and_lora_trains_only_adapters(tmp_path):
    from omegaconf import OmegaConf

    from palmrl.errors import UserError
    from palmrl.plan import make_plan

    with pytest.raises(UserError, match="init_from"):
        make_plan(compose("sft"), "sft")
    from palmrl import checkpoint
    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.tokenizer import byte_tokenizer

    config = ModelConfig.from_dict(OmegaConf.to_container(compose("pretrain", ["model=palm_small"]).model))
    with torch.device("meta"):
        shapes = PaLM(config)
    parent = checkpoint.save(tmp_path / "sft" / "final", stage="sft", step=0, model_config=config.to_dict(),
                             tokenizer=byte_tokenizer(), config={},
                             weights={k: torch.zeros(1) for k, _ in shapes.named_parameters()})  # plan reads no weights
    full = make_plan(compose("sft", [f"init_from={parent.parent}", "lora=none"]), "sft")
    lora = make_plan(compose("sft", [f"init_from={parent.parent}", "lora=r16"]), "sft")
    assert full.trainable == full.params and 0 < lora.trainable < full.params / 10
    assert lora.model_states < full.model_states / 3


@pytest.mark.parametrize("preset", PRESETS)
def test_every_gpu_preset_fits_its_gpus(preset, capsys):
    from palmrl.cli import main

    main(["plan", "pretrain", f"experiment={preset}"])
    out = capsys.readouterr().out
    assert "fits" in out and "8 GPU(s)" in out and "bf16" in out
    cfg = compose("pretrain", [f"experiment={preset}"])
    assert cfg.train.activation_checkpointing and cfg.precision == "bf16" and cfg.optim.warmup_steps > 100


def test_the_cards_command_is_refused_where_it_cannot_fit_with_the_fix(capsys):
    """`palmrl pretrain model=palm_1b data=pile` as the card writes it: micro-batch 16 × 2048, no
    checkpointing. On 40 GB GPUs (or in fp32 on 80 GB) plan refuses and names the change."""
    from palmrl.cli import main

    for extra in (["plan.gpus=8", "plan.gpu_memory_gb=40"], ["plan.gpus=8", "precision=fp32"]):
        with pytest.raises(SystemExit) as exit_:
            main(["plan", "pretrain", "model=palm_1b", "data=pile", *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "set train.activation_checkpointing=true" in err[0], err
    # and the fix works
    main(["plan", "pretrain", "model=palm_1b", "data=pile", "plan.gpus=8", "plan.gpu_memory_gb=40",
          "train.activation_checkpointing=true"])
    assert "fits" in capsys.readouterr().out


def test_checkpointing_shrinks_activations_by_about_the_depth():
    from palmrl.plan import make_plan

    plain = make_plan(compose("pretrain", ["model=palm_1b"]), "pretrain")
    ckpt = make_plan(compose("pretrain", ["model=palm_1b", "train.activation_checkpointing=true"]), "pretrain")
    assert plain.activations == ckpt.activations_other
    assert 5 < plain.activations / ckpt.activations < plain.shape.depth


def test_plan_needs_a_training_stage_and_names_bad_keys(capsys):
    from palmrl.cli import main

    for argv, needle in ((["plan"], "usage: palmrl plan"), (["plan", "sample"], "usage: palmrl plan"),
                         (["plan", "pretrain", "plan.gpus=0"], "plan.gpus"),
                         (["plan", "pretrain", "train.micro_batchsize=4"], "micro_batchsize")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err
