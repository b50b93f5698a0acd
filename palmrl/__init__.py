"""palmrl: a PaLM-architecture transformer from raw text to an RLHF'd assistant.

pretrain -> sft -> reward -> ppo -> sample, every stage driven by composed Hydra configs and
trained through DeepSpeed; stages hand off self-describing checkpoint folders by path.
"""

__version__ = "0.1.0"


# The Python API (palmrl/api.py, docs/api.md) and the model classes under short names. Imported on
# first use, so `import palmrl` (and the CLI's start) stays free of torch.
_LAZY = {
    "load": ("palmrl.api", "load"), "run": ("palmrl.api", "run"), "LLM": ("palmrl.api", "LLM"),
    "PaLM": ("palmrl.model.palm", "PaLM"), "ModelConfig": ("palmrl.model.palm", "ModelConfig"),
    "LoRAConfig": ("palmrl.model.lora", "LoRAConfig"), "add_lora": ("palmrl.model.lora", "add_lora"),
    "merge_lora": ("palmrl.model.lora", "merge_lora"), "RewardModel": ("palmrl.reward", "RewardModel"),
    "UserError": ("palmrl.errors", "UserError"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'palmrl' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
