"""`palmrl export ckpt=runs/x/ppo out=exports/x-hf`: a policy as a standard Hugging Face folder.

Only checkpoints that started from a Hugging Face model (`model=hf`) have a transformers
architecture to export to. LoRA scopes are merged; GPT-2-style Conv1D weights are transposed back;
the folder loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.
The folder is written under a temporary name and renamed, and an existing one is replaced only
with overwrite=true.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.errors import UserError
from palmrl.io import check_output_file, quiet_transformers, readable_by_umask, transformers
from palmrl.model.hf import HFCausalLM
from palmrl.model.registry import config_from_dict
from palmrl.tokenizer import HEADERS_TEMPLATE, HFTokenizer


def run(cfg: DictConfig) -> Path:
    ckpt = checkpoint.load(cfg.ckpt, key="ckpt", stages=["sft", "ppo", "grpo", "dpo"],
                           trust_remote_code=bool(cfg.trust_remote_code))
    if getattr(config_from_dict(ckpt.model_config), "family", None) != "hf":
        raise UserError(f"ckpt: {ckpt.path} is a PaLM checkpoint; export writes Hugging Face folders, which only "
                        f"checkpoints started from model=hf have an architecture for")
    out = Path(str(cfg.out)).expanduser()
    check_export_target(out, ckpt.path, overwrite=bool(cfg.get("overwrite", False)))
    model, _ = checkpoint.policy_from_checkpoint(ckpt)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, ckpt.tokenizer(), tmp)
    (tmp / EXPORT_MARKER).write_text(json.dumps({"from": ckpt.lineage()}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"palmrl: exported {ckpt.path} -> {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))",
          flush=True)
    return out


EXPORT_MARKER = "palmrl_export.json"  # written into every export: overwrite=true replaces only such folders


def check_export_target(out: Path, source: Path, *, overwrite: bool) -> None:
    """out= must be a new folder, or (overwrite=true) one a previous export made: never the current
    directory, a checkpoint, or any other folder whose contents palmrl did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} is a file; give a folder for the Hugging Face model")
    if not out.parent.is_dir():
        raise UserError(f"out: the folder {out.parent} does not exist")
    resolved = out.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)) or \
            resolved == source.resolve() or source.resolve().is_relative_to(resolved):
        raise UserError(f"out: {out} would replace a folder export did not make; give a new folder")
    check_output_file(out / EXPORT_MARKER if out.is_dir() else out, key="out")  # not in a checkpoint or run
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"out: {out} exists and is not empty; add overwrite=true to replace an earlier export")
        if not (out / EXPORT_MARKER).is_file():
            raise UserError(f"out: {out} is not a folder palmrl export wrote (no {EXPORT_MARKER}); overwrite=true "
                            f"only replaces an earlier export")


def export_hf(model: HFCausalLM, tokenizer: HFTokenizer, folder: Path) -> Path:
    """Write `model` (LoRA already merged) as a standard HF folder: config, safetensors, tokenizer."""
    tf = transformers()
    hf_config = tf.AutoConfig.for_model(**model.config.hf_config)
    fresh = tf.AutoModelForCausalLM.from_config(hf_config)
    state = model.hf_state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"export: weights do not fit {hf_config.model_type} "
                        f"(missing {sorted(set(missing) - tied)[:2]}, unexpected {sorted(unexpected)[:2]})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        fresh.save_pretrained(str(folder), safe_serialization=True)
    if not tokenizer.has_template:  # the policy was trained on palmrl's header format: say so
        tokenizer.tk.chat_template = HEADERS_TEMPLATE
    tokenizer.tk.save_pretrained(str(folder))
    readable_by_umask(folder)
    return folder
