"""Benchmark PaLM training and generation on this machine, in plain PyTorch (no DeepSpeed).

    python scripts/bench_train.py            # full run, ~3 minutes on 2 CPU cores
    python scripts/bench_train.py --quick    # smoke run, ~30 s

Measures, for the bench model (vocab 8192, dim 256, depth 6, 8 heads x 32, multi-query;
sequence 256, batch 8):
  1. the matmul ceiling: median GFLOP/s of square torch matmuls, fp32 and bf16, best size;
  2. training tokens/s (AdamW, next-token cross-entropy) in
       fp32            fp32 weights,
       bf16 autocast   fp32 weights, bf16 autocast,
       bf16 mixed      bf16 weights and activations, fp32 master weights in the optimizer
                       (what DeepSpeed's bf16 mode does);
     achieved GFLOP/s = 6 * N * tokens/s with N = ALL parameters (the tied embedding counts once:
     it is the output projection's matmul), and its share of the ceiling of the same precision;
  3. generation tokens/s (fp32 weights, 256 new tokens after a 16-token prompt) with and
     without the KV cache, at batch 1 and 8.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from palmrl.generate import generate  # noqa: E402
from palmrl.model.palm import ModelConfig, PaLM  # noqa: E402
from palmrl.runtime import keep_freed_memory  # noqa: E402

BENCH = ModelConfig(vocab_size=8192, dim=256, depth=6, heads=8, dim_head=32, kv_heads=1,
                    max_seq_len=512)  # 512: room for a 16-token prompt + 256 new tokens
BATCH, SEQ = 8, 256


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(dtype: torch.dtype, sizes: list[int], repeats: int) -> tuple[float, int]:
    """Best median GFLOP/s over square matmuls of the given sizes, and the size that gave it."""
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = median_time(lambda a=a, b=b: a @ b, repeats)
        best = max(best, (2 * n**3 / seconds / 1e9, n))
    return best


def train_tokens_per_second(mode: str, steps: int) -> float:
    """Median tokens/s of full training steps (forward, loss, backward, AdamW) in one precision mode.
    AdamW is torch's fused one, as in palmrl's stages on the CPU (palmrl.engine.ds_config)."""
    torch.manual_seed(0)
    model = PaLM(BENCH).train()
    batch = torch.randint(0, BENCH.vocab_size, (BATCH, SEQ + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:].flatten()

    if mode == "bf16 mixed":
        # bf16 model; the optimizer updates fp32 master copies, then copies them back
        master = [p.detach().clone() for p in model.parameters()]
        model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(master, lr=1e-4, fused=True)

        def step():
            logits = model(inputs)  # (B, T, V) bf16
            F.cross_entropy(logits.flatten(0, 1), targets).backward()
            for m, p in zip(master, model.parameters()):
                m.grad = p.grad.float()
                p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(list(model.parameters()), master)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        autocast = mode == "bf16 autocast"

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(inputs)  # (B, T, V)
            F.cross_entropy(logits.flatten(0, 1), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return BATCH * SEQ / median_time(step, steps)


def generation_tokens_per_second(batch: int, new_tokens: int, use_cache: bool) -> float:
    """Generated tokens/s (all rows) for `new_tokens` steps after a 16-token prompt, fp32 weights."""
    torch.manual_seed(0)
    model = PaLM(BENCH)
    prompts = torch.randint(1, BENCH.vocab_size, (batch, 16)).tolist()
    generate(model, prompts, max_new_tokens=4, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
    seconds = time.perf_counter() - start
    assert out.response_mask.shape[1] == new_tokens  # no EOS: every row ran the full length
    return batch * new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~30 s)")
    args = parser.parse_args()

    sizes, mm_repeats = ([512, 1024], 3) if args.quick else ([1024, 2048, 3072], 7)
    train_steps = 2 if args.quick else 8
    new_tokens = 32 if args.quick else 256
    n_params = PaLM(BENCH).num_params()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"bench model: {n_params / 1e6:.2f}M params (all, tied embedding once), "
          f"batch {BATCH} x seq {SEQ}; load average at start {os.getloadavg()[0]:.1f} "
          f"(other processes on these cores lower every number)\n")

    ceiling = {"fp32": matmul_ceiling(torch.float32, sizes, mm_repeats),
               "bf16": matmul_ceiling(torch.bfloat16, sizes, mm_repeats)}
    rows = ["| measurement | value | GFLOP/s | % of ceiling |", "|---|---|---|---|"]
    for name, (gflops, n) in ceiling.items():
        rows.append(f"| matmul ceiling {name} (best of {sizes}: {n}x{n}) | | {gflops:.0f} | 100% |")

    def train_row(mode: str, label: str) -> str:
        tps = train_tokens_per_second(mode, train_steps)
        gflops = 6 * n_params * tps / 1e9
        peak = ceiling["fp32" if mode == "fp32" else "bf16"][0]
        return f"| train {mode}{label} | {tps:,.0f} tokens/s | {gflops:.0f} | {100 * gflops / peak:.0f}% |"

    for mode in ("fp32", "bf16 autocast", "bf16 mixed"):
        rows.append(train_row(mode, ""))
    if keep_freed_memory():  # from here on, for the rest of the process
        for mode in ("fp32", "bf16 mixed"):
            rows.append(train_row(mode, ", glibc keeps freed memory"))

    for batch in (1, 8):
        cached = generation_tokens_per_second(batch, new_tokens, use_cache=True)
        uncached = generation_tokens_per_second(batch, new_tokens, use_cache=False)
        rows.append(f"| generate batch {batch}, {new_tokens} new, KV cache | {cached:,.0f} tokens/s | | |")
        rows.append(f"| generate batch {batch}, {new_tokens} new, no cache | {uncached:,.0f} tokens/s "
                    f"(cache {cached / uncached:.1f}x faster) | | |")
    print("\n".join(rows))
    print(f"\nGFLOP/s = 6 x N x tokens/s with N = {n_params / 1e6:.2f}M (all parameters). "
          "bf16 autocast: fp32 weights under torch.autocast; bf16 mixed: bf16 weights, fp32 master "
          "weights in AdamW (DeepSpeed's bf16 mode). Loss: F.cross_entropy on the logits as they come. "
          f"Load average at end {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    main()
