"""Process-level setup shared by every stage: output folder, distributed init, threads, seeds.

One code path for 1 and N processes: under torchrun or the deepspeed launcher the rank comes from
the environment; a plain `palmrl ...` gets the single-process variables DeepSpeed would otherwise
look for through MPI.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from palmrl.config import check_override_types, check_training_config
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
        check_training_config(cfg)
    return runner(cfg)
