"""Where the stage configs live, and how a composed config is checked and typed.

The YAML files under `configs/` ship inside the package (`palmrl.configs`, mapped from the
top-level folder by pyproject's package-dir), so a wheel or `pip install git+...` finds them;
`PALMRL_CONFIG_DIR` points palmrl at another folder.

`typed(Cls, node, key="ppo")` turns one composed config section into a frozen dataclass once, at the
stage's boundary: every value is checked against the field's annotation (finite numbers, the right
type, a choice among a `Literal`'s values), then the dataclass's own `__post_init__` checks ranges by
raising `Invalid(field, why)`. Either way the user sees one line naming the full key (`ppo.epochs:
must be >= 1, got 0`) and exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf, open_dict

from palmrl.errors import UserError


def _config_dir() -> Path:
    if os.environ.get("PALMRL_CONFIG_DIR"):
        return Path(os.environ["PALMRL_CONFIG_DIR"])
    # installed (a wheel, or editable through package-dir): palmrl.configs is the configs/ folder,
    # a package of data only, found without importing anything
    spec = importlib.util.find_spec("palmrl.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"  # a source tree on sys.path, not installed


CONFIG_DIR = _config_dir()


# the stages that build a model, in the order the pipeline chains them (a run folder holds any subset)
CHAIN = ("tokenizer", "pretrain", "sft", "reward", "ppo", "grpo", "dpo")
RL_STAGES = ("ppo", "grpo", "dpo")  # what follows SFT (and the reward model): the pipeline's `rl=` choices


# ---------------------------------------------------------------------------------------------
# typed sections


class Invalid(ValueError):
    """Raised by a config dataclass's __post_init__: `field` is the key inside its section."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


T = TypeVar("T")


def _check_value(value: Any, hint: Any) -> tuple[Any, str | None]:
    """(value converted to what `hint` asks, or None and why it cannot be)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        options = [a for a in args if a is not type(None)]
        reasons = []
        for option in options:
            converted, why = _check_value(value, option)
            if why is None:
                return converted, None
            reasons.append(why)
        return None, reasons[0]
    if origin is Literal:
        return (value, None) if value in args else (None, f"must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return None, f"expected a list, got {value!r}"
        inner = args[0] if args else Any
        out = []
        for item in value:
            converted, why = _check_value(item, inner)
            if why is not None:
                return None, why
            out.append(converted)
        return (tuple(out) if origin is tuple else out), None
    if hint is Any:
        return value, None
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {value!r}")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"expected a number, got {value!r}"
        if not math.isfinite(value):
            return None, f"must be a finite number, got {value!r}"
        return float(value), None
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {value!r}")
    return value, None


def typed(cls: type[T], node: DictConfig | Mapping | None, *, key: str) -> T:
    """The config section `node` (at `key`) as a `cls` instance; unknown keys are ignored (they belong
    to code that reads the section too), missing ones take the dataclass default."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init or field.name not in values:
            continue
        converted, why = _check_value(values[field.name], hints[field.name])
        if why is not None:
            raise UserError(f"{key}.{field.name}: {why}")
        kwargs[field.name] = converted
    try:
        return cls(**kwargs)
    except Invalid as err:
        raise UserError(f"{key}.{err.field}: {err.why}") from None
    except TypeError as err:  # a required field the YAML did not give
        raise UserError(f"{key}: {err}") from None


# ---------------------------------------------------------------------------------------------
# checks of the composed config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train:` keys the shared loop reads (a stage's own train keys are typed by the stage).
    No defaults here: every stage YAML gives them, with each one's reason beside it."""

    max_steps: int
    micro_batch_size: int
    grad_accum: int
    log_every: int
    eval_every: int
    save_every: int
    keep_last: int
    on_nonfinite: Literal["skip", "stop"]
    max_nonfinite_streak: int
    stop_after: int | None
    activation_checkpointing: bool = False  # recompute each block in backward: memory flat in depth, ~1/3 more compute

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "max_nonfinite_streak"):
            if getattr(self, key) <= 0:
                raise Invalid(key, f"must be positive, got {getattr(self, key)}")
        for key in ("save_every", "eval_every", "keep_last"):
            if getattr(self, key) < 0:
                raise Invalid(key, f"must be >= 0, got {getattr(self, key)}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise Invalid("stop_after", f"must be a positive step or null, got {self.stop_after}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim:` group: AdamW with linear warmup then cosine decay (configs/optim/adamw.yaml)."""

    name: Literal["adamw"]
    lr: float
    betas: tuple[float, ...]
    eps: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    torch_adam: bool | None  # None: DeepSpeed's fused Adam on GPUs (its CPU Adam with offload), torch's on the CPU

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise Invalid("lr", f"must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise Invalid("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise Invalid("eps", f"must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise Invalid("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise Invalid("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise Invalid("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise Invalid("grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")


def check_training_config(cfg: DictConfig) -> tuple[TrainConfig, OptimConfig]:
    """The train/optim/zero/precision keys every training stage shares, checked before anything is
    built or written; returns the typed train and optim sections."""
    train = typed(TrainConfig, cfg.train, key="train")
    optim = typed(OptimConfig, cfg.optim, key="optim")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16, got '{cfg.precision}' (fp16 would need loss scaling; "
                        f"use bf16 on GPUs)")
    if cfg.zero.get("stage") not in (0, 1, 2, 3):
        raise UserError(f"zero.stage must be 0, 1, 2 or 3, got {cfg.zero.get('stage')}")
    return train, optim


_KINDS = {bool: "true or false", int: "an integer", float: "a number"}


def _type_error(default, value) -> str | None:
    """Why `value` cannot stand where the YAML default is `default` (None when it can)."""
    if value is None or default is None or isinstance(default, str):
        return None  # null switches many keys off; strings take anything
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return None
    return None if ok else f"expected {_KINDS[type(default)]}, got {value!r}"


def check_override_types(stage: str, cfg: DictConfig) -> None:
    """A command-line value must have the type of the key's YAML default: `train.max_steps=abc` is
    refused here, naming the key, instead of failing later inside int(). Only inside a job the CLI
    launched (the defaults are recomposed with the job's group choices and none of its value overrides)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    groups = [o for o in task if o.split("=", 1)[0].lstrip("+~") in choices]
    defaults = OmegaConf.to_container(compose(config_name=stage, overrides=groups), resolve=False)
    given = OmegaConf.to_container(cfg, resolve=False)

    def walk(default, value, path: str) -> None:
        if isinstance(default, dict) and isinstance(value, dict):
            for key in default.keys() & value.keys():
                walk(default[key], value[key], f"{path}.{key}" if path else str(key))
        elif (why := _type_error(default, value)) is not None:
            raise UserError(f"{path}: {why}")

    walk({k: v for k, v in defaults.items() if k != "hydra"}, given, "")


def _hydra_callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class SweepInterpolations(_hydra_callback_base()):
    """A Hydra callback (configs/base.yaml `hydra.callbacks`): during --multirun, the sweep's own
    config is resolved before any job runs (`hydra.sweep.dir` = runs/${run_name}/...), when Hydra has
    not set HydraConfig yet, so a run name built from a choice (`run_name=s_${hydra:runtime.choices.model}`)
    failed with "HydraConfig was not set". Setting it from the sweep's config lets that resolve;
    each job then resolves its own run name with its own choices."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)


def is_training_config(cfg: DictConfig) -> bool:
    """Whether a stage's config trains through DeepSpeed (it has the train, optim and zero groups)."""
    return all(key in cfg for key in ("train", "optim", "zero"))


def check_stage_config(stage: str, cfg: DictConfig, *, from_cli: bool = False) -> None:
    """Resolve a stage's composed config in place and check it: unresolvable interpolations, missing
    values, override types (from the command line), the training groups and the resume target.

    Needs neither torch nor the stage's module, so the CLI calls it first and a bad value ends in
    about a second, not after torch and DeepSpeed have loaded (~7 s)."""
    _resolve_out_dir(stage, cfg)
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation that cannot resolve, or a missing ??? value
        raise UserError(f"config: {str(err).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"config: missing value for '{missing[0]}' (set it on the command line: {missing[0]}=...)")
    if from_cli:
        check_override_types(stage, cfg)
    if is_training_config(cfg):
        check_training_config(cfg)
        resume = cfg.get("resume")
        if resume is not None and str(resume) != "auto":  # before a tokenizer is trained or data tokenised
            folder = Path(str(resume))
            if not (folder.name.startswith("step-") and folder.name[5:].isdigit() and folder.is_dir()):
                raise UserError(f"resume: {resume} is not a step folder (…/<stage>/step-NNNNNN); "
                                f"use resume=auto to continue the newest one")


def _resolve_out_dir(stage: str, cfg: DictConfig) -> None:
    if cfg.get("out_dir") is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = HydraConfig.get().runtime.output_dir
        except ValueError:  # composed outside @hydra.main (tests, API use)
            out = f"runs/{cfg.run_name}/{stage}"
        with open_dict(cfg):
            cfg.out_dir = str(out)
