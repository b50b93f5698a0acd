"""The PaLM model, its LoRA adapters and its scalar heads (reward / value)."""

from palmrl.model.heads import ScalarHead
from palmrl.model.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    freeze_except_lora,
    load_lora_state_dict,
    lora_scope,
    lora_scopes,
    lora_state_dict,
    merge_lora,
    set_lora_scope,
)
from palmrl.model.palm import KVCache, ModelConfig, PaLM

__all__ = [
    "KVCache", "LoRAConfig", "LoRALinear", "ModelConfig", "PaLM", "ScalarHead", "add_lora",
    "freeze_except_lora", "load_lora_state_dict", "lora_scope",
    "lora_scopes", "lora_state_dict", "merge_lora", "set_lora_scope",
]
