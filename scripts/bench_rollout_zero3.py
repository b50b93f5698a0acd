"""Benchmark PPO rollouts under ZeRO-3 with 2 ranks: gathering the policy once per rollout
(`ppo.gather_for_rollout=true`, the default) against gathering at every decoded token (`false`,
what DeepSpeed's hooks do by themselves), with ZeRO-1 (nothing to gather) as the reference.

    python scripts/bench_rollout_zero3.py            # ~4 minutes on 2 CPU cores
    python scripts/bench_rollout_zero3.py --quick    # ~2 minutes

Each configuration is a real `palmrl ppo` under `torchrun --nproc_per_node=2` (gloo) on bench_ppo's
random-weight palm_small SFT policy and LoRA reward model; the number is the stage's own
`rollout_tokens_per_s` (sampled tokens over the seconds of the generate call, rank 0), median over
iterations after the first. The gathered and hooked ZeRO-3 runs must sample the same tokens: their
iteration-1 reward and KL are compared, and a mismatch fails the benchmark.
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
sys.path.insert(0, str(ROOT / "scripts"))
from bench_ppo import PPO, TRAIN, run_child  # noqa: E402  (the shared checkpoints and PPO settings)

RUNS = {  # name -> zero group, ppo.gather_for_rollout
    "ZeRO-1": ("stage1", True),
    "ZeRO-3, gathered per token (DeepSpeed hooks)": ("stage3", False),
    "ZeRO-3, gathered once per rollout": ("stage3", True),
}


def torchrun_ppo(work: Path, name: str, sft: Path, reward: Path, zero: str, gather: bool, steps: int) -> list[dict]:
    out = work / name.split(",")[0].replace(" ", "_").replace("-", "") / ("gather" if gather else "hooks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PALMRL_CACHE_DIR": str(work / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "palmrl", "ppo",
           f"policy={sft}", f"reward={reward}", "lora=r8", f"zero={zero}",
           f"ppo.gather_for_rollout={str(gather).lower()}", f"train.max_steps={steps}", f"out_dir={out}",
           *(f"ppo.{k}={v}" for k, v in PPO.items()), *(f"train.{k}={v}" for k, v in TRAIN.items())]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"bench_rollout_zero3: '{name}' failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if r.get("split") == "train"]
    print(f"  {name:<46} {time.perf_counter() - start:6.1f} s  load average {os.getloadavg()[0]:.2f}", flush=True)
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 iterations per run instead of 4")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    steps = 2 if args.quick else 4
    tmp = tempfile.TemporaryDirectory(prefix="bench_rollout-") if args.keep is None else None
    work = Path(tmp.name) if tmp else args.keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_rollout_zero3: 2 ranks (gloo, 1 thread each), {steps} PPO iterations per run, work folder {work}")

    built = run_child("build", str(work), cwd=work, threads=1)
    sft, reward = Path(built["sft"]), Path(built["reward"])
    results = {name: torchrun_ppo(work, name, sft, reward, zero, gather, steps)
               for name, (zero, gather) in RUNS.items()}

    hooked, gathered = (results[name] for name in list(RUNS)[1:])
    same = all(hooked[0][k] == gathered[0][k] for k in ("reward", "kl", "response_tokens"))
    base = statistics.median(r["rollout_tokens_per_s"] for r in results["ZeRO-1"][1:])
    print(f"\n| rollout ({PPO['rollout_batch']} prompts x {PPO['max_new_tokens']} new tokens per rank) "
          f"| tokens/s (rank 0, median of iterations 2..{steps}) | vs ZeRO-1 |\n|---|---|---|")
    for name, train in results.items():
        tps = statistics.median(r["rollout_tokens_per_s"] for r in train[1:])
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f}x |")
    print(f"\nsame samples with and without the gather (iteration 1 reward, KL, lengths): {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
