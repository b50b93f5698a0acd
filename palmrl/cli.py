"""`palmrl <stage> [hydra overrides]`: pick configs/<stage>.yaml, compose it with Hydra, run the stage.

The stage table below is the whole CLI (as in litgpt's `__main__`); a test checks that it matches
the stage configs in configs/. Launcher arguments (`--local_rank=N` from the deepspeed launcher)
are taken out of argv before Hydra sees them, and user mistakes end with one line and exit code 2.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from palmrl.config import CONFIG_DIR
from palmrl.errors import UserError

# stage name -> (module with run(cfg), one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "tokenizer": ("palmrl.stages.tokenizer", "train a sentencepiece tokenizer on a data source"),
    "pretrain": ("palmrl.stages.pretrain", "pretrain a PaLM language model on raw text"),
    "sft": ("palmrl.stages.sft", "supervised fine-tuning on instructions (LoRA or full), scored by the task checker"),
    "reward": ("palmrl.stages.reward", "train a reward model on preference pairs (Bradley-Terry) or ratings (binned)"),
    "ppo": ("palmrl.stages.ppo", "RLHF with PPO: KL to the SFT reference, GAE, clipped losses, adaptive KL"),
    "grpo": ("palmrl.stages.grpo", "RLHF with GRPO: group-relative advantages, no critic, KL in the loss (+ Dr. GRPO)"),
    "dpo": ("palmrl.stages.dpo", "direct preference optimisation on preference pairs (DPO, IPO, SimPO)"),
    "sample": ("palmrl.stages.sample", "generate from any checkpoint (best-of-n with a reward model)"),
    "eval": ("palmrl.stages.eval", "score a checkpoint: the embedded tasks, your prompt/answer JSONL, perplexity"),
    "export": ("palmrl.stages.export", "write a policy started from a Hugging Face model as a standard HF folder"),
    "pipeline": ("palmrl.stages.pipeline", "tokenizer → pretrain → sft → reward → ppo → report, chained by path"),
    "report": ("palmrl.stages.report", "tables and PNG plots of a run's stages"),
    "selfinstruct": ("palmrl.stages.selfinstruct",
                     "grow seed examples into an instruction set (local or OpenAI-compatible generator)"),
    "dedup": ("palmrl.stages.dedup", "remove exact and near-duplicate records, filter bad ones, report what went"),
    "serve": ("palmrl.stages.serve", "OpenAI-compatible HTTP server over a checkpoint (completions, chat, streaming)"),
}

# stages that take one bare positional argument: `palmrl report runs/x` means run_dir=runs/x
POSITIONAL = {"report": "run_dir"}

def usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: palmrl <stage> [key=value ...] [--multirun] [--cfg job] [--help]",
        "",
        "stages:",
        *(f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()),
        "",
        "  palmrl plan <stage> [key=value ...]   per-GPU memory of a training config on plan.gpus GPUs",
        "                                        of plan.gpu_memory_gb; exit 2 with the fix when it does not fit",
        "",
        "Every stage reads configs/<stage>.yaml; override any key on the command line",
        "(model=palm_small optim.lr=3e-4 zero=stage2). `palmrl <stage> --help` lists its config.",
    ]
    return "\n".join(lines)


def stage_runner(stage: str) -> Callable:
    module_name, _ = STAGES[stage]
    return importlib.import_module(module_name).run


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` that the deepspeed launcher appends; keep it in the env."""
    kept, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            kept.append(arg)
    return kept


def _fail(message: str, code: int = 2) -> None:
    print(f"palmrl: {'error: ' if code else ''}{message}", file=sys.stderr)
    sys.exit(code)


def _hydra_error_line(err: BaseException) -> str:
    """Hydra's composition errors are multi-line and sometimes empty with the reason in their cause;
    keep the first line that says something."""
    chain, seen = [], err
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for exc in chain:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines:
            line = lines[0]
            options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", str(exc))
            if options:  # Hydra lists a group's choices on the lines that follow; keep them on this one
                choices = ", ".join(o.strip() for o in options.group(2).splitlines() if o.strip())
                line += f"; {options.group(1)}= takes one of: {choices}"
            if line.startswith("Could not override") and any("is not in struct" in str(e) for e in chain):
                line += (" No such key in this stage's config (check the spelling; `palmrl <stage> --cfg job` "
                         "lists the keys).")
            return line
    return type(err).__name__


def _raised_by_hydra(err: BaseException) -> bool:
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "/hydra/" in frames[-1].filename.replace("\\", "/")


def _plan(args: list[str]) -> None:
    """`palmrl plan <stage> [overrides]`: compose the stage's config as a run would, then estimate."""
    from palmrl.plan import TRAINING_STAGES

    if not args or "=" in args[0] or args[0] not in TRAINING_STAGES:
        _fail(f"usage: palmrl plan <{'|'.join(TRAINING_STAGES)}> [key=value ...]")
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from palmrl import plan

    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name=args[0], overrides=args[1:])
        plan.run(cfg, args[0])
    except UserError as err:
        _fail(str(err), err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(_hydra_error_line(err))


def main(argv: list[str] | None = None) -> None:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, overrides = argv[0], argv[1:]
    if stage == "plan":
        _plan(overrides)
        return
    if stage not in STAGES:
        _fail(f"unknown stage '{stage}'; choose one of: {', '.join(STAGES)}")
    if stage in POSITIONAL and overrides and "=" not in overrides[0] and not overrides[0].startswith("-"):
        overrides = [f"{POSITIONAL[stage]}={overrides[0]}", *overrides[1:]]
    routed: dict[str, list[str]] = {}
    if stage == "pipeline":  # `sft.lora=r16` is for the sft stage, not for the pipeline's own config
        from palmrl.stages.pipeline import route_overrides

        overrides, routed = route_overrides(overrides)
    if not (CONFIG_DIR / f"{stage}.yaml").is_file():
        _fail(f"no config for stage '{stage}' in {CONFIG_DIR} (set PALMRL_CONFIG_DIR)")

    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        # DeepSpeed's JIT-built ops go into the environment (as `make` arranges), built once per venv
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def task(cfg):
        from palmrl.config import check_stage_config

        try:
            # before torch and the stage's module are imported: a bad value ends in ~1 s, not ~7
            check_stage_config(stage, cfg, from_cli=True)
            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn it guessed
            from palmrl.runtime import run_stage

            runner = stage_runner(stage)
            if stage == "pipeline":
                runner = functools.partial(runner, routed=routed)
            return run_stage(stage, cfg, runner, from_cli=True, checked=True)
        except UserError as err:  # exit here: Hydra would add its own "Error executing job" line
            _fail(str(err), err.exit_code)

    sys.argv = [f"palmrl-{stage}", *overrides]
    entry = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=stage)(task)
    try:
        # Hydra prints and exits by itself on composition errors unless HYDRA_FULL_ERROR is set;
        # we let it raise so the error becomes one line with exit code 2.
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        entry()
    except UserError as err:
        _fail(str(err), err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(_hydra_error_line(err))
    except ValueError as err:  # Hydra rejects some overrides (`zero=null`) with a bare ValueError
        if not _raised_by_hydra(err):
            raise
        _fail(f"{_hydra_error_line(err)} (in the command-line overrides)")
    except KeyboardInterrupt:
        print("palmrl: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
