"""Benchmark the stages users run against the bare model, the machine's ceiling and the reference
implementation, in one run.

    python scripts/bench_stages.py            # 2-8 minutes on 2 CPU cores (~2 on an AMX Xeon, ~8 on an AVX2 EPYC)
    python scripts/bench_stages.py --quick    # smoke run, ~3 minutes (fewer steps; targets not judged)
    python scripts/bench_stages.py --keep runs/bench   # keep the work folder (tokenizer, data, runs)

The bench config is scripts/bench_train.py's: PaLM with vocab 8192, dim 256, depth 6, 8 heads x 32,
multi-query; sequences of 256 tokens, 8 per step, ZeRO-1, one process, every core; bf16 (DeepSpeed's
bf16 mode: bf16 weights and activations, fp32 master weights in AdamW) where the CPU has bf16 matrix
instructions (AVX512-BF16, AMX), else fp32 (an AVX2 CPU multiplies bf16 matrices ~100x slower than
fp32; the bench measures both ceilings first and says which it chose).

What it prints, each figure next to what it is measured against:
  1. the machine: matmul ceiling (fp32, bf16) and memory read bandwidth;
  2. training tokens/s of each stage through `palmrl <stage>` (a subprocess each, DeepSpeed,
     data, logging, checks; the median step of the steady state read from its metrics.jsonl)
     against the bare model doing the same work in plain PyTorch in this process (same shapes,
     same bf16 mode): pretrain and sft (full fine-tuning, data cut to fill 256 tokens) against
     the LM step, reward against the trunk + score head step on the same pairs; the same
     precision throughout; the bare model is measured right before and right after each stage
     and the stage is judged against the mean, so a machine whose speed drifts moves both sides;
  3. time to the first step of each stage (process start → first step; the run's manifest);
  4. the reference implementation (`palm-rlhf-pytorch`, lucidrains, MIT; `make bench` installs
     it) at the same config in this process, its measurements alternating with palmrl's bare
     model: training tokens/s (fp32 weights, bf16 autocast where bf16 is chosen, both) and
     generation (its `generate`, no cache);
  5. decoding: palmrl's `generate` (KV cache) at batch 1 and 8 with fp32 weights, fp16 decode
     weights (`decode_weights=fp16`: FBGEMM's packed fp16 copies, on x86 CPUs) and, where bf16 is
     chosen, bf16 weights, each against its weight-bandwidth floor (weight bytes / read bandwidth)
     and the reference; `palmrl sample` itself (`ignore_eos=true`, 256 new tokens, both decode weights);
  6. a PPO iteration of `palmrl ppo` on the bench model, split into its phases (the stage's own
     `time_*` metrics).

The reference is imported module by module: its package `__init__` pulls in its PPO trainer and
that trainer's dependencies (accelerate, ...), which the PaLM class does not need. `load_reference`
registers an empty `palm_rlhf_pytorch` package pointing at the installed folder, so importing
`palm_rlhf_pytorch.palm` runs only palm.py and what it imports (utils, lora; torch, einops,
beartype, tqdm). Without the package the reference rows say so and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import BENCH, keep_freed_memory, matmul_ceiling, median_time  # noqa: E402

from palmrl.generate import generate  # noqa: E402
from palmrl.model.palm import DECODE_WEIGHTS, PaLM  # noqa: E402

BATCH, SEQ = 8, 256
PROMPT, NEW = 16, 256  # decoding: a 16-token prompt, 256 new tokens
MODEL_OVERRIDES = [f"model.{k}={v}" for k, v in BENCH.to_dict().items()]
COMMON = ["zero=stage1", "logger=console", "train.log_every=1", "train.save_every=0", "train.eval_every=0"]


# ---- the machine ---------------------------------------------------------------------------

def read_bandwidth(repeats: int = 7) -> float:
    """GB/s of reading a 512 MiB fp32 tensor once (a sum: one pass, no writes)."""
    x = torch.ones(128 * 2**20)
    seconds = median_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


# ---- bare model loops (this process) ---------------------------------------------------------

def bf16_mixed(model: torch.nn.Module):
    """DeepSpeed's bf16 mode in plain PyTorch: bf16 model, fp32 master weights in AdamW (torch's fused
    AdamW here and in every bare loop below: the one palmrl's stages run on the CPU)."""
    master = [p.detach().clone() for p in model.parameters()]
    model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(master, lr=1e-4, fused=True)

    def update():
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(list(model.parameters()), master)
    return update


def fp32_adamw(model: torch.nn.Module):
    """fp32 weights, AdamW with gradient clipping (DeepSpeed's fp32 mode)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return update


def bare_lm_step(precision: str):
    """One LM training step on (8, 256) in the stages' precision mode, palmrl's model, its fp32 loss."""
    torch.manual_seed(0)
    model = PaLM(BENCH).train()
    update = bf16_mixed(model) if precision == "bf16" else fp32_adamw(model)
    batch = torch.randint(0, BENCH.vocab_size, (BATCH, SEQ + 1))

    def step():
        model(batch[:, :-1], targets=batch[:, 1:], ignore_index=None).backward()
        update()
    return step


def bare_reward_step(pairs: int, precision: str):
    """One reward-model step on `pairs` pairs of 256 tokens: trunk, a linear score at the last token,
    Bradley-Terry loss; precision mode as above."""
    torch.manual_seed(0)
    model = PaLM(BENCH).train()
    head = torch.nn.Linear(BENCH.dim, 1, bias=False)
    module = torch.nn.ModuleDict({"palm": model, "head": head})
    update = bf16_mixed(module) if precision == "bf16" else fp32_adamw(module)
    tokens = torch.randint(0, BENCH.vocab_size, (2 * pairs, SEQ))

    def step():
        scores = head(model.trunk(tokens)[:, -1]).squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        (-F.logsigmoid(chosen - rejected).mean()).backward()
        update()
    return step


def autocast_step(model: torch.nn.Module, loss_fn, precision: str):
    """One step with fp32 weights and AdamW, under bf16 autocast when the precision is bf16: the mode
    both implementations are compared in."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, BENCH.vocab_size, (BATCH, SEQ + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# ---- the reference implementation ----------------------------------------------------------

def load_reference():
    """lucidrains' PaLM class (palm_rlhf_pytorch.palm.PaLM) without running the package __init__, or None."""
    spec = importlib.util.find_spec("palm_rlhf_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("palm_rlhf_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("palm_rlhf_pytorch", package)
    from palm_rlhf_pytorch.palm import PaLM as Reference

    return Reference


def reference_model(Reference):
    """The reference PaLM at the bench config (its attention is multi-query, as palmrl's kv_heads=1)."""
    torch.manual_seed(0)
    return Reference(num_tokens=BENCH.vocab_size, dim=BENCH.dim, depth=BENCH.depth, heads=BENCH.heads,
                     dim_head=BENCH.dim_head, ff_mult=BENCH.ff_mult)


def reference_version() -> str:
    try:
        from importlib.metadata import version

        return version("palm-rlhf-pytorch")
    except Exception:  # noqa: BLE001 - a missing distribution is reported as such
        return "?"


# ---- decoding --------------------------------------------------------------------------------

def palmrl_decode(batch: int, dtype: torch.dtype, new_tokens: int, weights: str = "fp32") -> float:
    """Generated tokens/s of palmrl's generate (KV cache, sampling at temperature 1) at `batch` rows;
    `weights`: what one-token steps multiply by (generate's decode_weights). The model keeps its
    decode copies across calls, as in `palmrl sample` and `serve`: the warm-up call makes them."""
    torch.manual_seed(0)
    model = PaLM(BENCH).to(dtype).keep_decode_copies()
    prompts = torch.randint(1, BENCH.vocab_size, (batch, PROMPT)).tolist()
    generate(model, prompts, max_new_tokens=8, decode_weights=weights)  # warm-up
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, generator=torch.Generator().manual_seed(0),
                   decode_weights=weights)
    seconds = time.perf_counter() - start
    assert out.response_mask.all(), "no eos_id given: every row runs the full length"
    return batch * new_tokens / seconds


def reference_decode(Reference, batch: int, new_tokens: int) -> float:
    """Generated tokens/s of the reference's generate (no cache; its default top-k filter, temperature 1)."""
    model = reference_model(Reference)
    prompt = torch.randint(1, BENCH.vocab_size, (batch, PROMPT))
    model.generate(PROMPT + 4, prompt)  # warm-up
    start = time.perf_counter()
    out = model.generate(PROMPT + new_tokens, prompt)
    seconds = time.perf_counter() - start
    assert out.shape == (batch, new_tokens)
    return batch * new_tokens / seconds


# ---- the stages (subprocesses) ---------------------------------------------------------------

def palmrl_cli(work: Path, *args: str, log: Path) -> float:
    """Run `palmrl <args>` in `work` with every core; its wall seconds. Exits with its log on failure."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PALMRL_CACHE_DIR": str(work / "cache"),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "palmrl", *args], cwd=work, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_stages: `palmrl {' '.join(args)}` failed (exit {proc.returncode}):\n"
                 f"{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def stage_result(folder: Path) -> dict:
    """Steady-state seconds per step (median of steps 3.., log_every=1), tokens per step, startup seconds."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    manifest = json.loads((folder / "final" / "manifest.json").read_text())
    tokens_per_step = manifest["metrics"]["tokens_seen"] / manifest["step"]
    seconds = [tokens_per_step / r["tokens_per_s"] for r in train]
    steady = seconds[2:] or seconds
    return {"step_s": statistics.median(steady), "tokens_per_step": tokens_per_step,
            "startup_s": manifest.get("startup_s"), "rows": train, "wall_s": manifest.get("wall_s")}


def text_data(work: Path) -> tuple[Path, Path]:
    """SFT and preference JSONL whose every example fills 256 tokens (cut there by the stages): the
    embedded chit-chat, a short prompt and a long reply. Same shapes every step, like pretraining."""
    from palmrl.data.embedded import embedded_texts

    docs = [d for d in embedded_texts() if len(d) > 3000][:400]
    sft, prefs = work / "sft.jsonl", work / "prefs.jsonl"
    with sft.open("w") as f:
        for d in docs:
            f.write(json.dumps({"prompt": d[:200], "response": d[200:3000]}) + "\n")
    with prefs.open("w") as f:
        for a, b in zip(docs[0::2], docs[1::2]):
            f.write(json.dumps({"prompt": a[:200], "chosen": a[200:3000], "rejected": b[200:3000]}) + "\n")
    return sft, prefs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (fewer steps, shorter decoding)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    steps = 8 if args.quick else 24
    new_tokens = 32 if args.quick else NEW
    bare_steps = 3 if args.quick else 8
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_stages-") if args.keep is None else None
    work = Path(tmp.name) if tmp else args.keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    n_params = PaLM(BENCH).num_params()
    print(f"bench_stages: {n_params / 1e6:.2f}M-parameter PaLM (vocab 8192, dim 256, depth 6, 8x32 heads, MQA), "
          f"batch {BATCH} x {SEQ}, ZeRO-1; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"work folder {work}; load average {os.getloadavg()[0]:.1f}", flush=True)

    # 0. the machine, and the precision the stages run in: bf16 where this CPU multiplies bf16 matrices
    # at speed (AVX512-BF16 / AMX), else fp32 (an AVX2 CPU runs bf16 matmuls ~100x slower than fp32)
    # the same sizes in --quick (smaller squares under-read the ceiling: a bare step measured 112% of it)
    sizes, mm_repeats = [1024, 2048], 3 if args.quick else 5
    ceiling = {"fp32": matmul_ceiling(torch.float32, sizes, mm_repeats)[0],
               "bf16": matmul_ceiling(torch.bfloat16, [512], 1)[0]}
    if ceiling["bf16"] >= 0.5 * ceiling["fp32"]:
        precision = "bf16"
        ceiling["bf16"] = matmul_ceiling(torch.bfloat16, sizes, mm_repeats)[0]
    else:
        precision = "fp32"
        print(f"  bf16 matmuls run at {ceiling['bf16']:.1f} GFLOP/s here against {ceiling['fp32']:.0f} in fp32 "
              f"(CPU capability {torch.backends.cpu.get_cpu_capability()}: no bf16 instructions): everything below "
              f"runs in fp32", flush=True)
    bandwidth = read_bandwidth()
    peak = ceiling[precision]

    # 1. the stages (each a subprocess with every core; nothing else runs meanwhile)
    tok = work / "tokenizer"
    if not (tok / "manifest.json").exists() and not any(tok.glob("*.model")):
        palmrl_cli(work, "tokenizer", "model.vocab_size=8192", f"tokenizer.path={tok}", log=logs / "tokenizer.log")
    sft_data, prefs_data = text_data(work)
    run = ["run_name=bench", "overwrite=true", f"precision={precision}", *COMMON]
    pre = ["pretrain", *run, *MODEL_OVERRIDES, f"tokenizer.path={tok}", f"train.seq_len={SEQ}",
           f"train.micro_batch_size={BATCH}", "train.eval_batches=1"]
    print("  pretrain (warm-up: tokenised data cached, first DeepSpeed use) ...", flush=True)
    palmrl_cli(work, *pre, "train.max_steps=2", log=logs / "pretrain-warmup.log")

    # each training stage runs between two measurements of the bare model doing its work in this
    # process (with every core, like the stage): the stage is judged against their mean, so a machine
    # that speeds up or slows down over the run moves both sides alike
    keep_freed_memory()  # palmrl's runtime does this in every stage process on the CPU
    bare_steps_of = {"lm": bare_lm_step(precision), "reward": bare_reward_step(BATCH // 2, precision)}
    bare: dict[str, list[float]] = {"pretrain": [], "sft": [], "reward": []}

    def bracketed(name: str, bare_key: str, *stage_args: str) -> dict:
        tokens_per_s = lambda: BATCH * SEQ / median_time(bare_steps_of[bare_key], bare_steps)  # noqa: E731
        bare[name].append(tokens_per_s())
        print(f"  {name} ...", flush=True)
        palmrl_cli(work, *stage_args, log=logs / f"{name}.log")
        bare[name].append(tokens_per_s())
        return stage_result(work / "runs/bench" / name)

    stages = {"pretrain": bracketed("pretrain", "lm", *pre, f"train.max_steps={steps}")}
    ckpt = work / "runs/bench/pretrain/final"
    stages["sft"] = bracketed("sft", "lm", "sft", *run, f"init_from={ckpt}", "lora=none", "data=my_instructions",
                              f"data.path={sft_data}", f"train.max_len={SEQ}", f"train.micro_batch_size={BATCH}",
                              f"train.max_steps={steps}", "train.eval_examples=8")
    stages["reward"] = bracketed("reward", "reward", "reward", *run, f"init_from={ckpt}", "lora=none", "data=my_prefs",
                                 f"data.path={prefs_data}", f"train.max_len={SEQ}",
                                 f"train.micro_batch_size={BATCH // 2}", f"train.max_steps={steps}")
    print("  sample ...", flush=True)
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"{d[:60]}\n" for d in list(open(sft_data))[:BATCH]))
    sample_out = work / "sample.jsonl"
    sample_lines = {}
    for weights in DECODE_WEIGHTS:
        log = logs / f"sample-{weights}.log"
        palmrl_cli(work, "sample", f"ckpt={work / 'runs/bench/sft'}", f"prompt_file={prompts}", "chat=false",
                   f"max_new_tokens={new_tokens}", "ignore_eos=true", "temperature=1.0", "top_k=0", "format=jsonl",
                   f"output={sample_out}", "overwrite=true", "precision=fp32", f"decode_weights={weights}", log=log)
        sample_lines[weights] = next((line for line in log.read_text().splitlines() if "tokens/s" in line), "")
    print("  ppo ...", flush=True)
    ppo_iters = 3 if args.quick else 5
    palmrl_cli(work, "ppo", *run, f"policy={work / 'runs/bench/sft'}", f"reward={work / 'runs/bench/reward'}",
               "lora=r8", "train.eval_examples=0", f"train.max_steps={ppo_iters}", "ppo.rollout_batch=16",
               "ppo.samples_per_prompt=4", "ppo.minibatch=8", "ppo.epochs=1", "ppo.max_new_tokens=32",
               "data=prompts", log=logs / "ppo.log")
    ppo = stage_result(work / "runs/bench/ppo")
    ppo_rows, ppo_startup = ppo["rows"][1:], ppo["startup_s"]  # iteration 1 warms up

    # 2. this process: the reference, alternating with palmrl's bare model
    print("  reference ...", flush=True)
    Reference = load_reference()
    ours_auto, ref_auto = [], []
    lm_loss = lambda m, b: m(b[:, :-1], targets=b[:, 1:], ignore_index=None)  # noqa: E731
    ours_step = autocast_step(PaLM(BENCH).train(), lm_loss, precision)
    ref_step = None
    if Reference is not None:
        ref_step = autocast_step(reference_model(Reference).train(), lambda m, b: m(b, return_loss=True), precision)
    for _ in range(3):  # alternating rounds: both see the same load
        ours_auto.append(BATCH * SEQ / median_time(ours_step, bare_steps))
        if ref_step is not None:
            ref_auto.append(BATCH * SEQ / median_time(ref_step, bare_steps))

    # 3. decoding
    print("  decoding ...", flush=True)
    # (label, model dtype, decode_weights, bytes per parameter read per token)
    variants = [("fp32", torch.float32, "fp32", 4), ("fp16 decode (FBGEMM)", torch.float32, "fp16", 2)]
    if precision == "bf16":
        variants.append(("bf16", torch.bfloat16, "fp32", 2))
    decode = {(b, v[0]): palmrl_decode(b, v[1], new_tokens, v[2]) for b in (1, 8) for v in variants}
    ref_decode = {b: reference_decode(Reference, b, new_tokens) for b in (1, 8)} if Reference is not None else {}

    # the table
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x"

    def verdict(ok: bool) -> str:
        return "n/a (--quick)" if args.quick else ("met" if ok else "**NOT met**")

    lm = statistics.mean(bare["pretrain"])
    lines = ["| measurement | value | against | ratio | target |", "|---|---|---|---|---|",
             f"| matmul ceiling bf16 / fp32 (square, best of {sizes}) | {ceiling['bf16']:.0f} / "
             f"{ceiling['fp32']:.0f} GFLOP/s | | | |",
             f"| memory read bandwidth (sum of 512 MiB) | {bandwidth:.1f} GB/s | | | |",
             f"| bare model LM step, {precision} (plain PyTorch) | {lm:,.0f} tokens/s | {precision} matmul ceiling | "
             f"{6 * n_params * lm / 1e9 / peak:.0%} | ≥ 60%: {verdict(6 * n_params * lm / 1e9 >= 0.6 * peak)} |"]
    for name in ("pretrain", "sft", "reward"):
        s, (before, after) = stages[name], bare[name]
        tps, same_work = BATCH * SEQ / s["step_s"], (before + after) / 2
        lines.append(f"| `palmrl {name}`{' (lora=none)' if name != 'pretrain' else ''}, steady step | "
                     f"{tps:,.0f} tokens/s ({s['step_s'] * 1000:.0f} ms/step) | bare model, same work, measured "
                     f"just before / after ({before:,.0f} / {after:,.0f}) | {ratio(tps, same_work)} | ≥ 0.90x: "
                     f"{verdict(tps >= 0.9 * same_work)} |")
    for name in ("pretrain", "sft", "reward"):
        startup = stages[name]["startup_s"]
        lines.append(f"| `palmrl {name}` time to first step (process start → step 1) | "
                     f"{startup:.1f} s | | | < 10 s: {verdict(startup < 10)} |")
    lines.append(f"| `palmrl ppo` time to first step | {ppo_startup:.1f} s | | | |")
    if Reference is not None:
        ours, ref = statistics.median(ours_auto), statistics.median(ref_auto)
        pre_tps = BATCH * SEQ / stages["pretrain"]["step_s"]
        mode = "bf16 autocast" if precision == "bf16" else "fp32"
        lines += [f"| reference PaLM {reference_version()}, {mode} (median of 3 alternating rounds) | "
                  f"{ref:,.0f} tokens/s | | | |",
                  f"| palmrl bare model, {mode} (same rounds) | {ours:,.0f} tokens/s | reference | "
                  f"{ratio(ours, ref)} | |",
                  f"| **`palmrl pretrain` {precision}** | {pre_tps:,.0f} tokens/s | reference, {mode} | "
                  f"**{ratio(pre_tps, ref)}** | ≥ 1.5x: {verdict(pre_tps >= 1.5 * ref)} |"]
    else:
        lines.append("| reference implementation | not installed (`pip install palm-rlhf-pytorch`, or make bench) "
                     "| | | |")
    for b in (1, 8):
        for name, _, _, per_param in variants:
            tps = decode[(b, name)]
            floor_s = n_params * per_param / (bandwidth * 1e9)
            step_ms = b / tps * 1000
            row = (f"| decode batch {b}, {name} weights, {new_tokens} new (KV cache) | {tps:,.0f} tokens/s "
                   f"({step_ms:.2f} ms/step) | weight-read floor {floor_s * 1000:.2f} ms/step | "
                   f"{step_ms / 1000 / floor_s:.2f}x the floor |")
            target = f" within 1.5x: {verdict(step_ms / 1000 <= 1.5 * floor_s)} |" if b == 1 else " |"
            lines.append(row + target)
        if b in ref_decode:
            best = max(decode[(b, v[0])] for v in variants)
            goal = "≥ 30x: " + verdict(best >= 30 * ref_decode[b]) if b == 8 else ""
            lines.append(f"| reference generate, batch {b}, {new_tokens} new (no cache) | {ref_decode[b]:,.1f} "
                         f"tokens/s | palmrl's best above | {ratio(best, ref_decode[b])} | {goal} |")
    for weights, line in sample_lines.items():
        if line:
            lines.append(f"| `palmrl sample decode_weights={weights}` (fp32 model, batch {BATCH}, ignore_eos) | "
                         f"{line.split(': ', 1)[-1]} | | | |")
    if ppo_rows:
        phases = [k for k in ppo_rows[0] if k.startswith("time_")]
        total = statistics.median(sum(r[k] for k in phases) for r in ppo_rows)
        parts = ", ".join(f"{k[5:-2]} {statistics.median(r[k] for r in ppo_rows):.2f} s" for k in phases)
        lines.append(f"| `palmrl ppo` iteration (16 rollouts x 32 tokens, LoRA r8, {precision}; median of "
                     f"{len(ppo_rows)}) | {total:.2f} s | {parts} | | |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.1f}\n")
    print("\n".join(lines))
    print("\nRatios are from this one run. GFLOP/s = 6 x N x tokens/s with N = all parameters. The stages' "
          "steady step is the median of steps 3..N (log_every=1). Floor = weight bytes / read bandwidth: "
          "each decoded token reads every weight once.")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
