"""`palmrl export ckpt=runs/x/ppo out=exports/x-hf [format=hf|peft]`: a policy as a standard Hugging Face folder.

Only checkpoints that started from a Hugging Face model (`model=hf`) have a transformers
architecture to export to. format=hf: LoRA scopes are merged; GPT-2-style Conv1D weights are
transposed back; the folder loads with `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)`. format=peft (a LoRA checkpoint): the adapter in PEFT's layout,
`adapter_config.json` + `adapter_model.safetensors`, beside the unmerged base in `out/base/`;
`peft.AutoPeftModelForCausalLM.from_pretrained(out)` (or `PeftModel.from_pretrained(base, out)`) loads
it, and so can anything that reads PEFT adapters (vLLM's LoRA serving, the hub).
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
from palmrl.checkpoint import export_hf
from palmrl.errors import UserError
from palmrl.io import check_output_file, readable_by_umask
from palmrl.model.hf import HFCausalLM
from palmrl.model.registry import config_from_dict


def run(cfg: DictConfig) -> Path:
    ckpt = checkpoint.load(cfg.ckpt, key="ckpt", stages=["sft", "ppo", "grpo", "dpo"],
                           trust_remote_code=bool(cfg.trust_remote_code))
    if getattr(config_from_dict(ckpt.model_config), "family", None) != "hf":
        raise UserError(f"ckpt: {ckpt.path} is a PaLM checkpoint; export writes Hugging Face folders, which only "
                        f"checkpoints started from model=hf have an architecture for")
    kind = str(cfg.get("format") or "hf")
    if kind not in ("hf", "peft"):
        raise UserError(f"format must be hf or peft, got {kind!r}")
    scopes = list((ckpt.manifest.get("lora") or {}).get("scopes", {}))
    if kind == "peft" and len(scopes) != 1:
        raise UserError(f"format=peft: {ckpt.path} carries {len(scopes)} LoRA scopes "
                        f"({', '.join(scopes) or 'it was trained with lora=none'}); PEFT holds one adapter: "
                        f"export it with format=hf (scopes merged)")
    out = Path(str(cfg.out)).expanduser()
    check_export_target(out, ckpt.path, overwrite=bool(cfg.get("overwrite", False)))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "hf":
        model, _ = checkpoint.policy_from_checkpoint(ckpt)
        export_hf(model, ckpt.tokenizer(), tmp)
        how = f"transformers: AutoModelForCausalLM.from_pretrained('{out}')"
    else:
        model = checkpoint.model_from_checkpoint(ckpt)  # adapters attached, not merged
        export_hf(model, ckpt.tokenizer(), tmp / "base")  # the base alone: hf_state_dict leaves lora_* out
        export_peft(model, scopes[0], ckpt.manifest["lora"]["scopes"][scopes[0]], tmp, base=out / "base")
        how = f"peft: AutoPeftModelForCausalLM.from_pretrained('{out}')"
    (tmp / EXPORT_MARKER).write_text(json.dumps({"from": ckpt.lineage(), "format": kind}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"palmrl: exported {ckpt.path} -> {out} ({how})", flush=True)
    return out


def export_peft(model: HFCausalLM, scope: str, spec: dict, folder: Path, *, base: Path) -> Path:
    """One LoRA scope as a PEFT adapter: `base_model.model.<module>.lora_{A,B}.weight` (A: r x in,
    B: out x r, scaling alpha / r, as palmrl's), and the adapter_config.json PEFT reads. GPT-2-style
    Conv1D modules get fan_in_fan_out (PEFT keeps their base weights in Conv1D's layout)."""
    from safetensors.torch import save_file

    from palmrl.model.lora import LoRALinear

    tensors, targets, conv1d = {}, set(), False
    for name, module in model.hf.named_modules():
        if isinstance(module, LoRALinear) and scope in module.lora_A:
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A[scope].detach().float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B[scope].detach().float().cpu().contiguous()
            targets.add(name.rpartition(".")[2])
            conv1d |= name in model.conv1d_names
    if not tensors:
        raise UserError(f"format=peft: LoRA scope {scope!r} adapts no module of the model")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(spec["rank"]), "lora_alpha": float(spec["alpha"]),
        "lora_dropout": 0.0, "target_modules": sorted(targets), "fan_in_fan_out": conv1d, "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": str(base.resolve()),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    readable_by_umask(folder)
    return folder


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
