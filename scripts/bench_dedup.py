"""Benchmark `palmrl dedup` throughput: records/s on synthetic instruction records.

    python scripts/bench_dedup.py              # 100k records (minhash, exact) + 20k (rouge); ~2 min on 2 cores
    python scripts/bench_dedup.py --quick      # 10k records, ~15 s

The records are self-instruct-like: 6-16 words drawn from a Zipf-distributed 5,000-word vocabulary,
with planted duplicates: 10% exact copies (case and punctuation changed) and 10% near copies (one
word inserted) of earlier records. Each method runs the whole stage path (JSON parse, filters,
dedup, writing kept and removed files) through `palmrl.stages.dedup.dedup_file`, and reports
records/s plus recall on the planted duplicates and the share of distinct records removed.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from palmrl.selfinstruct.filters import DedupConfig, FilterConfig, RecordFilter  # noqa: E402
from palmrl.stages.dedup import dedup_file  # noqa: E402

VOCAB = 5000  # words; Zipf-weighted so common words collide the way real instructions do


def synthetic(n: int, seed: int = 0) -> tuple[list[str], set[int]]:
    """JSONL lines and the (1-based) line numbers of planted duplicates."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(VOCAB)]
    weights = [1 / (i + 1) ** 0.8 for i in range(VOCAB)]
    lines, planted, originals = [], set(), []
    while len(lines) < n:
        roll = rng.random()
        if originals and roll < 0.1:
            text = rng.choice(originals).upper() + "!"
            planted.add(len(lines) + 1)
        elif originals and roll < 0.2:
            base = rng.choice(originals).split()
            base.insert(rng.randrange(len(base) + 1), "please")
            text = " ".join(base)
            planted.add(len(lines) + 1)
        else:
            text = " ".join(rng.choices(words, weights, k=rng.randint(6, 16)))
            originals.append(text)
        lines.append(json.dumps({"instruction": text, "input": "", "output": f"answer {len(lines)}"}))
    return lines, planted


def bench(method: str, lines: list[str], planted: set[int], folder: Path) -> dict:
    src = folder / f"in-{len(lines)}.jsonl"
    if not src.exists():
        src.write_text("\n".join(lines) + "\n")
    rf = RecordFilter(FilterConfig(), DedupConfig(method=method))
    t0 = time.perf_counter()
    dedup_file(src, folder / f"out-{method}.jsonl", folder / f"removed-{method}.jsonl", rf)
    elapsed = time.perf_counter() - t0
    removed = {json.loads(x)["line"] for x in (folder / f"removed-{method}.jsonl").read_text().splitlines()}
    distinct = len(lines) - len(planted)
    return {"method": method, "records": len(lines), "seconds": elapsed, "records/s": len(lines) / elapsed,
            "recall": len(removed & planted) / len(planted), "distinct removed": len(removed - planted) / distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k records instead of 100k")
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines, planted = synthetic(n)
        for method in ("exact", "minhash"):
            rows.append(bench(method, lines, planted, folder))
        n_rouge = min(n, 20_000)  # ROUGE-L against the whole pool: quadratic in the worst case
        lines, planted = synthetic(n_rouge)
        rows.append(bench("rouge", lines, planted, folder))
    print("| method | records | seconds | records/s | planted-duplicate recall | distinct records removed |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['records']:,} | {r['seconds']:.1f} | {r['records/s']:,.0f} | "
              f"{r['recall']:.3f} | {r['distinct removed']:.4f} |")


if __name__ == "__main__":
    main()
