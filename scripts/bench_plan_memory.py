"""Check `palmrl plan`'s memory estimate against the peak memory of real CPU runs.

    python scripts/bench_plan_memory.py     # ~2 minutes on 2 CPU cores

Each run is `palmrl pretrain` (3 steps, byte tokenizer, fp32, ZeRO-1, torch AdamW: what a CPU run
uses) in its own process; its peak RSS (`ru_maxrss`) minus that of the same command with a
one-layer, 32-wide model (the interpreter, torch, DeepSpeed, data: what plan does not model) is
compared with plan's estimate for the same config (cuda=False: unfused attention, no CUDA context)
minus plan's estimate for the one-layer model. Target: every run within 25%.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20
COMMON = ["tokenizer.kind=byte", "model.vocab_size=263", "train.max_steps=3", "train.eval_every=0",
          "train.save_every=0", "train.log_every=1", "train.seq_len=256", "precision=fp32", "zero=stage1"]
RUNS = {
    "floor: 1 layer, width 32, batch 1": ["model=palm_small", "model.dim=32", "model.depth=1", "model.heads=1",
                                          "model.dim_head=32", "train.micro_batch_size=1"],
    "palm_small (23M), batch 16": ["model=palm_small", "train.micro_batch_size=16"],
    "palm_small, batch 16, activation checkpointing": ["model=palm_small", "train.micro_batch_size=16",
                                                       "train.activation_checkpointing=true"],
    "palm_small x 2 depth (42M), batch 16, checkpointing": ["model=palm_small", "model.depth=12",
                                                            "train.micro_batch_size=16",
                                                            "train.activation_checkpointing=true"],
}
CHILD = """
import resource, sys
from palmrl.cli import main
try:
    main(["pretrain", *sys.argv[1:]])
except SystemExit as err:
    if err.code:
        raise
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(args: list[str], work: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled", "PALMRL_CACHE_DIR": str(work / "cache")}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=work, env=env, text=True, capture_output=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")]
    if proc.returncode or not lines:
        sys.exit(f"bench_plan_memory: run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def planned(args: list[str]) -> float:
    from hydra import compose, initialize_config_dir

    from palmrl.config import CONFIG_DIR
    from palmrl.plan import make_plan

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="pretrain", overrides=args)
    return make_plan(cfg, "pretrain", cuda=False).total / MiB


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_plan-") as tmp:
        work = Path(tmp)
        rows, floor = [], None
        for i, (name, extra) in enumerate(RUNS.items()):
            args = [*COMMON, *extra, f"tokenizer.path={work / 'tok'}", f"out_dir={work / f'run{i}'}"]
            measured, plan = peak_rss(args, work), planned(args)
            print(f"  {name:<52} peak RSS {measured:7,.0f} MiB   plan {plan:7,.0f} MiB", flush=True)
            if floor is None:
                floor = (measured, plan)
                continue
            rows.append((name, measured - floor[0], plan - floor[1]))
    print("\n| run (fp32, ZeRO-1, 3 steps, seq 256) | measured peak RSS above the floor | plan | plan / measured |")
    print("|---|---|---|---|")
    worst = 0.0
    for name, measured, plan in rows:
        ratio = plan / measured
        worst = max(worst, abs(ratio - 1))
        print(f"| {name} | {measured:,.0f} MiB | {plan:,.0f} MiB | {ratio:.2f} |")
    print(f"\nworst deviation {worst:.0%} (target ≤ 25%): {'met' if worst <= 0.25 else 'NOT met'}")
    sys.exit(0 if worst <= 0.25 else 1)


if __name__ == "__main__":
    main()
