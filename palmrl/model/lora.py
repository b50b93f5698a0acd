"""LoRA adapters in named scopes over one frozen base model.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
A targeted `nn.Linear` becomes a `LoRALinear` that keeps the base `weight` under its original
name and holds one low-rank pair (A, B) per scope:

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        (B starts at zero, so y starts as x W^T)

Several scopes ("actor", "critic", "reward") live side by side on ONE base held once in memory, as
PPO needs; `lora_scope(model, name)` picks which adapter set is active, and scope None runs the bare
base, which is the frozen reference policy. The active scope is a plain attribute on each
LoRALinear, so switching costs nothing and never enters the state dict.

Parameter names look like `layers.0.fused_proj.lora_A.actor`; freezing is by name: everything but
`lora_` parameters (as in litgpt).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palmrl.errors import UserError


@dataclass
class LoRAConfig:
    """Adapter hyperparameters; configs/lora/*.yaml hold exactly these keys."""

    rank: int = 8  # adapter rank r: higher adapts more, costs more memory
    alpha: float = 16.0  # update scale alpha / r; 2 * rank is the common choice
    dropout: float = 0.0  # dropout on the adapter input; 0 keeps PPO's log-probs deterministic
    targets: tuple[str, ...] = ("fused_proj", "attn_out", "ff_out")  # Linear names (suffixes) to adapt

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise UserError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)



class LoRALinear(nn.Linear):
    """A Linear whose base `weight` (and bias, if any) is shared by low-rank adapters in named scopes."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: optimizer and state-dict names are unchanged
        self.bias = base.bias  # PaLM has none; GPT-2-style HF models do
        self.lora_A = nn.ParameterDict()  # scope -> (r, in)
        self.lora_B = nn.ParameterDict()  # scope -> (out, r)
        self.lora_scaling: dict[str, float] = {}  # scope -> alpha / r
        self.lora_dropout: dict[str, float] = {}  # scope -> dropout probability
        self.active_scope: str | None = None  # plain attribute: switching scopes is free

    def add_scope(self, scope: str, config: LoRAConfig) -> None:
        weight = self.weight
        A = torch.empty(config.rank, self.in_features, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's default init, as in the LoRA reference
        B = torch.zeros(self.out_features, config.rank, dtype=weight.dtype, device=weight.device)
        self.lora_A[scope], self.lora_B[scope] = nn.Parameter(A), nn.Parameter(B)
        self.lora_scaling[scope] = config.alpha / config.rank
        self.lora_dropout[scope] = config.dropout

    def delta_weight(self, scope: str) -> Tensor:
        """The scope's update to `weight`: B @ A * alpha / r, (out, in)."""
        return self.lora_B[scope] @ self.lora_A[scope] * self.lora_scaling[scope]

    def forward(self, x: Tensor) -> Tensor:
        return self.add_lora_update(F.linear(x, self.weight, self.bias), x)

    def add_lora_update(self, out: Tensor, x: Tensor) -> Tensor:
        """out (x's base output, a fresh tensor) plus the active scope's low-rank update, added in place.

        The scale goes on the r-wide x A^T and the update is accumulated into `out` by one addmm: no
        (n, out) update tensor is written, scaled and added (at palm_small's fused projection on 832
        rows that was 49 against 25 ms a forward, one thread). The same values to the last bit as
        `out + (x A^T B^T) * scale` when the scale is a power of two (the presets: 2): scaling by it
        is exact, and the addmm adds each fp32 product sum to `out` as the separate add did."""
        scope = self.active_scope
        if scope is None or scope not in self.lora_A:
            return out
        x = F.dropout(x, self.lora_dropout[scope], self.training)
        low = F.linear(x, self.lora_A[scope]) * self.lora_scaling[scope]  # (..., r)
        up = self.lora_B[scope].t()  # (r, out)
        if up.dtype != low.dtype:  # under autocast x A^T is bf16 while the parameters are fp32
            up = up.to(low.dtype)
        return out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), up).view(out.shape)


def _lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, scope: str, config: LoRAConfig) -> None:
    """Add adapter set `scope` to every targeted Linear (wrapped in a LoRALinear the first time)."""
    if not isinstance(scope, str) or not scope or "." in scope:
        raise UserError(f"LoRA scope must be a non-empty name without dots, got {scope!r}")
    if scope in lora_scopes(model):
        raise UserError(f"LoRA scope {scope!r} already exists on this model")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _matches(name, config.targets)]
    if not targets:
        raise UserError(f"lora.targets {list(config.targets)} matched no Linear layer of the model")
    for name, module in targets:
        if config.rank > min(module.in_features, module.out_features):
            raise UserError(f"lora.rank {config.rank} exceeds the smaller side of {name} "
                            f"({module.in_features} -> {module.out_features})")

    for name, module in targets:
        if not isinstance(module, LoRALinear):
            wrapped = LoRALinear(module)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
            module = wrapped
        module.add_scope(scope, config)


def set_lora_scope(model: nn.Module, scope: str | None) -> None:
    """Make `scope` the active adapter set everywhere; None runs the base model alone."""
    if scope is not None and scope not in lora_scopes(model):
        raise UserError(f"LoRA scope {scope!r} does not exist (have: {lora_scopes(model)})")
    for module in _lora_modules(model):
        module.active_scope = scope


@contextmanager
def lora_scope(model: nn.Module, scope: str | None):
    """Run the block with adapter set `scope` active (None = the frozen base), then restore."""
    previous = [(m, m.active_scope) for m in _lora_modules(model)]
    set_lora_scope(model, scope)
    try:
        yield model
    finally:
        for module, active in previous:
            module.active_scope = active


def lora_scopes(model: nn.Module) -> list[str]:
    """Names of the adapter sets on the model, in the order they were added."""
    scopes: dict[str, None] = {}
    for module in _lora_modules(model):
        scopes.update(dict.fromkeys(module.lora_A.keys()))
    return list(scopes)


def _is_lora(name: str, scope: str | None) -> bool:
    return "lora_" in name and (scope is None or name.endswith("." + scope))


def lora_state_dict(model: nn.Module, scope: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors only (names contain `lora_`), of one scope or of all scopes."""
    if scope is not None and scope not in lora_scopes(model):
        raise UserError(f"LoRA scope {scope!r} does not exist (have: {lora_scopes(model)})")
    return {name: t.detach() for name, t in model.state_dict().items() if _is_lora(name, scope)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapter tensors into scopes already added with `add_lora`; strict on names and shapes.

    The state may hold some scopes or all of them; every adapter tensor of each scope it mentions
    must be present.
    """
    own = {name: p for name, p in model.named_parameters() if "lora_" in name}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise UserError(f"adapter state has tensors the model lacks (add_lora first?): {unexpected[:3]}")
    scopes = {name.rsplit(".", 1)[1] for name in state}
    missing = sorted(name for name in own if name.rsplit(".", 1)[1] in scopes and name not in state)
    if missing:
        raise UserError(f"adapter state is missing tensors: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise UserError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, "
                                f"the model expects {tuple(own[name].shape)} (different lora.rank?)")
            own[name].copy_(tensor)


def merge_lora(model: nn.Module, scope: str) -> None:
    """Fold scope's B @ A * alpha / r into the base weights and remove the scope.

    Every other scope now sits on top of the merged base; a module whose scopes are all gone stays
    a LoRALinear that behaves exactly like nn.Linear (same state-dict names).
    """
    if scope not in lora_scopes(model):
        raise UserError(f"LoRA scope {scope!r} does not exist (have: {lora_scopes(model)})")
    with torch.no_grad():
        for module in _lora_modules(model):
            if scope not in module.lora_A:
                continue
            delta = module.lora_B[scope].float() @ module.lora_A[scope].float() * module.lora_scaling[scope]
            module.weight.add_(delta.to(module.weight.dtype))  # summed in fp32, then cast once
            del module.lora_A[scope], module.lora_B[scope]
            del module.lora_scaling[scope], module.lora_dropout[scope]
            if module.active_scope == scope:
                module.active_scope = None


def freeze_except_lora(model: nn.Module, scope: str | None = None) -> None:
    """requires_grad=False on every parameter but the `lora_` ones (of `scope`, or of all scopes)."""
    if scope is not None and scope not in lora_scopes(model):
        raise UserError(f"LoRA scope {scope!r} does not exist (have: {lora_scopes(model)})")
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora(name, scope))
