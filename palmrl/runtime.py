"""Process-level setup shared by every stage: output folder, distributed init, threads, seeds.

One code path for 1 and N processes: under torchrun or the deepspeed launcher the rank comes from
the environment; a plain `palmrl ...` gets the single-process variables DeepSpeed would otherwise
look for through MPI.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from palmrl.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _single_process_env() -> None:
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port, so parallel single-process runs never collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def init_distributed() -> Dist:
    """Initialise torch.distributed once (gloo on CPU, nccl on GPU) and set threads per rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if "OMP_NUM_THREADS" not in os.environ:
        # the deepspeed launcher leaves threads unset: N ranks each using all cores thrash (4x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    import logging

    import deepspeed
    import torch.distributed as dist

    # palmrl reports progress itself; DeepSpeed's INFO lines would drown it
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_out_dir(stage: str, cfg: DictConfig) -> None:
    if cfg.get("out_dir") is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = HydraConfig.get().runtime.output_dir
        except ValueError:  # composed outside @hydra.main (tests, API use)
            out = f"runs/{cfg.run_name}/{stage}"
        with open_dict(cfg):
            cfg.out_dir = str(out)


def run_stage(stage: str, cfg: DictConfig, runner: Callable[[DictConfig], Path], *, from_cli: bool = False) -> Path:
    """Resolve the config, check it, then hand it to the stage runner."""
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
    if all(key in cfg for key in ("train", "optim", "zero")):
        from palmrl.engine import check_training_config

        check_training_config(cfg)
    return runner(cfg)


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
