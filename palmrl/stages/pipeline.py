"""`palmrl pipeline`: tokenizer → pretrain → sft → reward → ppo | grpo | dpo → report, chained by path.

`rl=` picks the stage(s) after SFT: `rl=grpo`, or `rl=[ppo,grpo,dpo]` to run all three from the
same SFT and reward model (the report puts them side by side); `stages=` lists `rl` where they go.

Each stage runs as its own `palmrl <stage>` process (under `launcher` when given, e.g. torchrun),
writing under runs/<run_name>/<stage>/. A stage whose final checkpoint exists and was made with
the same config is skipped; one that was interrupted continues with resume=auto; one finished
with a different config stops the pipeline rather than overwrite it. So rerunning after a crash
picks up where it stopped.

Per-stage overrides: `sft.lora=r16` on the pipeline's command line reaches `palmrl sft` as
`lora=r16` (the CLI takes them out with `route_overrides` and hands them to `run`).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from rich.markup import escape

from palmrl.config import CHAIN, RL_STAGES
from palmrl.errors import Preempted, UserError
from palmrl.tracking import Tracker, console

STEPS = (*CHAIN, "report")  # what `stages=` may list (and `rl`, which stands for the `rl=` choice)
TRAINING = ("pretrain", "sft", "reward", *RL_STAGES)
IGNORED_KEYS = ("out_dir", "resume", "overwrite", "cache_dir")  # differences here never force a rerun


def route_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `<stage>.<key>=<value>` overrides out by stage: (the pipeline's own, {stage: overrides})."""
    routed: dict[str, list[str]] = {}
    kept = []
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in STEPS and "=" in rest and not item.startswith(("+", "~")):
            routed.setdefault(head, []).append(rest)
        else:
            kept.append(item)
    return kept, routed


def _value(value) -> str:
    """A value as a Hydra override accepts it: plain when safe, else single-quoted."""
    text = str(value)
    return text if re.fullmatch(r"[\w./:@+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def group_choices() -> dict[str, str]:
    """The pipeline's model= and zero= choices, which it passes on to the stages by name.

    They are config groups in the pipeline's defaults list (a plain key named like a group cannot be
    overridden: Hydra reads `model=palm_small` as a group choice), so Hydra also checks the option
    exists. A value inside a group (`model.dim=128`) would reach no stage, so it is refused with the
    per-stage spelling that does.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    for item in hydra_cfg.overrides.task:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.startswith(("model.", "zero.")):
            also = f" and tokenizer.{key}=…" if key == "model.vocab_size" else ""
            raise UserError(f"{key}: the pipeline passes only the model= and zero= choices to its stages; "
                            f"set the value for each stage that uses it, e.g. pretrain.{key}=…{also}")
    return {group: str(hydra_cfg.runtime.choices[group]) for group in ("model", "zero")}


def stage_args(cfg: DictConfig, stage: str, run_dir: Path, choices: dict[str, str],
               routed: dict[str, list[str]]) -> list[str]:
    """The command-line overrides one stage gets: chaining paths, shared choices, then the user's."""
    common = [f"run_name={_value(cfg.run_name)}", f"seed={cfg.seed}", f"precision={cfg.precision}",
              f"cache_dir={_value(Path(str(cfg.cache_dir)).expanduser())}"]
    pretrain = str(cfg.pretrain_ckpt) if cfg.pretrain_ckpt else str(run_dir / "pretrain")
    sft_policy = f"policy={_value(run_dir / 'sft')}"
    chain = {
        "tokenizer": [f"model={choices['model']}"],
        "pretrain": [f"model={choices['model']}", f"zero={choices['zero']}"],
        "sft": [f"zero={choices['zero']}", f"init_from={_value(pretrain)}"],
        "reward": [f"zero={choices['zero']}", f"init_from={_value(run_dir / 'sft')}"],
        "ppo": [f"zero={choices['zero']}", sft_policy, f"reward={_value(run_dir / 'reward')}"],
        "grpo": [f"zero={choices['zero']}", sft_policy, f"reward={_value(run_dir / 'reward')}"],
        "dpo": [f"zero={choices['zero']}", sft_policy],
        "report": [f"run_dir={_value(run_dir)}"],
    }[stage]
    if stage in ("sft", "reward", *RL_STAGES) and cfg.get("tasks") is not None:
        common.append("++data.tasks=[" + ",".join(str(t) for t in cfg.tasks) + "]")
    if stage == "report":
        common = common[:2]
    defaults = list(cfg.stage_overrides.get(stage, []))
    user = routed.get(stage, [])
    return [*common, *chain, *defaults, *user]


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def _compose(stage: str, args: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from palmrl.config import CONFIG_DIR
    from palmrl.runtime import training_precision

    def build() -> dict:
        cfg = compose(config_name=stage, overrides=args)
        plain = OmegaConf.to_container(cfg, resolve=True)
        if "train" in plain:  # as run_stage records it in the manifest
            plain["precision"] = training_precision(plain["precision"])
        return plain

    if GlobalHydra.instance().is_initialized():
        return build()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return build()


def _run_child(command: list[str]) -> tuple[int, str | None]:
    """Run one stage and wait for it, even through Ctrl-C / SIGTERM: the stage saves a checkpoint
    and exits 0 on its own. SIGINT from a terminal reaches the child directly (same process group);
    SIGTERM sent to the pipeline alone (a scheduler, `kill`) is passed on."""
    child = subprocess.Popen(command)
    received: list[str] = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return code, (received[0] if received else None)


def plan(stage: str, args: list[str], run_dir: Path, *, upstream_changed: bool = False) -> str:
    """run | skip | resume | replace for a stage, from what its folder already holds.

    A finished stage is skipped when its config is the one wanted and its parent is still the
    checkpoint it was trained from; it is replaced (overwrite=true) when an upstream stage was
    just redone or the user asked with `<stage>.overwrite=true`.
    """
    folder = run_dir / stage
    if "overwrite=true" in args and (folder / "final").exists():
        return "replace"
    if stage == "report":
        return "run"
    if stage == "tokenizer":
        return "skip" if any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json")) else "run"
    final = folder / "final" / "manifest.json"
    if final.is_file():
        done = _plain(json.loads(final.read_text()).get("config", {}))
        wanted = _plain(_compose(stage, args))
        if done == wanted:
            return "replace" if upstream_changed else "skip"
        changed = sorted(k for k in set(done) | set(wanted) if done.get(k) != wanted.get(k))
        raise UserError(f"pipeline: {folder} holds a finished {stage} run made with a different config "
                        f"(differs in: {', '.join(changed[:4])}); choose another run_name, or add "
                        f"{stage}.overwrite=true to replace it")
    if (folder / "deepspeed" / "latest").is_file() and upstream_changed:
        return "replace"
    if (folder / "deepspeed" / "latest").is_file():
        return "resume"
    return "run"


def rl_choice(value) -> list[str]:
    """`rl=grpo` or `rl=[ppo,grpo,dpo]` as a list of stage names, checked."""
    chosen = [value] if isinstance(value, str) else list(value or [])
    unknown = [str(name) for name in chosen if name not in RL_STAGES]
    if unknown or not chosen:
        raise UserError(f"rl: unknown or empty choice {unknown or chosen}; choose from {', '.join(RL_STAGES)} "
                        f"(or a list of them: rl=[ppo,grpo,dpo])")
    return list(dict.fromkeys(str(name) for name in chosen))


def expand_stages(cfg: DictConfig) -> list[str]:
    """`stages=` with `rl` replaced by the `rl=` choice, checked."""
    stages: list[str] = []
    for name in cfg.stages:
        if name == "rl":
            stages.extend(rl_choice(cfg.rl))
        elif name not in STEPS:
            raise UserError(f"stages: unknown stage '{name}'; choose from rl, {', '.join(STEPS)}")
        else:
            stages.append(str(name))
    return list(dict.fromkeys(stages))


def job_run_name(cfg: DictConfig) -> str:
    """The run name of this pipeline: `run_name`, except in a --multirun job whose run_name is not built
    per job (no `${...}` in it), which gets `<run_name>/<its overrides>` (`default/model=palm_small`) so
    that the sweep's jobs never share (and stop at) one run folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = str(cfg.run_name)
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed outside the CLI
        return name
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed, not resolved
    # a sweep job lists its run_name override escaped: `run_name=s_$\{hydra\:runtime.choices.model\}`
    per_job = any(str(o).startswith("run_name=") and re.search(r"\$\\?\{", str(o)) for o in task)
    if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.job.override_dirname and not per_job:
        return f"{name}/{hydra_cfg.job.override_dirname}"
    return name


def run(cfg: DictConfig, routed: dict[str, list[str]] | None = None) -> Path:
    """Run the chain; `routed` holds the `<stage>.<key>=<value>` overrides of the command line."""
    stages = [s for s in expand_stages(cfg) if not (cfg.pretrain_ckpt and s in ("tokenizer", "pretrain"))]
    choices = group_choices()
    with open_dict(cfg):
        cfg.run_name = job_run_name(cfg)
    run_dir = Path("runs") / str(cfg.run_name)
    launcher = shlex.split(str(cfg.launcher)) if cfg.launcher else []
    tracker = Tracker(run_dir, enabled=True, total_steps=len(stages), stage="pipeline")
    timings: dict[str, str] = {}
    t_start = time.perf_counter()
    rerun_upstream = False
    for stage in stages:
        args = stage_args(cfg, stage, run_dir, choices, routed or {})
        action = plan(stage, args, run_dir, upstream_changed=rerun_upstream)
        if action == "skip":
            console.print(f"[bold]pipeline[/] {stage}: already done in {run_dir / stage}, skipped")
            timings[stage] = "skipped (done)"
            continue
        if action == "resume":
            args.append("resume=auto")
        if action == "replace":
            args.append("overwrite=true")
        rerun_upstream = True
        training = stage in TRAINING
        starter = launcher if training and launcher else [sys.executable, "-m"]
        command = [*starter, "palmrl", stage, *args]
        console.print(f"[bold]pipeline[/] {stage}: {'continuing' if action == 'resume' else 'running'} "
                      f"`palmrl {stage} {escape(' '.join(args))}`")
        t0 = time.perf_counter()
        code, signalled = _run_child(command)
        resume_hint = f"rerun `palmrl pipeline run_name={cfg.run_name}` to continue from there"
        unfinished = training and not (run_dir / stage / "final" / "manifest.json").is_file()
        if signalled or (code == 0 and unfinished):
            raise Preempted(f"pipeline: stopped by {signalled or 'a signal'} during {stage}; {resume_hint}")
        if code != 0:
            raise UserError(f"pipeline: stage {stage} failed (exit {code}); fix it and rerun `palmrl pipeline "
                            f"run_name={cfg.run_name}` to continue from there")
        timings[stage] = f"{time.perf_counter() - t0:.0f} s"
    timings["total"] = f"{time.perf_counter() - t_start:.0f} s"
    tracker.summary(f"palmrl pipeline: {run_dir}", timings)
    report = run_dir / "report" / "report.md"
    if report.is_file():
        console.print(f"[bold green]report:[/] {report}")
    return run_dir
