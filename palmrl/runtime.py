"""Process-level setup shared by every stage: output folder, distributed init, threads, seeds.

One code path for 1 and N processes: under torchrun or the deepspeed launcher the rank comes from
the environment; a plain `palmrl ...` gets the single-process variables DeepSpeed would otherwise
look for through MPI.
"""

from __future__ import annotations

import functools
import os
import random
import re
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from palmrl.config import check_stage_config, is_training_config
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


def expand_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,09],cpu1` -> `gpu03`, `node7` -> `node7`."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise UserError(f"SLURM node list {nodelist!r} is not one palmrl can read; set MASTER_ADDR")
    prefix, ranges = head.group(1), head.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _slurm_env() -> bool:
    """Under `srun` (one task per GPU, no torchrun/deepspeed launcher), take the rank, world size,
    local rank and rendezvous from SLURM's variables into the ones torch.distributed reads; the rest
    of the code path is the same as under torchrun. Only an srun step counts (SLURM_STEP_NUM_TASKS):
    a batch script's own shell, which sees SLURM_NTASKS too, stays a world of one."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return False
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    for key, value in (("RANK", env["SLURM_PROCID"]), ("WORLD_SIZE", env["SLURM_STEP_NUM_TASKS"]),
                       ("LOCAL_RANK", env.get("SLURM_LOCALID", "0")),
                       ("LOCAL_WORLD_SIZE", re.match(r"\d+", tasks_per_node).group(0)),
                       ("MASTER_ADDR", expand_first_host(nodelist)),
                       # every task derives the same port from the job id; MASTER_PORT overrides it
                       ("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))):
        env.setdefault(key, value)
    return True


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (Ampere+): ~8x the fp32 rate for the parts
    bf16 autocast leaves in fp32 (and whole fp32 runs), at bf16-like mantissa error."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def inference_placement(device: str, precision: str, *, key: str = "") -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype `sample`, `serve` and the local generator run the model.

    device: auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N. precision: auto (bf16 on
    a GPU that has it, else fp32) | fp32 | bf16. `key` prefixes the config keys in errors."""
    spec = str(device)
    if spec == "auto":
        where = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            where = torch.device(spec)
        except RuntimeError:
            raise UserError(f"{key}device={spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        if where.type not in ("cpu", "cuda"):
            raise UserError(f"{key}device={spec!r}: palmrl runs on cpu or cuda")
        if where.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{key}device={spec!r}: CUDA is not available on this machine (use device=auto or cpu)")
        if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
            raise UserError(f"{key}device={spec!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if where.type == "cuda":
        allow_tf32()
    if precision == "auto":
        bf16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
        return where, torch.bfloat16 if bf16 else torch.float32
    if precision not in ("fp32", "bf16"):
        raise UserError(f"{key}precision must be auto, fp32 or bf16, got {precision!r}")
    warn_slow_bf16(where, precision, key=f"{key}precision")
    return where, torch.bfloat16 if precision == "bf16" else torch.float32


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the OS.

    A training step frees and reallocates the same large activations every step; with glibc's
    defaults each block above its mmap threshold comes back as fresh zeroed pages, and the page
    faults cost ~10% of a CPU step (scripts/bench_train.py measures it). Blocks below 32 MiB (glibc's
    largest mmap threshold) then come from the heap, which is trimmed only past 1 GiB of free top.
    Process-wide; a no-op where glibc is absent. PALMRL_MALLOPT=0 turns it off."""
    if os.environ.get("PALMRL_MALLOPT", "1") == "0":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


class _MuonNotLoaded:
    """Stands in for DeepSpeed's MuonWithAuxAdam where palmrl builds the optimizers: nothing is one."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("this palmrl training process stands in for DeepSpeed's Muon optimizer "
                           "(palmrl.runtime.skip_deepspeed_muon): import it before the stage starts to use it")


def _muon_update_not_loaded(*args, **kwargs):
    raise RuntimeError("DeepSpeed's muon_update without its Muon optimizer (palmrl.runtime.skip_deepspeed_muon)")


# DeepSpeed's Muon modules -> the name DeepSpeed's ZeRO and bf16 optimizers import from each, and its stand-in
DEEPSPEED_MUON = {"deepspeed.runtime.zero.muon.muon_optimizer": ("MuonWithAuxAdam", _MuonNotLoaded),
                  "deepspeed.runtime.zero.muon.original_muon": ("muon_update", _muon_update_not_loaded)}


def skip_deepspeed_muon() -> None:
    """Keep DeepSpeed's Muon optimizer from loading in a process that trains with palmrl's AdamW.

    DeepSpeed's `initialize`, its ZeRO-1/2/3 and bf16 optimizers import the Muon modules to ask
    `isinstance(optimizer, MuonWithAuxAdam)` or to fetch `muon_update` for Muon parameter groups, and
    importing them `torch.compile`s Muon's kernels, which loads all of inductor: 2-3 s of every
    training command's start on a CPU (`palmrl pretrain` to its first step: 8.0-8.4 s with them,
    5.8-6.0 s without, alternating runs on palm_tiny). palmrl's optimizer is always AdamW
    (engine.ds_config), so stand-ins (a class nothing is an instance of, a function nothing calls)
    give DeepSpeed the same answers; any other name asked of them loads the real module. `run_stage`
    calls this for training stages the CLI started (processes palmrl owns); a process that loaded the
    real modules keeps them."""
    for name, (attr, value) in DEEPSPEED_MUON.items():
        if name in sys.modules:
            continue
        stand_in = types.ModuleType(name, "palmrl's stand-in: see palmrl.runtime.skip_deepspeed_muon")
        setattr(stand_in, attr, value)
        stand_in.__getattr__ = functools.partial(_real_module_attribute, name)
        stand_in.palmrl_stand_in = True
        sys.modules[name] = stand_in


def _real_module_attribute(name: str, attr: str):
    """A name the stand-in does not have (a newer DeepSpeed's): load the real module and answer from it."""
    import importlib

    if attr.startswith("__"):  # the import system's own questions (__path__, __file__, ...)
        raise AttributeError(attr)
    if getattr(sys.modules.get(name), "palmrl_stand_in", False):
        del sys.modules[name]
    return getattr(importlib.import_module(name), attr)


def init_distributed() -> Dist:
    """Initialise torch.distributed once (gloo on CPU, nccl on GPU) and set threads per rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _slurm_env() or _single_process_env()
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
        allow_tf32()
    else:
        device = torch.device("cpu")
        keep_freed_memory()  # CPU training reallocates the same activations every step

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


# collectives: the only place palmrl talks to other ranks. Every tensor they move is made on
# collective_device(): NCCL takes CUDA tensors only (gloo takes CPU ones), so a CPU tensor that gloo
# accepts in the CPU tests would crash the first multi-GPU run.


def multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where tensors for collectives live: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if multi_rank():
        import torch.distributed as dist

        dist.barrier()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag: True on every rank when it is true on any rank (one all-reduce for all)."""
    if not multi_rank():
        return tuple(bool(f) for f in flags)
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in value.tolist())


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over all ranks (every rank calls it)."""
    if not multi_rank():
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_PROCESS_STAGE_MARK = time.perf_counter()
_stage_started = [_PROCESS_STAGE_MARK]  # no stage has run in this process while it holds the mark
_imported = time.time()  # fallback start of this process where /proc is missing


def process_seconds() -> float:
    """Seconds since this process started (Linux: its start time in /proc), else since palmrl was
    imported: what a user waits for, Python's and torch's imports included."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _imported


_startup_from_process = [False]  # the first stage a `palmrl` command runs counts its imports too


def run_seconds() -> float:
    """What a user has waited for so far: since the process started for the first stage a `palmrl`
    command runs (its imports included), since the stage started for later ones (--multirun jobs,
    in-process use). A manifest's startup_s and wall_s are this at the first step and at the end."""
    return process_seconds() if _startup_from_process[0] else stage_seconds()


def stage_seconds() -> float:
    """Seconds since the running stage started (run_stage), setup included: the wall time a user waits."""
    return time.perf_counter() - _stage_started[0]


def run_stage(stage: str, cfg: DictConfig, runner: Callable[[DictConfig], Path], *, from_cli: bool = False,
              checked: bool = False) -> Path:
    """Resolve the config, check it (unless the caller did: `checked`), then hand it to the stage runner."""
    _startup_from_process[0] = from_cli and _stage_started[0] == _PROCESS_STAGE_MARK
    _stage_started[0] = time.perf_counter()
    if not checked:
        check_stage_config(stage, cfg, from_cli=from_cli)
    if is_training_config(cfg):
        if from_cli:
            skip_deepspeed_muon()
        with open_dict(cfg):  # decided here, so the run's config.yaml and manifests say which
            cfg.precision = training_precision(str(cfg.precision))
        if not torch.cuda.is_available():
            warn_slow_bf16("cpu", str(cfg.precision))
    return runner(cfg)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without them torch
    runs bf16 matmuls through a slow path: ~1 GFLOP/s against ~120 in fp32 on a 2-core AVX2 EPYC."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)  # unknown (an older torch): assume it has


def warn_slow_bf16(where: torch.device | str, precision: str, *, key: str = "precision") -> None:
    """A warning on stderr when bf16 is asked for on a CPU without bf16 instructions."""
    if precision == "bf16" and torch.device(where).type == "cpu" and not cpu_has_fast_bf16():
        import sys

        print(f"palmrl: warning: {key}=bf16 on a CPU without bf16 instructions "
              f"({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX): its matmuls run ~100x slower than "
              f"fp32 here; {key}=fp32 is the fast choice on this machine", file=sys.stderr, flush=True)


def training_precision(precision: str) -> str:
    """precision=auto → bf16 on a GPU that has it, fp32 elsewhere; fp32/bf16 as given."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
