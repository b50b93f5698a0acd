"""`palmrl export ckpt=runs/x/ppo out=exports/x-hf`: a policy as a standard Hugging Face folder.

Only checkpoints that started from a Hugging Face model (`model=hf`) have a transformers
architecture to export to. LoRA scopes are merged; GPT-2-style Conv1D weights are transposed back;
the folder loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.
The folder is written under a temporary name and renamed, and an existing one is replaced only
with overwrite=true.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.errors import UserError
from palmrl.stages.common import config_from_dict, policy_from_checkpoint


def run(cfg: DictConfig) -> Path:
    from palmrl.model.hf import export_hf

    ckpt = checkpoint.load(cfg.ckpt, key="ckpt", stages=["sft", "ppo"])
    if getattr(config_from_dict(ckpt.model_config), "family", None) != "hf":
        raise UserError(f"ckpt: {ckpt.path} is a PaLM checkpoint; export writes Hugging Face folders, which only "
                        f"checkpoints started from model=hf have an architecture for")
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.get("overwrite", False):
        raise UserError(f"out: {out} exists and is not empty; add overwrite=true to replace it")
    model, _ = policy_from_checkpoint(ckpt)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, ckpt.tokenizer(), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"palmrl: exported {ckpt.path} -> {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))",
          flush=True)
    return out
