"""Run tracking: rich console on rank 0, `metrics.jsonl` always, Weights & Biases when asked.

Every rank builds a Tracker; only rank 0 prints or writes. metrics.jsonl gets one JSON object per
logged step (`{"step": 10, "split": "train", "loss": ...}`); on resume the lines past the resumed
step are cut so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from palmrl.io import read_jsonl, write_atomic

console = Console(stderr=True, highlight=False)
WANDB_ID_FILE = "wandb_run_id"  # in the run folder: the wandb run a resumed stage continues


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl → list of dicts (a last line torn by kill -9 mid-write is dropped)."""
    if not Path(path).is_file():
        return []
    return [row for _, row in read_jsonl(path, key="metrics", torn_tail="drop")]


class Tracker:
    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, stage: str,
                 logger_cfg: Mapping | None = None, config: Mapping | None = None):
        self.enabled = enabled
        self.stage = stage
        self.total_steps = total_steps
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self._progress: Progress | None = None
        self._task = None
        self._wandb = None
        self._last: dict[str, float] = {}
        if not enabled:
            return
        if logger_cfg and logger_cfg.get("wandb"):
            self._wandb = self._start_wandb(out_dir, logger_cfg, config)

    @staticmethod
    def _start_wandb(out_dir: Path, logger_cfg: Mapping, config: Mapping | None):
        """wandb.init with the logger's project, entity, mode, tags, group and notes. The run id is kept
        in <out_dir>/wandb_run_id, so a resumed stage (resume=auto) continues the same wandb run; a
        replaced one (overwrite=true) removes the file and starts a new run."""
        import wandb

        mode = str(logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline")
        id_file = Path(out_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase letters and digits too
        tags = logger_cfg.get("tags") or []
        if isinstance(tags, str):
            tags = [tags]
        run = wandb.init(project=logger_cfg.get("project", "palmrl"), entity=logger_cfg.get("entity"),
                         dir=str(out_dir), mode=mode, config=dict(config or {}),
                         name=f"{Path(out_dir).parent.name}-{Path(out_dir).name}", id=run_id, resume="allow",
                         tags=[str(t) for t in tags] or None, group=logger_cfg.get("group"),
                         notes=logger_cfg.get("notes"), job_type=logger_cfg.get("job_type"))
        write_atomic(id_file, run_id + "\n")
        return run

    def truncate_after(self, step: int) -> None:
        """Resume: forget metrics logged after `step` by the run that was interrupted."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [m for m in read_metrics(self.metrics_path) if m.get("step", 0) <= step]
        write_atomic(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def summary(self, title: str, rows: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold cyan")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, _fmt(value))
        console.print(table)

    def start(self, first_step: int) -> None:
        if not self.enabled:
            return
        self._t0, self._step0 = time.perf_counter(), first_step
        self._progress = Progress(
            TextColumn(f"[bold]{self.stage}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
            transient=False, disable=not console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.stage, total=self.total_steps, completed=first_step, info="")

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=step)
        self._last.update({f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("split",))
        if self._progress is not None and console.is_terminal:
            self._progress.update(self._task, completed=step, info=line[:80])
            self._progress.console.print(f"[dim]{split}[/] {line}")
        else:
            console.print(f"{self.stage} {split} {line}")

    def note(self, text: str) -> None:
        """A one-line warning in the console (not a metric)."""
        if self.enabled:
            console.print(f"[yellow]{self.stage}: {escape(text)}[/]")

    def note_plain(self, text: str) -> None:
        """One dim informational line in the console (not a metric)."""
        if self.enabled:
            console.print(f"[dim]{self.stage}: {escape(text)}[/]")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def finish(self, rows: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self.summary(f"{self.stage} finished", rows)
        if self._wandb is not None:
            self._wandb.summary.update({k: _jsonable(v) for k, v in rows.items()})
            self._wandb.finish()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
