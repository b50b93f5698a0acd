"""What several stages share: the tokenizer they agree on, and models rebuilt from checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.errors import UserError
from palmrl.model.lora import LoRAConfig, add_lora, load_lora_state_dict, set_lora_scope
from palmrl.model.palm import ModelConfig, PaLM


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def train_tokenizer_from_cfg(cfg: DictConfig):
    from palmrl.data.sources import load_texts
    from palmrl.tokenizer import train_tokenizer

    texts = load_texts(cfg.data)
    limit = cfg.tokenizer.get("max_documents")
    if limit:
        texts = (t for i, t in enumerate(texts) if i < int(limit))
    return train_tokenizer(texts, kind=str(cfg.tokenizer.kind), vocab_size=int(cfg.tokenizer.vocab_size),
                           model_type=str(cfg.tokenizer.model_type), seed=int(cfg.seed))


def tokenizer_for_training(cfg: DictConfig, is_main: bool):
    """Load the tokenizer at tokenizer.path, training it there first (rank 0) when it is missing."""
    from palmrl.tokenizer import Tokenizer

    path = Path(str(cfg.tokenizer.path))
    exists = (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()
    if not exists and is_main:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer_from_cfg(cfg)
        path.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        print(f"palmrl: trained a {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids) in "
              f"{time.perf_counter() - t0:.1f}s -> {path}", flush=True)
    _barrier()
    return Tokenizer.load(path)


def config_from_dict(d: Mapping):
    """model.yaml → ModelConfig (PaLM) or HFConfig (a Hugging Face model, `family: hf`)."""
    if d.get("family") == "hf":
        from palmrl.model.hf import HFConfig

        return HFConfig.from_dict(d)
    return ModelConfig.from_dict(d)


def build_model(config):
    """An untrained model of the family `config` describes."""
    if getattr(config, "family", None) == "hf":
        from palmrl.model.hf import HFCausalLM

        return HFCausalLM.from_config(config, trust_remote_code=bool(config.source.get("trust_remote_code")))
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


def load_palm_weights(model, weights: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load trunk weights (PaLM or HF; head and adapter tensors in the same file are ignored here)."""
    trunk = {k: v for k, v in weights.items()
             if k.split(".")[0] not in ("reward_head", "value_head") and "lora_" not in k}
    expected = dict(model.named_parameters())
    unknown = sorted(set(trunk) - set(model.state_dict()))
    missing = sorted(set(expected) - set(trunk))
    if unknown or missing:
        culprit = f"unexpected tensor '{unknown[0]}'" if unknown else f"missing tensor '{missing[0]}'"
        raise UserError(f"{where}: weights do not fit the model in its model.yaml ({culprit})")
    with torch.no_grad():
        for name, param in expected.items():
            if param.shape != trunk[name].shape:
                raise UserError(f"{where}: tensor '{name}' has shape {tuple(trunk[name].shape)}, "
                                f"the model expects {tuple(param.shape)}")
            param.copy_(trunk[name])


def attach_adapters(model: PaLM, ckpt: checkpoint.Checkpoint) -> list[str]:
    """Recreate the LoRA scopes recorded in the manifest and load their tensors; returns the scopes."""
    lora = ckpt.manifest.get("lora") or {}
    scopes = lora.get("scopes", {})
    if not scopes:
        return []
    for scope, spec in scopes.items():
        add_lora(model, scope, LoRAConfig(rank=int(spec["rank"]), alpha=float(spec["alpha"]),
                                          dropout=0.0, targets=tuple(spec["targets"])))
    load_lora_state_dict(model, ckpt.adapters())
    set_lora_scope(model, lora.get("active"))
    return list(scopes)


def model_from_checkpoint(ckpt: checkpoint.Checkpoint, *, adapters: bool = True):
    """The model (PaLM or HF) a checkpoint describes, with its LoRA adapters attached (active scope as saved)."""
    config = config_from_dict(ckpt.model_config)
    model = build_model(config)
    load_palm_weights(model, ckpt.weights(), where=str(ckpt.path))
    if adapters:
        attach_adapters(model, ckpt)
    return model


def policy_from_checkpoint(ckpt: checkpoint.Checkpoint):
    """The checkpoint's policy as one plain model: any LoRA scopes it carries merged into the base."""
    from palmrl.model.lora import merge_lora

    model = model_from_checkpoint(ckpt)
    for scope in (ckpt.manifest.get("lora") or {}).get("scopes", {}):
        merge_lora(model, scope)
    return model, config_from_dict(ckpt.model_config)


def policy_source(cfg: DictConfig, key: str, stages: list[str]):
    """What sft/reward start from: `model=hf model.path=...` (a Hugging Face model: no parent
    checkpoint) or the palmrl checkpoint at cfg.<key>. Returns (model, config, tokenizer, parent, facts)."""
    model_cfg = cfg.get("model")
    if model_cfg is not None and model_cfg.get("family") != "hf":
        raise UserError(f"model: {cfg.stage} takes its architecture from {key}; model= only selects model=hf "
                        f"(a Hugging Face model as the starting point)")
    if model_cfg is not None:
        from palmrl.model.hf import load_source

        model, tokenizer = load_source(model_cfg)
        return model, model.config, tokenizer, None, {"hf_source": model.config.source}
    parent = checkpoint.load(cfg[key], key=key, stages=stages)
    tokenizer = parent.tokenizer()
    model, config = policy_from_checkpoint(parent)
    return model, config, tokenizer, parent, {}


def default_lora_targets(model) -> tuple[str, ...]:
    """lora.targets=null: the model family's projections (PaLM's three, an HF model's every Linear)."""
    from palmrl.model.lora import LoRAConfig

    return tuple(getattr(model, "lora_targets", LoRAConfig.targets))


def apply_lora(model: PaLM, lora_cfg, scope: str) -> dict:
    """Add a trainable LoRA scope over a frozen base (rank 0 = full fine-tuning: nothing to do).

    Returns the manifest entry describing the scope, or {} without LoRA.
    """
    from palmrl.model.lora import freeze_except_lora

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


def export_split(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Gathered module state → (model.safetensors tensors, adapters.safetensors tensors)."""
    weights = {k: v for k, v in state.items() if "lora_" not in k}
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    return weights, adapters
