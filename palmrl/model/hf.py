"""Any Hugging Face causal LM as the base of sft, reward, ppo and sample (`model=hf model.path=...`).

`HFCausalLM` wraps a `transformers` AutoModelForCausalLM behind the interface the stages use from
PaLM: `trunk(tokens, attention_mask, cache)` → final-normed hidden states, `logits(hidden)`,
`forward(...)` → logits, `new_cache(B, max_len)` for batched generation through the model's own
KV cache, and `config` with `dim`, `vocab_size`, `max_seq_len`. Left-padded batches get position
ids from the attention mask, so ragged prompts decode as they would alone.

Dropout is switched off (see HFCausalLM). GPT-2-style `Conv1D` projections are turned into
`nn.Linear` once (a transpose) when the model is built, so palmrl's LoRA scopes, merging and ZeRO
sharding treat every family alike; `palmrl export` (stages/export.py) transposes them back.

Elsewhere: the model's tokenizer is `palmrl.tokenizer.HFTokenizer`; loading a source folder or hub
name (`checkpoint.load_source`) refuses remote code unless `model.trust_remote_code=true`.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palmrl.errors import UserError
from palmrl.io import transformers
from palmrl.model.loss import cross_entropy
from palmrl.model.palm import kept_positions

FAMILY = "hf"
@dataclass
class HFConfig:
    """model.yaml of an HF-based checkpoint: enough to rebuild the architecture without the source."""

    hf_config: dict                     # the transformers config (config.to_dict())
    source: dict = field(default_factory=dict)   # path or hub name, revision, sha256 of its weights
    family: str = FAMILY

    @property
    def dim(self) -> int:
        return int(self._get("hidden_size", "n_embd", "d_model"))

    @property
    def vocab_size(self) -> int:
        return int(self._get("vocab_size"))

    @property
    def max_seq_len(self) -> int:
        return int(self._get("max_position_embeddings", "n_positions", "n_ctx", "seq_length"))

    def _get(self, *keys: str) -> Any:
        for key in keys:
            value = self.hf_config.get(key)
            if value is None and isinstance(self.hf_config.get("text_config"), dict):
                value = self.hf_config["text_config"].get(key)
            if value is not None:
                return value
        raise UserError(f"model: the HF config has none of {', '.join(keys)}")

    def to_dict(self) -> dict:
        return {"family": self.family, "source": dict(self.source), "hf_config": dict(self.hf_config)}

    @classmethod
    def from_dict(cls, d: Mapping) -> HFConfig:
        return cls(hf_config=dict(d["hf_config"]), source=dict(d.get("source") or {}))


def _conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D (x @ W + b, W: in×out) with the equivalent nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return []
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
            converted.append(name)
    return converted


class HFCausalLM(nn.Module):
    """A transformers causal LM behind PaLM's interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, config: HFConfig):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.conv1d_names = _conv1d_to_linear(self.hf)
        # no dropout, as in PaLM and TRL's PPO/reward trainers: PPO's ratios and the KL to the
        # reference compare train-mode and eval-mode forwards, which dropout would make disagree
        for module in self.hf.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        params = inspect.signature(self.hf.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_config(cls, config: HFConfig, *, trust_remote_code: bool = False) -> HFCausalLM:
        """The architecture alone (random weights), e.g. to load a palmrl checkpoint into."""
        tf = transformers()
        hf_config = tf.AutoConfig.for_model(**config.hf_config)
        try:
            model = tf.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        except ValueError as err:
            raise UserError(f"model: {hf_config.model_type!r} is not a causal LM transformers knows "
                            f"({str(err).splitlines()[0][:160]})") from None
        return cls(model.float(), config)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Default LoRA targets: the names of every Linear projection (never the output head)."""
        out = self.hf.get_output_embeddings()
        names = {name.rpartition(".")[2] for name, module in self.hf.named_modules()
                 if isinstance(module, nn.Linear) and module is not out}
        return tuple(sorted(names))

    # ---- the PaLM interface -------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, *, weights: str = "fp32", **_) -> HFCache:
        if weights != "fp32":
            raise UserError(f"decode_weights={weights} applies to palmrl's PaLM models; Hugging Face models "
                            "decode with their own weights (use decode_weights=fp32)")
        tf = transformers()
        return HFCache(tf.DynamicCache(), torch.zeros(batch_size, 0, dtype=torch.long, device=self._device()))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def trunk(self, tokens: Tensor, *, attention_mask: Tensor | None = None, cache: HFCache | None = None,
              shared_prefix: int = 0) -> Tensor:
        """Final-normed hidden states (B, T, D) of `tokens`; with a cache, only the new tokens.
        `shared_prefix` is accepted as PaLM.trunk takes it; every row is computed whole here."""
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        if cache is not None:
            cache.mask = torch.cat((cache.mask, mask), dim=1)
            full = cache.mask
        else:
            full = mask
        positions = (full.cumsum(1) - 1).clamp_min(0)[:, -tokens.shape[1]:]
        kwargs = {self._cache_kw: cache.kv if cache is not None else None, "use_cache": cache is not None}
        out = self.hf.base_model(input_ids=tokens, attention_mask=full, position_ids=positions, **kwargs)
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        return self.hf.get_output_embeddings()(hidden)

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None, cache: HFCache | None = None,
                targets: Tensor | None = None, ignore_index: int | None = -100, last_only: bool = False,
                keep: slice | Tensor | None = None, shared_prefix: int = 0) -> Tensor:
        """Logits (B, T, V), or the last position's (B, 1, V) with `last_only`, or those of the positions
        `keep` names (as PaLM's); with targets: their mean cross-entropy, chunked as PaLM's (model/loss.py).
        `shared_prefix` is accepted as PaLM's forward takes it; every row is computed whole here."""
        hidden = self.trunk(tokens, attention_mask=attention_mask, cache=cache)
        if targets is None:
            return self.logits(kept_positions(hidden, keep, last_only))
        head = self.hf.get_output_embeddings()
        if getattr(head, "bias", None) is not None:  # a biased head: the plain path
            return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100 if ignore_index is None else ignore_index)
        return cross_entropy(hidden, head.weight, targets, ignore_index=ignore_index)

    # ---- export -------------------------------------------------------------------------
    def hf_state_dict(self) -> dict[str, Tensor]:
        """The wrapped model's state in its own layout (Conv1D weights transposed back)."""
        state = {k: v.detach().cpu() for k, v in self.hf.state_dict().items() if "lora_" not in k}
        for name in self.conv1d_names:
            state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()
        return state


@dataclass
class HFCache:
    """transformers' KV cache plus the attention mask of everything it holds (B, T_seen)."""

    kv: Any
    mask: Tensor

    def select(self, index: Tensor) -> HFCache:
        """The cache of rows `index` (B',), in that order, as KVCache.select: a prompt prefilled once,
        handed to each of its rows. transformers' cache is reordered in place (its reorder_cache, an
        index_select of every layer), so this HFCache is not used again."""
        self.kv.reorder_cache(index)
        return HFCache(self.kv, self.mask[index])
