"""Benchmark `palmrl serve` on loopback: latency and throughput under a bounded concurrent load,
with request batching on and off.

    python scripts/bench_serve.py                      # random palm_tiny-shaped model, ~1 min on 2 cores
    python scripts/bench_serve.py --ckpt runs/default/sft --quick

The server (the same app `palmrl serve` runs) listens on 127.0.0.1 in this process; C client
threads each send requests back to back (/v1/completions, max_tokens new tokens, temperature 1,
no stop string, so every request decodes the same number of tokens unless it samples eos) until
R requests are done. For each concurrency and batching setting it reports requests/s, generated
tokens/s, p50/p95 latency and rows per decoded batch. "unbatched" decodes one request at a time
(max_batch_size 1); "batched" puts whatever is queued when a batch starts (window 0 ms), or what
arrives within 5 ms of the first request, in one KV-cache batch of up to 16 rows.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from palmrl import checkpoint  # noqa: E402
from palmrl.model.palm import ModelConfig, PaLM  # noqa: E402
from palmrl.serving.app import Limits, Server, build_app  # noqa: E402
from palmrl.serving.generator import Engine  # noqa: E402
from palmrl.serving.scheduler import Batching  # noqa: E402
from palmrl.tokenizer import byte_tokenizer  # noqa: E402

PROMPT = "Write a short note to a friend about the weekend."


def random_checkpoint(folder: Path) -> Path:
    """palm_tiny's shape (dim 64, depth 2, 4 heads x 16, multi-query) over the byte tokenizer."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=256)
    model = PaLM(config)
    return checkpoint.save(folder / "final", stage="sft", step=0, weights=dict(model.named_parameters()),
                           model_config=config.to_dict(), tokenizer=tokenizer, config={})


def serve(engine: Engine, batching: Batching):
    import uvicorn

    server = Server(engine, model_name="bench", limits=Limits(max_concurrent=256, max_tokens=256), batching=batching)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    return uv, thread, f"http://127.0.0.1:{port}", server


def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    latencies, tokens = [], []
    lock, counter = threading.Lock(), iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0})
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"req/s": requests / wall, "tok/s": sum(tokens) / wall, "p50": statistics.median(latencies),
            "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a palmrl checkpoint (default: a random palm_tiny-shaped model)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = (1, 8) if args.quick else (1, 4, 16)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(args.ckpt or random_checkpoint(Path(tmp)))
        print(f"model: {engine.name}, {engine.model.num_params():,} parameters, {torch.get_num_threads()} threads, "
              f"max_tokens {args.max_tokens}\n")
        print("| batching | clients | requests | req/s | tokens/s | p50 latency s | p95 latency s | rows per batch |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, batching in (("unbatched", Batching(max_batch_size=1, window_ms=0)),
                               ("batched, window 0 ms", Batching(max_batch_size=16, window_ms=0)),
                               ("batched, window 5 ms", Batching(max_batch_size=16, window_ms=5))):
            uv, thread, url, server = serve(engine, batching)
            load(url, 2, 4, 8)  # warm-up: first calls pay oneDNN's kernel creation
            for clients in levels:
                requests = max(8, 4 * clients) if args.quick else max(16, 4 * clients)
                b0, r0 = server.scheduler.batches, server.scheduler.rows_decoded
                m = load(url, clients, requests, args.max_tokens)
                per_batch = (server.scheduler.rows_decoded - r0) / max(1, server.scheduler.batches - b0)
                print(f"| {name} | {clients} | {requests} | {m['req/s']:.2f} | {m['tok/s']:.0f} | {m['p50']:.2f} | "
                      f"{m['p95']:.2f} | {per_batch:.1f} |", flush=True)
            uv.should_exit = True
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
