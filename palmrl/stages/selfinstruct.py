"""`palmrl selfinstruct`: grow seed tasks into an instruction set with a local or HTTP generator.

Build the filter and the backend from the config, run the loop (palmrl/selfinstruct/pipeline.py)
with a progress bar of kept and rejected records, print what each check rejected. The output
JSONL is appended to round by round, so a rerun resumes; overwrite=true starts it afresh.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from palmrl.io import check_output_file
from palmrl.runtime import seed_everything
from palmrl.selfinstruct.backends import GenParams, make_backend
from palmrl.selfinstruct.filters import DedupConfig, FilterConfig, RecordFilter, dataclass_from_cfg, print_report
from palmrl.selfinstruct.pipeline import PromptConfig, SelfInstruct, load_seeds, report_path
from palmrl.tracking import console


class _Progress:
    """A rich bar of kept/target with the top rejection reasons; a line per 10% when not a terminal."""

    def __init__(self, target: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.target, self._last_line = target, start
        self._bar = Progress(TextColumn("[bold]selfinstruct"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                             disable=not console.is_terminal)
        self._task = self._bar.add_task("selfinstruct", total=target, completed=start, info="")

    @staticmethod
    def info(loop: SelfInstruct) -> str:
        top = sorted(((n, r) for r, n in loop.record_filter.counts().items() if n), reverse=True)[:3]
        rejected = ", ".join(f"{r} {n}" for n, r in top) or "none"
        return f"round {loop.rounds} · rejected: {rejected}"

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def __call__(self, loop: SelfInstruct) -> None:
        kept = len(loop.kept)
        self._bar.update(self._task, completed=kept, info=self.info(loop))
        if not console.is_terminal and (kept - self._last_line >= max(1, self.target // 10) or kept >= self.target):
            self._last_line = kept
            console.print(f"selfinstruct kept {kept}/{self.target} · {self.info(loop)}")


def run(cfg: DictConfig) -> Path | None:
    seed_everything(int(cfg.seed))
    out = Path(str(cfg.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, report_path(out)):
        check_output_file(path, key="out", inputs=[str(cfg.seeds)] if cfg.get("seeds") else [])
    if cfg.overwrite:
        out.unlink(missing_ok=True)
        report_path(out).unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(cfg.out_dir)).mkdir(parents=True, exist_ok=True)
    (Path(str(cfg.out_dir)) / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    # pool and seeds first (cheap checks), then the backend (loads a model or reaches a server)
    record_filter = RecordFilter(FilterConfig.from_cfg(cfg.filters), DedupConfig.from_cfg(cfg.dedup))
    seeds = load_seeds(cfg.seeds)
    backend = make_backend(cfg.generator, seed=int(cfg.seed), batch_size=int(cfg.prompts_per_round))
    try:
        loop = SelfInstruct(backend=backend, seeds=seeds, out=out, target=int(cfg.target),
                            record_filter=record_filter, prompt=dataclass_from_cfg(PromptConfig, cfg.prompt, "prompt"),
                            instruction=GenParams.from_cfg(cfg.instruction, key="instruction"),
                            response=GenParams.from_cfg(cfg.response, key="response"),
                            prompts_per_round=int(cfg.prompts_per_round), give_up_after=int(cfg.give_up_after),
                            seed=int(cfg.seed))
        if loop.resumed_from:
            console.print(f"palmrl selfinstruct: resuming {out} with {loop.resumed_from} records")
        with _Progress(loop.target, len(loop.kept)) as progress:
            report = loop.run(on_round=progress)
    finally:
        backend.close()

    made = report["kept_this_run"] + sum(report["rejected"].values())
    print_report(f"palmrl selfinstruct: {report['kept']}/{report['target']} records in {out} "
                 f"({report['kept_this_run']} new, {report['elapsed_s']:.1f}s)", made,
                 report["kept_this_run"], report["rejected"])
    if report["stopped"] != "target reached":
        console.print(f"[yellow]warning:[/] {report['stopped']}")
    console.print(f"report -> {report_path(out)}")
    return out
