"""Benchmark `palmrl ppo` on this machine: rollout speed, iteration time and peak memory.

    python scripts/bench_ppo.py            # full run, ~3 minutes on 2 CPU cores
    python scripts/bench_ppo.py --quick    # smoke run, ~1.5 minutes

At a fixed small config (model=palm_small, ~27M params, with a sentencepiece tokenizer of 8192
ids trained on the embedded corpus; the SFT policy and a LoRA reward model on the same base are
built with random weights, not trained; prompts are the embedded tasks):
  1. rollout tokens/s: PPO's batched sampling with the KV cache against the same sampling
     without the cache (`generate(..., use_cache=False)`), same prompts, same seed, actor scope
     active as in PPO; target: the cache at least 10x faster;
  2. PPO iteration time (rollout + scoring + updates) of the real stage, read from its
     metrics.jsonl, and how much of it is generation;
  3. peak RSS (`ru_maxrss`) of the PPO process with shared-base LoRA against one model's full
     training (`palmrl sft lora=none`, same model and batch), and of PPO with lora=none (separate
     reference and critic copies) for contrast; target: PPO with LoRA at most 1.5x the single
     model. Raw peaks, nothing subtracted; the baseline row is a process that only imports
     torch, DeepSpeed and palmrl.
Every measurement runs in its own child process (this script with --child), so peaks never mix.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = 2  # the machine has 2 cores shared with other work: pin torch to them
MODEL = "palm_small"  # large enough that model memory outweighs the ~0.5 GB torch/DeepSpeed baseline
RESULT = "BENCH_RESULT "  # prefix of the one JSON line a child prints for the parent

# the small PPO config every PPO measurement shares (besides lora=)
PPO = {"rollout_batch": 16, "minibatch": 8, "epochs": 1, "max_new_tokens": 32}
TRAIN = {"eval_examples": 8, "eval_every": 0, "save_every": 0, "log_every": 1}


def ppo_overrides(sft: Path, reward: Path, steps: int, lora: str) -> list[str]:
    return [f"policy={sft}", f"reward={reward}", f"lora={lora}", f"train.max_steps={steps}",
            *(f"ppo.{k}={v}" for k, v in PPO.items()), *(f"train.{k}={v}" for k, v in TRAIN.items())]


def sft_overrides(sft: Path, steps: int) -> list[str]:
    # one model's full training at PPO's minibatch; max_len 96 covers a prompt + 32 response tokens
    return [f"init_from={sft}", "lora=none", f"train.max_steps={steps}",
            f"train.micro_batch_size={PPO['minibatch']}", "train.max_len=96",
            f"train.max_new_tokens={PPO['max_new_tokens']}", "optim.warmup_steps=0",
            *(f"train.{k}={v}" for k, v in TRAIN.items() if k != "log_every"), "train.log_every=1"]


# ---- child side: each function runs in its own process and returns what it measured ----------

def compose(stage: str, overrides: list[str]):
    """The stage config as `palmrl <stage> overrides...` would see it (as tests/conftest.py does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return hydra_compose(config_name=stage, overrides=overrides)


def child_baseline() -> dict:
    """Nothing but the imports every stage process pays for."""
    import deepspeed  # noqa: F401
    import torch  # noqa: F401

    import palmrl.stages.ppo  # noqa: F401
    import palmrl.stages.sft  # noqa: F401
    return {}


def child_build(work: Path) -> dict:
    """A random-weight SFT policy and a LoRA reward model whose manifest parent is that policy."""
    import torch
    import yaml

    from palmrl import checkpoint
    from palmrl.data.embedded import embedded_texts
    from palmrl.model.lora import LoRAConfig, add_lora, lora_state_dict
    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.reward import RewardModel
    from palmrl.stages.reward import export_reward
    from palmrl.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    config = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "model" / f"{MODEL}.yaml").read_text()))
    tokenizer = train_tokenizer(embedded_texts(), vocab_size=config.vocab_size)
    tokenizer_s = time.perf_counter() - t0

    torch.manual_seed(0)
    policy = PaLM(config)
    sft = checkpoint.save(work / "sft" / "final", stage="sft", step=0, model_config=config.to_dict(),
                          tokenizer=tokenizer, config={},
                          weights={k: v.detach() for k, v in policy.named_parameters()})

    # the reward model: the same base, a `reward` LoRA scope and a head, all with non-zero weights
    lora = yaml.safe_load((ROOT / "configs" / "lora" / "r8.yaml").read_text())
    add_lora(policy, "reward", LoRAConfig.from_dict(lora))
    model = RewardModel(policy, objective="pairwise")
    with torch.no_grad():
        for name, param in lora_state_dict(policy, "reward").items():
            dict(policy.named_parameters())[name].normal_(0.0, 0.02)
        model.reward_head.proj.weight.normal_(0.0, 0.02)
    weights, adapters = export_reward(model.state_dict())
    reward = checkpoint.save(
        work / "reward" / "final", stage="reward", step=0, model_config=config.to_dict(), tokenizer=tokenizer,
        config={}, weights=weights, adapters=adapters, parent=checkpoint.load(sft),
        extra={"lora": {"scopes": {"reward": {"rank": lora["rank"], "alpha": lora["alpha"],
                                              "targets": list(lora["targets"])}}, "active": "reward"},
               "reward": {"objective": "pairwise", "num_bins": 5, "score_mean": 0.0, "score_std": 1.0}})
    return {"sft": str(sft), "reward": str(reward), "params": policy.num_params() - sum(
        p.numel() for n, p in policy.named_parameters() if "lora_" in n), "tokenizer_s": tokenizer_s}


def child_generate(sft: Path, reward: Path, new_tokens: int) -> dict:
    """PPO's rollout sampling with and without the KV cache: same model, prompts, seed and settings."""
    import torch

    from palmrl import checkpoint
    from palmrl.data.chat import as_messages, render_prompt
    from palmrl.data.preferences import load_prompts
    from palmrl.generate import generate
    from palmrl.model.lora import lora_scope
    from palmrl.stages.common import apply_lora, policy_from_checkpoint

    cfg = compose("ppo", ppo_overrides(sft, reward, 1, "r8"))
    p = cfg.ppo
    ckpt = checkpoint.load(sft)
    tokenizer = ckpt.tokenizer()
    palm, _ = policy_from_checkpoint(ckpt)
    apply_lora(palm, cfg.lora, "actor")  # PPO samples through the actor scope
    prompts = load_prompts(cfg.data, "train")[:int(p.rollout_batch)]
    prompt_ids = [render_prompt(tokenizer, as_messages(x)) for x in prompts]

    def sample(use_cache: bool, max_new: int):
        generator = torch.Generator().manual_seed(int(cfg.seed))
        start = time.perf_counter()
        with lora_scope(palm, "actor"):
            out = generate(palm, prompt_ids, max_new_tokens=max_new, temperature=float(p.temperature),
                           top_k=int(p.top_k), top_p=float(p.top_p), eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, generator=generator, use_cache=use_cache)
        return out, time.perf_counter() - start

    sample(True, 2), sample(False, 2)  # warm-up
    cached, cached_s = sample(True, new_tokens)
    uncached, uncached_s = sample(False, new_tokens)
    return {"prompt_block": cached.prompt_length, "rows": len(prompt_ids),
            "tokens_cached": int(cached.response_mask.sum()), "seconds_cached": cached_s,
            "tokens_uncached": int(uncached.response_mask.sum()), "seconds_uncached": uncached_s,
            "same_tokens": bool(torch.equal(cached.sequences, uncached.sequences))}


def child_stage(stage: str, overrides: list[str]) -> dict:
    """Run a stage in this process; for ppo also time every rollout's generate call."""
    from palmrl.cli import stage_runner
    from palmrl.runtime import run_stage

    generation: list[tuple[float, int]] = []  # (seconds, tokens) per rollout
    if stage == "ppo":
        import palmrl.stages.ppo as ppo

        inner = ppo.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            generation.append((time.perf_counter() - start, int(out.response_mask.sum())))
            return out
        ppo.generate = timed_generate

    start = time.perf_counter()
    final = run_stage(stage, compose(stage, overrides), stage_runner(stage))
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines() if line]
    return {"wall_s": wall, "generation": generation,
            "train": [m for m in metrics if m.get("split") == "train"]}


def child_main(kind: str, args: list[str]) -> None:
    import resource

    import torch

    torch.set_num_threads(THREADS)
    if kind == "baseline":
        out = child_baseline()
    elif kind == "build":
        out = child_build(Path(args[0]))
    elif kind == "generate":
        out = child_generate(Path(args[0]), Path(args[1]), int(args[2]))
    else:
        out = child_stage(kind, args)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(RESULT + json.dumps(out), flush=True)


# ---- parent side ----------------------------------------------------------------------------

def run_child(kind: str, *args: str, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "WANDB_MODE": "disabled",
           "PALMRL_CACHE_DIR": str(cwd / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, *args],
                          cwd=cwd, env=env, text=True, capture_output=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench_ppo: child '{kind}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1].removeprefix(RESULT))
    out["process_s"] = time.perf_counter() - start
    print(f"  {kind:<10} {out['process_s']:5.1f}s  peak RSS {out['maxrss_mb']:,.0f} MB  "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    return out


def iteration_seconds(stage: dict) -> list[float]:
    """Seconds of each PPO iteration: its logged tokens_per_s over tokens per iteration (log_every=1)."""
    tokens = PPO["rollout_batch"] * PPO["max_new_tokens"]
    return [tokens / m["tokens_per_s"] for m in stage["train"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1.5 minutes)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1:])
        return

    ppo_steps = 2 if args.quick else 3  # iteration 1 warms up; later ones are the steady state
    sft_steps = 2 if args.quick else 4
    new_tokens = 16 if args.quick else PPO["max_new_tokens"]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_ppo-") if args.keep is None else None
    work = Path(tmp.name) if tmp else args.keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_ppo: {MODEL}, torch threads {THREADS}, work folder {work}")

    built = run_child("build", str(work), cwd=work)
    sft, reward = Path(built["sft"]), Path(built["reward"])
    gen = run_child("generate", str(sft), str(reward), str(new_tokens), cwd=work)
    base = run_child("baseline", cwd=work)
    single = run_child("sft", *sft_overrides(sft, sft_steps), "run_name=sft_full", cwd=work)
    shared = run_child("ppo", *ppo_overrides(sft, reward, ppo_steps, "r8"), "run_name=ppo_lora", cwd=work)
    separate = run_child("ppo", *ppo_overrides(sft, reward, ppo_steps, "none"), "run_name=ppo_full", cwd=work)
    load_end = os.getloadavg()

    # ---- numbers -------------------------------------------------------------------------
    cached_tps = gen["tokens_cached"] / gen["seconds_cached"]
    uncached_tps = gen["tokens_uncached"] / gen["seconds_uncached"]
    speedup = cached_tps / uncached_tps

    def ppo_rows(name: str, run: dict) -> list[str]:
        iters = iteration_seconds(run)
        steady = iters[1:] or iters
        gen_s = [s for s, _ in run["generation"]]
        gen_steady = gen_s[1:] or gen_s
        tokens = sum(n for _, n in run["generation"][1:] or run["generation"])
        return [f"| PPO iteration, {name} | {statistics.median(steady):.2f} s "
                f"(first {iters[0]:.2f} s; median of iterations 2..{len(iters)}) | |",
                f"| … of which rollout generation, {name} | {statistics.median(gen_steady):.2f} s "
                f"({tokens / sum(gen_steady):,.0f} tokens/s inside PPO) | |"]

    ratio = shared["maxrss_mb"] / single["maxrss_mb"]
    params = built["params"]
    rows = [
        "| measurement | value | target |", "|---|---|---|",
        f"| rollout generation, KV cache | {cached_tps:,.0f} tokens/s ({gen['tokens_cached']} tokens, "
        f"{gen['seconds_cached']:.2f} s) | |",
        f"| rollout generation, no cache | {uncached_tps:,.0f} tokens/s ({gen['tokens_uncached']} tokens, "
        f"{gen['seconds_uncached']:.2f} s) | |",
        f"| **KV cache speed-up** | **{speedup:.1f}x** (identical tokens: {'yes' if gen['same_tokens'] else 'no'}) "
        f"| ≥ 10x: {'met' if speedup >= 10 else 'NOT met'} |",
        *ppo_rows("LoRA r8 (shared base)", shared),
        *ppo_rows("lora=none", separate),
        f"| peak RSS, baseline (import torch + deepspeed + palmrl) | {base['maxrss_mb']:,.0f} MB | |",
        f"| peak RSS, single model training (`sft lora=none`, {sft_steps} steps) | {single['maxrss_mb']:,.0f} MB | |",
        f"| peak RSS, PPO LoRA r8, shared base (actor, critic, reference, reward) | {shared['maxrss_mb']:,.0f} MB | |",
        f"| peak RSS, PPO lora=none (separate reference, critic, reward copies) | {separate['maxrss_mb']:,.0f} MB "
        f"({separate['maxrss_mb'] / single['maxrss_mb']:.2f}x single) | |",
        f"| **PPO LoRA peak / single model peak** | **{ratio:.2f}x** | ≤ 1.5x: {'met' if ratio <= 1.5 else 'NOT met'} |",
    ]
    config = (f"{MODEL} ({params / 1e6:.1f}M params, vocab 8192 sentencepiece trained on the embedded corpus "
              f"in {built['tokenizer_s']:.1f} s, random weights), embedded task prompts "
              f"(prompt block {gen['prompt_block']} tokens), "
              + " ".join(f"ppo.{k}={v}" for k, v in PPO.items())
              + f" train.max_steps={ppo_steps}, zero=stage1, fp32; generation bench: {gen['rows']} prompts x "
              f"{new_tokens} new tokens, temperature 1, seed 0; single model: sft lora=none micro_batch_size="
              f"{PPO['minibatch']} max_len=96")
    import torch  # only for the versions line; the children did the work

    print(f"\nconfig: {config}")
    print(f"torch {torch.__version__}, {THREADS} threads; load average (1 min) {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end (2 cores, shared); total {time.perf_counter() - t0:.0f} s\n")
    print("\n".join(rows))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
