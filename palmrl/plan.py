"""`palmrl plan <stage> [overrides]`: will this training config fit its GPUs? Worked out from the
config alone (nothing is built, nothing is read but a parent checkpoint's model.yaml).

Per GPU, in bytes:

- model states, DeepSpeed's own accounting (its `estimate_zero2/3_model_states_mem_needs`), for the
  trained parameters T of P: bf16 holds 2-byte weights and gradients plus 16 bytes per trained
  parameter of fp32 master weights, Adam moments and fp32 gradients; ZeRO-1/2 split those 16 bytes
  over the GPUs (ZeRO-0 does not), ZeRO-3 splits everything and gathers one layer (4 bytes per
  parameter of the largest) at a time; an offloaded optimizer (or parameters) leaves the GPU. fp32
  runs hold 4-byte weights and gradients. Frozen parameters (LoRA's base, PPO's reference and
  reward model) are weights only.
- activations saved for the backward pass, counted tensor by tensor for PaLM's parallel block
  (palmrl/model/palm.py): per token and layer 2·D (LayerNorm in and out) + H·E + 2·K·E + 2·F (the
  fused projection's output, kept whole because views of it are saved) + 3·H·E + K·E (rotated
  queries and keys, attention output and its reshaped copy) + 2·F (SiLU output, SwiGLU product),
  plus H·S softmax probabilities per token where attention is not fused (CPU, or a padded batch on
  GPU). With train.activation_checkpointing only each block's input stays, plus one
  block's activations while it is recomputed.
- the output layer: chunked cross-entropy keeps one chunk's fp32 logits (model/loss.py) plus the
  gradients of the hidden states and of the output weight.

A fixed allowance covers the CUDA context and allocator slack. Comparisons: tests/test_plan.py
checks the model states against DeepSpeed's estimators; scripts/bench_plan_memory.py checks the
totals against the peak memory of real CPU runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from palmrl import checkpoint
from palmrl.config import check_training_config
from palmrl.errors import UserError
from palmrl.model.lora import LoRAConfig
from palmrl.model.loss import chunk_rows_for
from palmrl.model.palm import ModelConfig

GiB = 2**30
CUDA_OVERHEAD = 2 * GiB  # CUDA context, NCCL buffers, allocator fragmentation: what a real run adds
# On the CPU, DeepSpeed copies gradients into its flat buffers and glibc keeps freed buffers mapped:
# measured ~44 bytes per trained parameter of peak RSS with ZeRO-1 in fp32 where the GPU accounting
# gives 24 (scripts/bench_plan_memory.py) while torch's AdamW ran its default loop, whose full-size
# temporaries (sqrt, denominator: 8 bytes) its fused form, used since, does not make
CPU_EXTRA_PER_TRAINED_PARAM = 12
TRAINING_STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a PaLM config."""

    vocab: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    kv_heads: int
    ff_inner: int

    @classmethod
    def of(cls, config: ModelConfig) -> Shape:
        return cls(config.vocab_size, config.dim, config.depth, config.heads, config.dim_head, config.kv_heads,
                   config.ff_inner)

    @property
    def block_params(self) -> int:
        D, H, K, E, F = self.dim, self.heads, self.kv_heads, self.dim_head, self.ff_inner
        return D * (H * E + 2 * K * E + 2 * F) + H * E * D + F * D + D  # fused_proj, attn_out, ff_out, norm

    @property
    def params(self) -> int:
        return self.vocab * self.dim + self.depth * self.block_params + self.dim  # tied output, final norm

    @property
    def largest_layer(self) -> int:
        return max(self.vocab * self.dim, self.block_params)

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        D, H, K, E, F = self.dim, self.heads, self.kv_heads, self.dim_head, self.ff_inner
        shapes = {"fused_proj": (D, H * E + 2 * K * E + 2 * F), "attn_out": (H * E, D), "ff_out": (F, D)}
        return self.depth * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def saved_per_token_layer(self, fused_attention: bool, keys: int) -> int:
        """Elements one token saves in one block for backward (module docstring)."""
        D, H, K, E, F = self.dim, self.heads, self.kv_heads, self.dim_head, self.ff_inner
        scores = 0 if fused_attention else H * keys  # the softmax output per query row
        return 2 * D + 4 * H * E + 3 * K * E + 4 * F + scores


@dataclass(frozen=True)
class Plan:
    stage: str
    gpus: int
    gpu_bytes: int
    params: int
    trainable: int
    frozen_extra: int          # parameters of frozen copies beside the trained model (PPO's reference, RM)
    zero: int
    offload_optimizer: bool
    offload_param: bool
    precision: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    checkpointing: bool
    fused_attention: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_other: int     # the same batch with checkpointing the other way round
    logits: int
    shape: Shape

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.gpus * self.seq_len

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    cuda: bool = True

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.logits + (CUDA_OVERHEAD if self.cuda else 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes


def model_state_bytes(frozen: int, trainable: int, largest_layer: int, *, gpus: int, zero: int, bf16: bool,
                      offload_optimizer: bool, offload_param: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) per GPU of a DeepSpeed module with `frozen` and
    `trainable` parameters, DeepSpeed's accounting (module docstring): per trained parameter, w-byte
    weights and gradients (w = 2 in bf16, 4 in fp32), then 4 bytes of fp32 gradients and 12 of fp32
    master weights and Adam moments (ZeRO-0 in fp32: torch's AdamW, 8 bytes of moments and nothing
    else). ZeRO-1 splits the fp32 part, ZeRO-2 the gradients too, ZeRO-3 everything plus one layer
    gathered (weights and gradients) at a time."""
    w, n, P, T = (2 if bf16 else 4), gpus, frozen + trainable, trainable
    if zero == 3:
        gathered = 2 * w * largest_layer
        weights = (0 if offload_param else w * P // n) + gathered
        if offload_optimizer:
            return weights, 0, 0
        return weights, 4 * T // n, 12 * T // n
    weights = w * P
    if offload_optimizer:  # gradients stream to the CPU, where the optimizer steps
        return weights, 0, 0
    if zero == 0:
        return (weights, w * T, 8 * T) if not bf16 else (weights, (w + 4) * T, 12 * T)
    if zero == 1:
        return weights, w * T + 4 * T // n, 12 * T // n
    return weights, (w + 4) * T // n, 12 * T // n


def activation_bytes(shape: Shape, *, batch: int, seq: int, bf16: bool, fused: bool, checkpointing: bool,
                     forwards: int = 1) -> int:
    """Saved activations of `forwards` passes over (batch, seq) through every block."""
    a = 2 if bf16 else 4
    tokens = batch * seq
    per_layer = tokens * shape.saved_per_token_layer(fused, keys=seq) * a
    if checkpointing:  # block inputs, plus one block recomputed at a time
        total = shape.depth * tokens * shape.dim * a + per_layer
    else:
        total = shape.depth * per_layer
    return forwards * (total + 2 * tokens * shape.dim * a)  # + embedding output and final norm


def logits_bytes(shape: Shape, *, tokens: int, bf16: bool) -> int:
    """The output layer: one chunk of fp32 logits (and its softmax) at a time, the hidden states'
    gradient, the output weight's fp32 gradient accumulator (model/loss.py)."""
    a = 2 if bf16 else 4
    rows = min(tokens, chunk_rows_for(shape.vocab))
    if tokens <= rows:  # the plain path: logits in the model dtype, fp32 copy, its log-softmax
        return tokens * shape.vocab * (a + 4 + 4)
    return 2 * rows * shape.vocab * 4 + tokens * shape.dim * a + shape.vocab * shape.dim * 4


def model_config_for(cfg: DictConfig, stage: str) -> ModelConfig:
    """The model a stage trains: `model=` for pretrain, the parent checkpoint's model.yaml otherwise."""
    if stage == "pretrain":
        return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    key = {"sft": "init_from", "reward": "init_from", "ppo": "policy", "grpo": "policy", "dpo": "policy"}[stage]
    model_cfg = cfg.get("model")
    if model_cfg is not None and model_cfg.get("family") == "hf":
        raise UserError("plan: Hugging Face models (model=hf) are not modelled yet; plan covers PaLM models")
    path = cfg.get(key)
    if not path:
        raise UserError(f"plan: {stage} takes its model from {key}=<checkpoint>; give one to plan for")
    data = checkpoint.load(str(path), key=key).model_config  # the loader's resolution and hash check
    if data.get("family") == "hf":
        raise UserError("plan: Hugging Face models are not modelled yet; plan covers PaLM models")
    return ModelConfig.from_dict(data)


def make_plan(cfg: DictConfig, stage: str, *, cuda: bool = True) -> Plan:
    """The estimate for `cfg` (a composed stage config) on `plan.gpus` GPUs of `plan.gpu_memory_gb`.
    `cuda=False` estimates the same run on the CPU (unfused attention)."""
    if stage not in TRAINING_STAGES:
        raise UserError(f"plan: choose a training stage ({', '.join(TRAINING_STAGES)}), got '{stage}'")
    train, _ = check_training_config(cfg)
    plan_cfg = cfg.get("plan") or {}
    gpus, gpu_gb = int(plan_cfg.get("gpus", 1)), float(plan_cfg.get("gpu_memory_gb", 80))
    if gpus <= 0 or gpu_gb <= 0:
        raise UserError(f"plan.gpus and plan.gpu_memory_gb must be positive, got {gpus} and {gpu_gb}")
    model_config = model_config_for(cfg, stage)
    shape = Shape.of(model_config)
    zero_cfg = cfg.zero
    zero = int(zero_cfg.stage)
    offload_opt = bool(zero_cfg.get("offload_optimizer"))
    offload_param = bool(zero_cfg.get("offload_param"))
    bf16 = str(cfg.precision) == "bf16" or (str(cfg.precision) == "auto" and cuda)
    rank = int(cfg.lora.rank) if cfg.get("lora") is not None else 0
    params = shape.params
    targets = tuple(cfg.lora.targets or LoRAConfig.targets) if rank > 0 else ()  # null: PaLM's three projections
    frozen, trainable = (params, shape.lora_params(rank, targets)) if rank > 0 else (0, params)
    # sequence length and batch per stage, and what else sits in memory
    micro, forwards, frozen_extra, fused = train.micro_batch_size, 1, 0, cuda
    if stage == "pretrain":
        seq = int(cfg.train.seq_len)
    elif stage == "sft":
        seq, fused = int(cfg.train.max_len), False  # padded batches take the masked path
    elif stage == "reward":
        seq, fused = int(cfg.train.max_len), False
        forwards = 1 if str(cfg.get("objective", "pairwise")) != "pairwise" else 2  # chosen and rejected
    elif stage == "dpo":  # chosen and rejected in one forward; the reference's log-probs are cached, no copy
        seq, fused, forwards = int(cfg.train.max_len), False, 2
    elif stage == "grpo":  # as ppo with rloo: actor only; lora=none keeps a reference and a reward model copy
        seq, fused, micro = model_config.max_seq_len, False, int(cfg.grpo.minibatch)
        frozen_extra = params * (2 if rank == 0 else 0)
    else:  # ppo: minibatches of prompt + response (at most the context); actor and critic forwards
        seq, fused = model_config.max_seq_len, False
        micro = int(cfg.ppo.minibatch)
        forwards = 1 if str(cfg.ppo.advantage) == "rloo" else 2
        frozen_extra = params * (2 if rank == 0 else 0)  # lora=none: reference and reward copies, outside ZeRO
        if rank == 0 and str(cfg.ppo.advantage) != "rloo":
            trainable = 2 * params  # a separate critic trunk
    weights, gradients, optimizer = model_state_bytes(
        frozen, trainable, shape.largest_layer, gpus=gpus, zero=zero, bf16=bf16,
        offload_optimizer=offload_opt, offload_param=offload_param)
    weights += (2 if bf16 else 4) * frozen_extra
    if not cuda:
        optimizer += CPU_EXTRA_PER_TRAINED_PARAM * trainable // (gpus if zero >= 1 else 1)
    ckpt = train.activation_checkpointing
    act = activation_bytes(shape, batch=micro, seq=seq, bf16=bf16, fused=fused, checkpointing=ckpt, forwards=forwards)
    other = activation_bytes(shape, batch=micro, seq=seq, bf16=bf16, fused=fused, checkpointing=not ckpt,
                             forwards=forwards)
    logits = 0 if stage == "reward" else logits_bytes(shape, tokens=micro * seq, bf16=bf16)
    return Plan(stage=stage, gpus=gpus, gpu_bytes=int(gpu_gb * GiB), params=params, trainable=trainable,
                frozen_extra=frozen_extra, zero=zero, offload_optimizer=offload_opt, offload_param=offload_param,
                precision="bf16" if bf16 else "fp32", micro_batch=micro, grad_accum=train.grad_accum, seq_len=seq,
                checkpointing=ckpt, fused_attention=fused, weights=weights, gradients=gradients, optimizer=optimizer,
                activations=act, activations_other=other, logits=logits, shape=shape, cuda=cuda)


def largest_fitting_micro_batch(plan: Plan, checkpointing: bool) -> int:
    """The largest micro-batch that fits with the other settings unchanged (0: not even 1)."""
    free = plan.gpu_bytes - plan.model_states - CUDA_OVERHEAD
    best = 0
    for micro in range(1, 4097):
        act = activation_bytes(plan.shape, batch=micro, seq=plan.seq_len, bf16=plan.precision == "bf16",
                               fused=plan.fused_attention, checkpointing=checkpointing)
        if act + logits_bytes(plan.shape, tokens=micro * plan.seq_len, bf16=plan.precision == "bf16") > free:
            break
        best = micro
    return best


def advice(plan: Plan) -> str:
    """The change that makes a plan fit, in the words of the config keys."""
    if plan.model_states + CUDA_OVERHEAD > plan.gpu_bytes:
        if plan.zero < 3:
            return "model states alone exceed the GPU: set zero=stage3 (or more GPUs: plan.gpus)"
        return "model states alone exceed the GPU even with ZeRO-3: zero=stage3_offload, or more GPUs (plan.gpus)"
    with_ckpt = largest_fitting_micro_batch(plan, checkpointing=True)
    without = largest_fitting_micro_batch(plan, checkpointing=False)
    if not plan.checkpointing and with_ckpt >= plan.micro_batch:
        extra = f" or train.micro_batch_size ≤ {without}" if without else ""
        return f"set train.activation_checkpointing=true{extra}"
    best = with_ckpt if plan.checkpointing else without
    if best:
        keep = plan.micro_batch * plan.grad_accum
        accum = math.ceil(keep / best)
        return (f"set train.micro_batch_size ≤ {best} (train.grad_accum={accum} keeps "
                f"{best * accum} sequences per GPU per step)"
                + ("" if plan.checkpointing else ", or train.activation_checkpointing=true"))
    return "not even one sequence fits: shorten the sequence, zero=stage3, or more GPUs (plan.gpus)"


def gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def render(plan: Plan) -> str:
    def row(name: str, value: str) -> str:
        return f"  {name:<34} {value}"

    zero = f"ZeRO-{plan.zero}" + (" + optimizer offload" if plan.offload_optimizer else "") + \
        (" + parameter offload" if plan.offload_param else "")
    lines = [
        f"palmrl plan: {plan.stage} on {plan.gpus} GPU(s) of {plan.gpu_bytes / GiB:g} GiB",
        row("parameters", f"{plan.params / 1e6:,.1f} M ({plan.trainable / 1e6:,.1f} M trained"
            + (f", {plan.frozen_extra / 1e6:,.1f} M in frozen copies" if plan.frozen_extra else "") + ")"),
        row("tokens per optimizer step", f"{plan.tokens_per_step:,} ({plan.micro_batch} × {plan.grad_accum} × "
            f"{plan.gpus} GPUs × {plan.seq_len} tokens)"),
        row("precision, ZeRO", f"{plan.precision}, {zero}"),
        "per GPU:",
        row("weights", gib(plan.weights)),
        row("gradients", gib(plan.gradients)),
        row("optimizer states", gib(plan.optimizer)),
        row("activations" + (" (checkpointed)" if plan.checkpointing else ""), gib(plan.activations)
            + f"   ({'without' if plan.checkpointing else 'with'} checkpointing: {gib(plan.activations_other)})"),
        row("output layer (chunked logits)", gib(plan.logits)),
        row("CUDA context and slack", gib(CUDA_OVERHEAD)),
        row("total", f"{gib(plan.total)} of {gib(plan.gpu_bytes)}: " + ("fits" if plan.fits else "DOES NOT FIT")),
    ]
    return "\n".join(lines)


def run(cfg: DictConfig, stage: str) -> Plan:
    plan = make_plan(cfg, stage)
    print(render(plan))
    if not plan.fits:
        raise UserError(f"plan: {gib(plan.total)} per GPU does not fit plan.gpu_memory_gb="
                        f"{plan.gpu_bytes / GiB:g}: {advice(plan)}")
    return plan
