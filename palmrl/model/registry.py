"""From a model.yaml to a model: the config class of each family, an untrained model of it, the
checks a tokenizer must pass to drive it, and LoRA scopes added by config.

PaLM (`palmrl.model.palm`) is the default family; `family: hf` in a model.yaml names a Hugging Face
causal LM (`palmrl.model.hf`), imported only when used.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from palmrl.errors import UserError
from palmrl.model.hf import HFCausalLM
from palmrl.model.lora import LoRAConfig, add_lora, freeze_except_lora, set_lora_scope
from palmrl.model.palm import ModelConfig, PaLM


def config_from_dict(d: Mapping):
    """model.yaml → ModelConfig (PaLM) or HFConfig (a Hugging Face model, `family: hf`)."""
    if d.get("family") == "hf":
        from palmrl.model.hf import HFConfig

        return HFConfig.from_dict(d)
    return ModelConfig.from_dict(d)


def build_model(config, *, trust_remote_code: bool = False):
    """An untrained model of the family `config` describes. Remote code (an HF config's auto_map) runs
    only with `trust_remote_code`, the user's explicit consent; never because a config file says so."""
    if getattr(config, "family", None) == "hf":
        from palmrl.model.hf import HFCausalLM

        return HFCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return PaLM(config)


def check_vocab(tokenizer, model_config: ModelConfig, *, where: str) -> None:
    if getattr(model_config, "family", None) == "hf":
        if tokenizer.vocab_size > model_config.vocab_size:
            raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                            f"{model_config.vocab_size}: tokenizer and model do not match")
        return
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserError(f"model.vocab_size ({model_config.vocab_size}) does not match the tokenizer at {where} "
                        f"({tokenizer.vocab_size} ids): set model.vocab_size={tokenizer.vocab_size} "
                        f"or use a matching tokenizer")


def default_lora_targets(model) -> tuple[str, ...]:
    """lora.targets=null: the model family's projections (PaLM's three, an HF model's every Linear)."""
    return tuple(getattr(model, "lora_targets", LoRAConfig.targets))


def apply_lora(model, lora_cfg, scope: str) -> dict:
    """Add a trainable LoRA scope over a frozen base (rank 0 = full fine-tuning: nothing to do).

    Returns the manifest entry describing the scope, or {} without LoRA.
    """
    rank = int(lora_cfg.rank)
    if rank < 0:
        raise UserError(f"lora.rank must be >= 0, got {rank}")
    if rank == 0:
        return {}
    targets = tuple(lora_cfg.targets) if lora_cfg.get("targets") else default_lora_targets(model)
    spec = {"rank": rank, "alpha": float(lora_cfg.alpha), "targets": list(targets)}
    add_lora(model, scope, LoRAConfig(rank=rank, alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                                      targets=targets))
    set_lora_scope(model, scope)
    freeze_except_lora(model, scope)
    return {"scopes": {scope: spec}, "active": scope}


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Turn per-block activation checkpointing on/off in every model inside `module` (PaLM blocks;
    Hugging Face models through gradient_checkpointing_enable, non-reentrant); returns how many."""

    found = 0
    for sub in module.modules():
        if isinstance(sub, PaLM):
            sub.activation_checkpointing = enabled
            found += 1
        elif isinstance(sub, HFCausalLM):
            if enabled:
                sub.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                sub.hf.gradient_checkpointing_disable()
            found += 1
    return found
