"""Benchmark the RL stages against each other on this machine: GRPO against PPO at the same rollout
size, DPO's step against SFT's, and the peak memory of each against one model's training.

    python scripts/bench_rlhf.py              # ~3 minutes on 2 CPU cores
    python scripts/bench_rlhf.py --quick      # smoke run (fewer steps; targets not judged)

The models are bench_ppo.py's (palm_small, ~27M params, random weights; a LoRA reward model on the
same base) and every measurement is one `palmrl <stage>` run in its own process (bench_ppo.py's
child runner), so the peaks never mix:
  1. PPO (ppo.advantage=rloo: no critic, as the pipeline runs it) and GRPO, LoRA r8 on a shared
     base, the same rollout (16 responses, 4 per prompt, 32 new tokens, 1 epoch of minibatches of
     8): seconds per iteration (median after the first), read from each run's metrics.jsonl;
  2. DPO (lora=none, the reference log-probs cached before the first step) against SFT (lora=none)
     at the same micro-batch and max_len: seconds per optimizer step (median after the first two),
     and per sequence (a pair is two sequences of one forward); target: at most 1.5x SFT's per
     sequence;
  3. peak RSS of each process against the SFT process (one model's training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ppo  # noqa: E402  - its checkpoints and child runner

ROLLOUT = {"rollout_batch": 16, "minibatch": 8, "epochs": 1, "max_new_tokens": 32}
MICRO, MAX_LEN = 8, 96
TRAIN = ["train.eval_examples=0", "train.eval_every=0", "train.save_every=0", "train.log_every=1"]


def online(stage: str, sft: Path, reward: Path, steps: int) -> list[str]:
    group = "ppo.samples_per_prompt=4" if stage == "ppo" else "grpo.group_size=4"
    extra = ["ppo.advantage=rloo"] if stage == "ppo" else []
    return [f"policy={sft}", f"reward={reward}", "lora=r8", f"train.max_steps={steps}", group, *extra,
            *(f"{stage}.{k}={v}" for k, v in ROLLOUT.items()), *TRAIN]


def pairs_or_sft(stage: str, sft: Path, steps: int) -> list[str]:
    start = "policy" if stage == "dpo" else "init_from"
    return [f"{start}={sft}", "lora=none", f"train.max_steps={steps}", f"train.micro_batch_size={MICRO}",
            f"train.max_len={MAX_LEN}", "data.train_size=512", "data.val_size=16", *TRAIN]


def step_seconds(run: dict, tokens_per_step: int, skip: int) -> float:
    """Median seconds per step from the logged tokens_per_s (log_every=1), after `skip` warm-up steps."""
    rows = [tokens_per_step / m["tokens_per_s"] for m in run["train"] if m.get("tokens_per_s")]
    return statistics.median(rows[skip:] or rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--threads", type=int, default=bench_ppo.THREADS, help="torch threads per process")
    args = parser.parse_args()
    online_steps, step_steps = (2, 4) if args.quick else (4, 12)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_rlhf-") as tmp:
        work = Path(tmp)
        print(f"bench_rlhf: {bench_ppo.MODEL}, {args.threads} torch thread(s) per process")

        def run(kind: str, *child_args: str) -> dict:
            return bench_ppo.run_child(kind, *child_args, cwd=work, threads=args.threads)

        built = run("build", str(work))
        sft, reward = Path(built["sft"]), Path(built["reward"])
        base = run("baseline")
        sft_run = run("sft", *pairs_or_sft("sft", sft, step_steps), "run_name=sft")
        dpo_run = run("dpo", *pairs_or_sft("dpo", sft, step_steps), "run_name=dpo")
        ppo_run = run("ppo", *online("ppo", sft, reward, online_steps), "run_name=ppo")
        grpo_run = run("grpo", *online("grpo", sft, reward, online_steps), "run_name=grpo")

    rollout_tokens = ROLLOUT["rollout_batch"] * ROLLOUT["max_new_tokens"]
    ppo_s, grpo_s = (step_seconds(r, rollout_tokens, 1) for r in (ppo_run, grpo_run))
    sft_s = step_seconds(sft_run, MICRO * MAX_LEN, 2)
    dpo_s = step_seconds(dpo_run, 2 * MICRO * MAX_LEN, 2)
    ratio = dpo_s / sft_s
    per_row = (dpo_s / (2 * MICRO)) / (sft_s / MICRO)  # a pair is two sequences: the cost per sequence
    verdict = "n/a (--quick)" if args.quick else ("met" if per_row <= 1.5 else "**NOT met**")
    single = sft_run["maxrss_mb"]
    rows = [
        ("PPO iteration (rloo, LoRA r8, shared base)", f"{ppo_s:.2f} s", ppo_run["load"], ""),
        ("GRPO iteration (LoRA r8, shared base), same rollout", f"{grpo_s:.2f} s", grpo_run["load"], ""),
        ("**GRPO / PPO iteration time**", f"**{grpo_s / ppo_s:.2f}x**", grpo_run["load"], ""),
        ("SFT step (lora=none, micro-batch 8, max_len 96)", f"{sft_s:.3f} s", sft_run["load"], ""),
        ("DPO step (lora=none, 8 pairs = 16 rows, cached reference)", f"{dpo_s:.3f} s", dpo_run["load"], ""),
        ("DPO / SFT step cost (8 pairs = 16 sequences against 8 sequences)", f"{ratio:.2f}x", dpo_run["load"], ""),
        ("**DPO / SFT cost per sequence** (the cached reference adds no forward)", f"**{per_row:.2f}x**",
         dpo_run["load"], f"≤ 1.5x: {verdict}"),
        ("peak RSS: imports only (torch, DeepSpeed, palmrl)", f"{base['maxrss_mb']:,.0f} MB", base["load"], ""),
        ("peak RSS: SFT, lora=none (one model's training)", f"{single:,.0f} MB", sft_run["load"], "1.00x"),
        ("peak RSS: DPO, lora=none", f"{dpo_run['maxrss_mb']:,.0f} MB", dpo_run["load"],
         f"{dpo_run['maxrss_mb'] / single:.2f}x"),
        ("peak RSS: PPO (rloo), LoRA r8", f"{ppo_run['maxrss_mb']:,.0f} MB", ppo_run["load"],
         f"{ppo_run['maxrss_mb'] / single:.2f}x"),
        ("peak RSS: GRPO, LoRA r8", f"{grpo_run['maxrss_mb']:,.0f} MB", grpo_run["load"],
         f"{grpo_run['maxrss_mb'] / single:.2f}x"),
    ]
    print(f"\n{built['params'] / 1e6:.1f}M params, vocab {built['vocab']}; {time.perf_counter() - t0:.0f} s in all\n")
    print("| measurement | value | load avg (1 min) | vs |")
    print("|---|---|---:|---|")
    for name, value, load, note in rows:
        print(f"| {name} | {value} | {load:.2f} | {note} |")
    print("\nraw: " + json.dumps({"ppo_s": ppo_s, "grpo_s": grpo_s, "sft_s": sft_s, "dpo_s": dpo_s,
                                  "dpo_per_sequence_ratio": per_row}))


if __name__ == "__main__":
    main()
