"""One GPU, the numbers that matter for the card's model: palm_1b training steps at seq 2048 in bf16
through DeepSpeed, as `palmrl pretrain` builds them. Run by scripts/gpu_smoke.sh; needs CUDA.

    python scripts/gpu_step.py [--micro-batch 8] [--steps 6] [--checkpointing]

1. The flash kernel: a forward and backward of the training path inside
   `sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, which raises when SDPA cannot use flash.
2. MFU: model FLOPs per token 6·N + 12·L·H·E·T (PaLM paper, appendix B) over the measured step
   time, against the GPU's dense bf16 peak.
3. Peak memory (torch.cuda.max_memory_allocated) beside `palmrl plan`'s estimate for the same config.
Prints one markdown table; exits 1 if flash did not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()

    import deepspeed
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from palmrl.config import CONFIG_DIR
    from palmrl.engine import ds_config, param_groups
    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.plan import gib, make_plan
    from palmrl.runtime import init_distributed

    if not torch.cuda.is_available():
        sys.exit("gpu_step: needs CUDA")
    dist = init_distributed()
    name = torch.cuda.get_device_name()
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    overrides = ["model=palm_1b", "precision=bf16", f"train.micro_batch_size={args.micro_batch}",
                 "train.seq_len=2048", f"train.activation_checkpointing={str(args.checkpointing).lower()}",
                 "plan.gpus=1", f"plan.gpu_memory_gb={gpu_gb:.0f}", "optim.torch_adam=null"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="pretrain", overrides=overrides)
    plan = make_plan(cfg, "pretrain")

    config = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = PaLM(config)
    model.activation_checkpointing = args.checkpointing
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                      config=ds_config(cfg, 1))
    B, T = args.micro_batch, 2048
    tokens = torch.randint(0, config.vocab_size, (B, T + 1), device=dist.device)

    # 1. flash: the training path must run with only the flash backend allowed
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            loss = engine(tokens[:, :-1], targets=tokens[:, 1:], ignore_index=None)
            engine.backward(loss)
            engine.step()
        flash = "yes"
    except RuntimeError as err:
        flash = f"NO ({str(err).splitlines()[0][:120]})"

    # 2. timed steps (after that warm-up step)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = engine(tokens[:, :-1], targets=tokens[:, 1:], ignore_index=None)
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    n = model.num_params()
    flops_per_token = 6 * n + 12 * config.depth * config.heads * config.dim_head * T
    achieved = flops_per_token * B * T / step_s / 1e12
    peak = peak_tflops(name)
    mfu = f"{achieved / peak:.1%} of {peak:g} TFLOP/s" if peak else "(unknown peak for this GPU)"

    print(f"\n| palm_1b ({n / 1e9:.2f}B), bf16, seq 2048, micro-batch {B}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {name} | |\n|---|---|")
    print(f"| flash attention kernel in training | {flash} |")
    print(f"| step time | {step_s * 1000:,.0f} ms ({B * T / step_s:,.0f} tokens/s) |")
    print(f"| model FLOP/s | {achieved:,.0f} TFLOP/s, MFU {mfu} |")
    print(f"| peak memory allocated | {gib(torch.cuda.max_memory_allocated())} |")
    print(f"| palmrl plan's estimate | {gib(plan.total)} (model states {gib(plan.model_states)}, "
          f"activations {gib(plan.activations)}, output layer {gib(plan.logits)}, + CUDA slack) |")
    sys.exit(0 if flash == "yes" else 1)


if __name__ == "__main__":
    main()
