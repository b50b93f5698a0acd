"""`palmrl dedup in=… out=…`: filter and deduplicate an instruction JSONL, and say what went.

Streams `in` line by line through `palmrl.selfinstruct.filters.RecordFilter` (the same checks
`palmrl selfinstruct` applies while generating), writes kept lines to `out` unchanged and in
order, removed ones to `<out stem>.removed.jsonl` with their reason and the line they repeat, and
the counts to `<out stem>.report.json` and a table. The first of a group of duplicates is kept.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from palmrl.errors import UserError
from palmrl.io import check_output_file, write_atomic
from palmrl.selfinstruct.filters import DedupConfig, FilterConfig, RecordFilter, print_report
from palmrl.tracking import console


def _truncated(record) -> bool:
    """A record that says its response hit the token limit (selfinstruct's provenance does)."""
    if not isinstance(record, dict):
        return False
    provenance = record.get("provenance")
    reason = record.get("finish_reason") or (provenance.get("finish_reason") if isinstance(provenance, dict) else None)
    return reason == "length"


def dedup_file(src: Path, dst: Path, removed_path: Path, record_filter: RecordFilter) -> dict:
    """Filter `src` into `dst` (atomically) and `removed_path`; returns the report."""
    t0 = time.perf_counter()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    total = 0
    removed_tmp = removed_path.with_name(f".{removed_path.name}.tmp-{os.getpid()}")
    with open(src, encoding="utf-8", errors="replace") as fin, open(tmp, "w", encoding="utf-8") as fout, \
            open(removed_tmp, "w", encoding="utf-8") as frem:
        for number, line in enumerate(fin, 1):
            if not line.strip():
                continue
            total += 1
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply: unparsable
                record = None
            verdict = record_filter.offer(record, number, truncated=_truncated(record))
            if verdict.reason is None:
                fout.write(line if line.endswith("\n") else line + "\n")
            else:
                removed = {"line": number, "reason": verdict.reason, "duplicate_of_line": verdict.duplicate_of,
                           "record": record if record is not None else line.rstrip("\n")}
                frem.write(json.dumps(removed, ensure_ascii=False) + "\n")
    tmp.replace(dst)
    removed_tmp.replace(removed_path)
    elapsed = time.perf_counter() - t0
    return {"in": str(src), "out": str(dst), "removed_records": str(removed_path), "records": total,
            "kept": record_filter.kept, "removed": record_filter.counts(),
            "dedup": vars(record_filter.dedup), "elapsed_s": round(elapsed, 3),
            "records_per_s": round(total / elapsed, 1) if elapsed > 0 else None}


def run(cfg: DictConfig) -> Path | None:
    src, dst = Path(str(cfg["in"])), Path(str(cfg.out))
    if not src.is_file():
        raise UserError(f"in: no such file: {src}")
    removed_file, report_file = dst.with_name(f"{dst.stem}.removed.jsonl"), dst.with_name(f"{dst.stem}.report.json")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in (dst, removed_file, report_file):  # none of the three may be the input (or in a checkpoint)
        check_output_file(path, key="out", inputs=[src])
    if dst.exists() and not cfg.overwrite:
        raise UserError(f"out: {dst} exists; set overwrite=true to replace it")
    record_filter = RecordFilter(FilterConfig.from_cfg(cfg.filters), DedupConfig.from_cfg(cfg.dedup))

    report = dedup_file(src, dst, removed_file, record_filter)
    write_atomic(report_file, json.dumps(report, indent=2) + "\n")
    print_report(f"palmrl dedup: {report['kept']} of {report['records']} records kept "
                 f"({report['records_per_s']} records/s)", report["records"], report["kept"], report["removed"])
    console.print(f"kept -> {dst}\nreport -> {report_file}")
    return dst
