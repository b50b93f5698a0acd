"""`palmrl report runs/<run>`: tables in the terminal, report.md + report.json + PNG plots in the run folder.

The logic lives in `palmrl.report`; this entry point maps the config onto it and prints.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from palmrl.report import ReportSettings, print_report, write_report
from palmrl.runtime import seed_everything


def run(cfg: DictConfig) -> Path:
    seed_everything(int(cfg.seed))
    b = cfg.best_of_n
    settings = ReportSettings(prompts=int(b.prompts), max_n=int(b.max_n), temperature=float(b.temperature),
                              top_k=int(b.top_k), top_p=float(b.top_p), max_new_tokens=int(b.max_new_tokens),
                              samples=int(cfg.samples), split=str(cfg.split), seed=int(cfg.seed),
                              trust_remote_code=bool(cfg.trust_remote_code))
    report = write_report(Path(str(cfg.run_dir)), Path(str(cfg.out_dir)), settings)
    print_report(report.data)
    print(f"report: {report.markdown}", flush=True)
    return report.markdown
