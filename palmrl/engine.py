"""DeepSpeed setup from the `zero=`/`optim=` groups, and the one training loop every stage runs.

`Trainer` owns the DeepSpeed engine and the loop around a stage's `step_fn(step) -> metrics`:
logging, periodic evaluation, checkpoints (DeepSpeed state for exact resume + a consolidated,
self-describing folder for the next stage), `resume=auto`, and the final summary. A stage only
says how one optimizer step looks (its loss, its data) and what its weights are.

Exact resume rests on two things: data order is a pure function of the step (see data/tokens.py),
and the RNG states travel in DeepSpeed's client state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from torch import nn

from palmrl import checkpoint
from palmrl.config import check_training_config
from palmrl.errors import Preempted, TrainingDiverged, UserError
from palmrl.io import FolderLock, write_atomic
from palmrl.model.registry import set_activation_checkpointing
from palmrl.runtime import Dist, any_rank, barrier, run_seconds
from palmrl.tracking import WANDB_ID_FILE, Tracker

DS_DIR = "deepspeed"


def ds_config(cfg: DictConfig, world_size: int, optimizer_steps: int | None = None, *,
              cuda: bool | None = None) -> dict:
    """The DeepSpeed config dict: batch sizes from `train`, ZeRO from `zero`, optimizer from `optim`.

    `optimizer_steps` is the schedule length when a loop step makes several optimizer steps (PPO).
    `cuda` (default: whether this machine has it) picks the Adam when optim.torch_adam is null:
    DeepSpeed's FusedAdam on GPUs, DeepSpeedCPUAdam when ZeRO offloads the optimizer states there
    (what DeepSpeed's offload is built for), torch's AdamW on the CPU (nothing to compile).
    """
    train, optim = check_training_config(cfg)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    torch_adam = (not cuda) if optim.torch_adam is None else optim.torch_adam
    micro, accum = train.micro_batch_size, train.grad_accum
    zero = OmegaConf.to_container(cfg.zero, resolve=True)
    total = optimizer_steps or train.max_steps
    warmup = max(1, min(optim.warmup_steps, total - 1))  # DeepSpeed's schedule needs >= 1 (1 step ≈ none)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": torch_adam,
                       # torch's AdamW as one fused pass per tensor, without the full-size temporaries
                       # of its default loop (sqrt, denominator): on the CPU its step over the bench
                       # model's flat fp32 partition took 14 -> 4 ms (DeepSpeed's whole optimizer step
                       # 39 -> 22 ms); the same values to a float rounding here and there
                       **({"fused": True} if torch_adam else {})},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                       "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio,
                       "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,  # palmrl logs itself
        "wall_clock_breakdown": False,
    }
    if zero.get("offload_optimizer") and torch_adam:
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on offloaded states: no C++ build
    if world_size == 1 and int(zero.get("stage", 0)) < 3:
        # one process: the mean over one rank is the sum, where ZeRO-1/2 would divide every gradient
        # bucket by 1 (a 3.6 ms div_ in the bench model's ~180 ms bf16 step; its backward measured
        # ~107 -> ~100 ms); the same values (ZeRO-3 takes only "mean")
        config["gradient_allreduce_op"] = "sum"
    return config


def register_external_reads(module: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around its own forward. Two kinds are read elsewhere:
    PaLM's output layer reads the token embedding's weight in PaLM.forward, after the embedding's
    forward released it, and LoRA's adapters live in ParameterDicts that have no forward of their
    own. Declare both external parameters of the module that reads them (DeepSpeed's API for tied
    weights), so they are gathered for its whole forward."""
    from palmrl.model.palm import PaLM

    for sub in module.modules():
        if isinstance(sub, PaLM):
            deepspeed.zero.register_external_parameter(sub, sub.token_emb.weight)
        for child in sub.children():
            if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                for param in child.parameters():
                    deepspeed.zero.register_external_parameter(sub, param)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms (1-D) never decay. Frozen parameters are left out entirely."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise UserError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def gather_state_dict(engine, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the (possibly ZeRO-3 partitioned) module, on rank 0; {} on other ranks.

    Every rank must call this (ZeRO-3 gathers collectively). Tied parameters appear once.
    """
    module = module if module is not None else engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    zero3 = engine is not None and engine.zero_optimization_stage() == 3
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if zero3 and hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[name] = param.data.detach().float().cpu().clone()
        elif rank == 0:
            state[name] = param.detach().float().cpu().clone()
    return state


def _rng_state() -> dict:
    """RNG states as tensors and plain numbers only, so the client state loads with weights_only=True."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(key.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", np.asarray(state["numpy"]).astype(np.uint32), int(state.get("numpy_pos", 0)),
                         int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_ds_globals() -> list:
    """The few non-tensor types DeepSpeed pickles into its checkpoint files (found by saving every ZeRO
    stage × precision). They are plain data holders; nothing else may be unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None):
    """torch.load of DeepSpeed state with weights_only=True: a planted pickle cannot run code."""
    try:
        with torch.serialization.safe_globals(_safe_ds_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(err).splitlines()[0] if str(err) else "not a tensor file")
        raise UserError(f"resume: refused to load {path}: it holds more than tensors and plain data "
                        f"({reason}); palmrl never unpickles code") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"resume: unreadable DeepSpeed state {path}: {str(err).splitlines()[0]}") from None


def _skip_nonfinite_steps(engine) -> None:
    """Make every ZeRO stage skip an optimizer step whose gradients are NaN/Inf.

    DeepSpeed's ZeRO optimizers and its bf16 wrapper already skip such steps (counted in
    engine.skipped_steps); plain fp32 without ZeRO applies them. Guard that path the same way:
    its gradients are already all-reduced, so every rank takes the same decision.
    """
    optimizer = engine.optimizer
    if optimizer is not engine.basic_optimizer:
        return
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            optimizer.zero_grad(set_to_none=True)
            engine.skipped_steps += 1
            return None
        return step(*args, **kwargs)

    optimizer.step = guarded_step


def _one_overflow_check(engine) -> None:
    """Let DeepSpeed's ZeRO-1/2 optimizer look for NaN/Inf gradients once per bf16 step, not twice.

    In bf16 it first runs a pass over every gradient (`check_overflow`: an amax and an amin each),
    then computes the global norm for clipping and also marks the step an overflow when that norm is
    NaN/Inf. A NaN/Inf gradient always makes the norm NaN/Inf, so the first pass never finds a step
    the second misses: drop it where the second runs (the norm is computed and the states are not
    offloaded). ~3% of the bench model's bf16 step; the same steps are skipped.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if (isinstance(optimizer, DeepSpeedZeroOptimizer) and optimizer.dtype == torch.bfloat16
            and getattr(optimizer, "check_grad_overflow", False) and getattr(optimizer, "compute_grad_norm", False)
            and not optimizer.cpu_offload):
        optimizer.check_overflow = lambda partition_gradients=True: None


@dataclass(frozen=True)
class Hooks:
    """What a stage adds to the shared loop's saving and resuming (every field optional)."""

    export: Callable[[dict], tuple[dict, dict]] = lambda state: (state, {})  # gathered state -> (weights, adapters)
    state: Callable[[], dict] = dict  # extra resumable state saved with the engine (KL controller, ...)
    load_state: Callable[[dict], None] = lambda state: None  # restores what `state` returned
    before_final_save: Callable[[], None] = lambda: None  # last checks whose results go into the final manifest


class Trainer:
    """One DeepSpeed engine plus the loop: step → log → eval → checkpoint, with exact resume.

    A stage passes `hooks` (what it saves and restores) and `manifest_extra` (its facts for the
    manifest, a dict it may add to while training) to the constructor, then calls
    `fit(step_fn, eval_fn)`:
      step_fn(step) -> dict        one optimizer step (all micro-batches); returns scalar metrics
      eval_fn() -> dict            validation metrics (every rank calls it; must agree across ranks)
    """

    def __init__(self, cfg: DictConfig, dist_info: Dist, module: nn.Module, *, stage: str,
                 model_config: Mapping, tokenizer, parent: checkpoint.Checkpoint | None = None,
                 tokens_per_step: int = 0, optimizer_steps: int | None = None, hooks: Hooks | None = None,
                 manifest_extra: Mapping[str, Any] | None = None):
        self.cfg, self.dist, self.stage = cfg, dist_info, stage
        self.out_dir = Path(cfg.out_dir)
        self.model_config, self.tokenizer, self.parent = dict(model_config), tokenizer, parent
        self.tokens_per_step = tokens_per_step
        self.train, self.optim = check_training_config(cfg)  # typed once; the loop reads these
        self.max_steps = self.train.max_steps
        self.step = 0
        self.tokens_seen = 0
        self.hooks = hooks or Hooks()
        self.final_metrics: dict[str, Any] = {}
        self.manifest_extra: dict[str, Any] = dict(manifest_extra or {})  # LoRA scopes, heads, data stats, ...

        self.train_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.total_params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        if self.train.activation_checkpointing and not set_activation_checkpointing(module, True):
            raise UserError("train.activation_checkpointing: this stage's model has no blocks to checkpoint")
        config = ds_config(cfg, dist_info.world_size, optimizer_steps)
        self._check_out_dir()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, self.optim.weight_decay), config=config)
        self.engine.checkpoint_engine.load = safe_load
        if self.engine.zero_optimization_stage() == 3:
            register_external_reads(module)
        _skip_nonfinite_steps(self.engine)
        _one_overflow_check(self.engine)
        self.nonfinite_steps = 0   # steps whose loss or gradients were NaN/Inf (their updates were skipped)
        self._nonfinite_streak = 0
        self._signal: str | None = None
        self.tracker = Tracker(self.out_dir, enabled=dist_info.is_main, total_steps=self.max_steps, stage=stage,
                               logger_cfg=cfg.get("logger"), config=OmegaConf.to_container(cfg, resolve=True))

    # ---- output folder -------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        """Never overwrite a previous run: continuing one needs resume=auto, replacing it overwrite=true.
        One process per run folder (an OS lock, rank 0), and a folder holding another stage's run is
        neither resumed nor replaced."""
        has_run = (self.out_dir / DS_DIR).exists() or (self.out_dir / "final").exists()
        owner = _folder_stage(self.out_dir)
        if has_run and owner is not None and owner != self.stage:
            raise UserError(f"{self.out_dir} holds a {owner} run: a {self.stage} run neither resumes nor replaces it; "
                            f"choose another out_dir or run_name")
        self._resume_tag()  # a resume target that does not exist fails before anything is written
        if self.dist.is_main:  # the checks above only read; from here on this process owns the folder
            self._lock = FolderLock(self.out_dir, what=f"{self.stage} run")
        if has_run and self.cfg.resume is None and not self.cfg.get("overwrite", False):
            raise UserError(f"{self.out_dir} already holds a {self.stage} run: add resume=auto to continue it, "
                            f"overwrite=true to replace it, or choose another run_name")
        if self.dist.is_main:
            if has_run and self.cfg.resume is None:  # overwrite=true
                for sub in [DS_DIR, "final", "metrics.jsonl", WANDB_ID_FILE,
                            *[p.name for p in self.out_dir.glob("step-*")]]:
                    target = self.out_dir / sub
                    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"out_dir: cannot create {self.out_dir}: {err.strerror}") from None
            _check_writable(self.out_dir)
            _check_free_space(self.out_dir, self.checkpoint_bytes())
            (self.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        barrier()

    def checkpoint_bytes(self) -> int:
        """Disk one checkpoint takes: DeepSpeed state (weights + fp32 master and two Adam moments of the
        trainable ones) plus the consolidated fp32 safetensors folder."""
        return 4 * self.total_params + 12 * self.train_params + 4 * self.total_params

    # ---- resume --------------------------------------------------------------------------
    def will_resume(self) -> bool:
        """Whether `fit` will load DeepSpeed state (resume= names a checkpoint that exists)."""
        return self._resume_tag() is not None

    def _resume_tag(self) -> str | None:
        resume = self.cfg.resume
        if resume is None:
            return None
        if str(resume) == "auto":
            latest = self.out_dir / DS_DIR / "latest"
            try:
                tag = latest.read_text().strip() if latest.is_file() else None
            except (OSError, UnicodeDecodeError):
                tag = None
            if tag is not None and (self.out_dir / DS_DIR / tag).is_dir():
                return tag
            # `latest` missing or pointing nowhere: the newest step whose checkpoint folder was completed
            # (it is written after the DeepSpeed state), never a reason to delete state
            complete = sorted(d.name for d in (self.out_dir / DS_DIR).glob("step-*")
                              if d.is_dir() and (self.out_dir / d.name / checkpoint.MANIFEST).is_file())
            return complete[-1] if complete else None
        folder = Path(str(resume))
        tag = folder.name
        if not (self.out_dir / DS_DIR / tag).is_dir():
            raise UserError(f"resume: no DeepSpeed state for '{tag}' in {self.out_dir / DS_DIR}")
        return tag

    def _discard_partial_writes(self, tag: str | None) -> None:
        """A run killed while checkpointing leaves DeepSpeed tags newer than `latest` and temporary
        folders; neither is ever resumed from. Remove them so the run folder reads cleanly."""
        if not self.dist.is_main:
            return
        for leftover in self.out_dir.glob(".step-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.out_dir.glob(".final.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for ds_tag in (self.out_dir / DS_DIR).glob("step-*"):
            if ds_tag.is_dir() and (tag is None or ds_tag.name > tag):
                shutil.rmtree(ds_tag, ignore_errors=True)

    def maybe_resume(self) -> int:
        tag = self._resume_tag()
        if str(self.cfg.resume) == "auto":
            self._discard_partial_writes(tag)
            barrier()
        if tag is None:
            self.tracker.truncate_after(0)  # a run that died before its first checkpoint starts over
            if self.cfg.resume == "auto" and self.dist.is_main:
                self.tracker.summary("resume", {"resume": "no checkpoint yet: starting from step 0"})
            return 0
        load_path, client = self.engine.load_checkpoint(str(self.out_dir / DS_DIR), tag=tag)
        if load_path is None:
            raise UserError(f"resume: could not load DeepSpeed state {self.out_dir / DS_DIR / tag}")
        self.step = int(client["step"])
        self.tokens_seen = int(client.get("tokens_seen", 0))
        _set_rng_state(client["rng"])
        self.hooks.load_state(client.get("stage_state", {}))
        self.tracker.truncate_after(self.step)
        if self.dist.is_main:
            self.tracker.summary("resume", {"from": str(self.out_dir / DS_DIR / tag), "step": self.step})
        return self.step

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, *, final: bool = False, metrics: Mapping | None = None) -> Path:
        tag = checkpoint.step_name(self.step)
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "rng": _rng_state(),
                  "stage_state": self.hooks.state()}
        try:
            # `latest` is written by palmrl below, after every rank's files and the consolidated folder
            # are complete: a crash at any point of a save leaves it naming the previous checkpoint
            self.engine.save_checkpoint(str(self.out_dir / DS_DIR), tag=tag, client_state=client, save_latest=False)
            state = gather_state_dict(self.engine)
            folder = self.out_dir / ("final" if final else tag)
            if self.dist.is_main:
                weights, adapters = self.hooks.export(state)
                checkpoint.save(folder, stage=self.stage, step=self.step, weights=weights, adapters=adapters,
                                model_config=self.model_config, tokenizer=self.tokenizer,
                                config=OmegaConf.to_container(self.cfg, resolve=True),
                                metrics={**(metrics or {}), "tokens_seen": self.tokens_seen,
                                         "nonfinite_steps": self.nonfinite_steps},
                                parent=self.parent, extra=self.manifest_extra)
        except OSError as err:
            raise UserError(f"checkpoint: could not write step {self.step} to {self.out_dir}: {err.strerror or err}; "
                            f"{self.last_good()}") from None
        except RuntimeError as err:  # torch.save reports a failed write (disk full) as RuntimeError
            if not any(sign in str(err) for sign in ("writ", "inline_container", "StreamWriter")):
                raise
            raise UserError(f"checkpoint: could not write step {self.step} to {self.out_dir}: "
                            f"{str(err).splitlines()[0]}; {self.last_good()}") from None
        except SafetensorError as err:  # safetensors reports its failed writes (ENOSPC) as its own error
            raise UserError(f"checkpoint: could not write step {self.step} to {self.out_dir}: "
                            f"{str(err).splitlines()[0]}; {self.last_good()}") from None
        barrier()
        if self.dist.is_main:
            write_atomic(self.out_dir / DS_DIR / "latest", tag)
            checkpoint.prune_steps(self.out_dir, self.train.keep_last)
            self._prune_ds_tags()
        barrier()
        return folder

    def _prune_ds_tags(self) -> None:
        keep = self.train.keep_last
        if keep <= 0:
            return
        tags = sorted(p for p in (self.out_dir / DS_DIR).glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, step_fn: Callable[[int], Mapping[str, Any]],
            eval_fn: Callable[[], Mapping[str, Any]] | None = None,
            start_rows: Mapping[str, Any] | None = None) -> Path:
        """Train to max_steps (or a stop), saving as configured; the run folder's lock is released
        however it ends."""
        try:
            return self._fit(step_fn, eval_fn, start_rows)
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()

    def _fit(self, step_fn: Callable[[int], Mapping[str, Any]], eval_fn: Callable[[], Mapping[str, Any]] | None,
             start_rows: Mapping[str, Any] | None) -> Path:
        train = self.train
        start = self.maybe_resume()
        self.tracker.summary(f"palmrl {self.stage}", {
            "output": str(self.out_dir),
            "parameters": f"{self.total_params:,} ({self.train_params:,} trainable)",
            "world size": self.dist.world_size,
            "ZeRO stage": self.engine.zero_optimization_stage(),
            "precision": self.cfg.precision,
            "batch (sequences/step)": self.engine.train_batch_size(),
            "tokens per step": self.tokens_per_step,
            "steps": f"{start} → {self.max_steps}",
            **dict(start_rows or {}),
        })
        startup = run_seconds()  # process start → the first step: what every command makes a user wait
        self.manifest_extra["startup_s"] = round(startup, 2)
        if self.dist.is_main:
            self.tracker.note_plain(f"first step after {startup:.1f} s (imports, DeepSpeed, data, model)")
        self.tracker.start(start)
        self.engine.train()
        window_t, window_tokens = time.perf_counter(), 0
        eval_metrics: dict[str, Any] = {}
        with self._stop_on_signals():
            for step in range(start + 1, self.max_steps + 1):
                self.step = step
                skipped_before = self.engine.skipped_steps
                metrics = dict(step_fn(step))
                self.tokens_seen += self.tokens_per_step
                window_tokens += self.tokens_per_step
                skipped = self.engine.skipped_steps - skipped_before
                loss = metrics.get("loss")
                # one all-reduce per step settles both cross-rank decisions: non-finite step, stop signal
                nonfinite, stopping = any_rank(skipped > 0 or (loss is not None and not math.isfinite(float(loss))),
                                                self._signal is not None)
                if nonfinite:
                    self._nonfinite_step(step, metrics, skipped)
                else:
                    self._nonfinite_streak = 0
                if step % train.log_every == 0 or step == self.max_steps or metrics.get("nonfinite"):
                    elapsed = time.perf_counter() - window_t
                    metrics.update(lr=self.scheduler.get_last_lr()[0] if self.scheduler else self.optim.lr,
                                   tokens_per_s=window_tokens / max(elapsed, 1e-9))
                    self.tracker.log(step, metrics)
                    window_t, window_tokens = time.perf_counter(), 0
                else:
                    self.tracker.advance(step)
                if eval_fn is not None and train.eval_every > 0 and step % train.eval_every == 0 \
                        and step != self.max_steps:
                    eval_metrics = self.evaluate(eval_fn)
                signal_name = (self._signal or "SIGTERM") if stopping else None  # SIGTERM: another rank's
                stop_here = train.stop_after is not None and step == train.stop_after and step != self.max_steps
                periodic = train.save_every > 0 and step % train.save_every == 0 and step != self.max_steps
                if (periodic or stop_here or signal_name) and step != self.max_steps:
                    self.save(metrics=eval_metrics)
                if signal_name and step != self.max_steps:
                    where = self.out_dir / DS_DIR / checkpoint.step_name(step)
                    self.tracker.finish({"stopped at step": step, "reason": signal_name, "checkpoint": str(where),
                                         "continue with": "the same command + resume=auto"})
                    raise Preempted(f"{self.stage}: {signal_name} received: saved step {step} to {where}; continue "
                                    f"with the same command and resume=auto")
                if stop_here:
                    self.tracker.finish({"stopped at step": step, "continue with": "resume=auto"})
                    return self.out_dir / checkpoint.step_name(step)
            if eval_fn is not None:
                eval_metrics = self.evaluate(eval_fn)
            self.final_metrics = dict(eval_metrics)
            self.hooks.before_final_save()
            self.manifest_extra["wall_s"] = round(run_seconds(), 1)  # what the user waited for, setup included
            final = self.save(final=True, metrics=self.final_metrics)
        self.tracker.finish({"final checkpoint": str(final), "steps": self.step,
                             "tokens seen": self.tokens_seen, **self.final_metrics})
        return final

    def _nonfinite_step(self, step: int, metrics: dict, skipped_updates: int) -> None:
        """NaN/Inf in the loss (any rank) or the gradients (the optimizer skipped its update): count the
        step and go on (train.on_nonfinite=skip), or stop with the last good checkpoint kept (stop, or
        after train.max_nonfinite_streak such steps in a row)."""
        loss = metrics.get("loss")
        bad_loss = loss is not None and not math.isfinite(float(loss))
        self.nonfinite_steps += 1
        self._nonfinite_streak += 1
        what = f"loss became {loss}" if bad_loss else "gradients were NaN/Inf"
        metrics.update(nonfinite=1, nonfinite_steps=self.nonfinite_steps, skipped_updates=skipped_updates)
        if self.train.on_nonfinite == "stop" or self._nonfinite_streak >= self.train.max_nonfinite_streak:
            why = "train.on_nonfinite=stop" if self.train.on_nonfinite == "stop" else \
                f"{self._nonfinite_streak} such steps in a row (train.max_nonfinite_streak)"
            raise TrainingDiverged(f"{self.stage}: {what} at step {step} ({why}); {self.last_good()} "
                                   f"(lower optim.lr or raise optim.warmup_steps)")
        if self.dist.is_main:
            self.tracker.note(f"step {step}: {what}; update skipped ({self.nonfinite_steps} so far, "
                              f"train.on_nonfinite=skip)")

    # ---- signals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, save, exit 0 with how to resume.
        A second SIGINT exits at once; `latest` still names the last complete checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._signal is not None:
                if signum == signal.SIGINT:
                    print(f"palmrl: second {name}: exiting now; {self.last_good()}", file=sys.stderr, flush=True)
                    os._exit(130)
                return  # torchrun follows a Ctrl-C with SIGTERM: already stopping
            self._signal = name
            if self.dist.is_main:
                print(f"\npalmrl: {name} received: saving a checkpoint after this step "
                      f"(Ctrl-C again quits at once)", file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def last_good(self) -> str:
        latest = self.out_dir / DS_DIR / "latest"
        if latest.is_file():
            return f"last good checkpoint: {self.out_dir / latest.read_text().strip()} (resume=auto continues from it)"
        return "no checkpoint was written yet"

    def evaluate(self, eval_fn: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        self.engine.eval()
        with torch.no_grad():
            metrics = dict(eval_fn())
        self.engine.train()
        self.tracker.log(self.step, metrics, split="val")
        return metrics

    def backward_step(self, loss: torch.Tensor) -> None:
        """One micro-batch: DeepSpeed scales for accumulation and steps the optimizer on the boundary."""
        self.engine.backward(loss)
        self.engine.step()


def _folder_stage(folder: Path) -> str | None:
    """The stage whose run a folder holds (its config.yaml, else a checkpoint manifest), if any."""
    try:
        text = (folder / "config.yaml").read_text()
        stage = (OmegaConf.create(text) or {}).get("stage")
        if stage:
            return str(stage)
    except Exception:  # noqa: BLE001 - an unreadable config.yaml says nothing about the owner
        pass
    for manifest in sorted(folder.glob("*/" + checkpoint.MANIFEST)):
        try:
            return str(json.loads(manifest.read_text())["stage"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"out_dir: only {free / 2**20:,.1f} MiB free in {folder} but one checkpoint needs about "
                        f"{needed / 2**20:,.1f} MiB (weights + optimizer state); free some space or choose "
                        f"another out_dir")


def _check_writable(folder: Path) -> None:
    probe = folder / ".palmrl-write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"out_dir: cannot write to {folder}: {err.strerror}") from None
