"""Self-describing checkpoint folders (DESIGN §3), written atomically, loaded without unpickling.

    runs/<run>/<stage>/step-000200/   model.safetensors   consolidated weights (fp32, every ZeRO stage)
                       final/         adapters.safetensors LoRA scopes when not merged (optional)
                                      model.yaml          ModelConfig fields
                                      tokenizer.model     (or tokenizer.json for the byte tokenizer)
                                      manifest.json       stage, step, parent, config, metrics, hashes

A folder is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks valid. Loading checks the manifest's sha256 of every weight file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import palmrl
from palmrl.errors import UserError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"
MODEL_YAML = "model.yaml"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def resolve(path: str | os.PathLike, *, key: str = "ckpt") -> Path:
    """A stage folder resolves to its final/; a step folder or final/ stays as it is."""
    if path is None or str(path) in ("", "None", "???"):
        raise UserError(f"{key}: no checkpoint given (set {key}=runs/<run>/<stage>)")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{key}: no such checkpoint folder: {p}")
    if (p / MANIFEST).is_file():
        return p
    if (p / "final" / MANIFEST).is_file():
        return p / "final"
    steps = sorted(p.glob("step-*/" + MANIFEST))
    hint = f" (it has {steps[-1].parent.name}/: pass that folder)" if steps else ""
    raise UserError(f"{key}: {p} is not a palmrl checkpoint (no {MANIFEST}){hint}")


@dataclass
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def model_config(self) -> dict:
        return yaml.safe_load((self.path / MODEL_YAML).read_text())

    def tokenizer(self):
        from palmrl.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(self.path)
        expected = self.manifest.get("tokenizer_sha256")
        if expected and tokenizer.content_hash() != expected:
            raise UserError(f"checkpoint {self.path}: its tokenizer does not match tokenizer_sha256 in {MANIFEST}")
        from palmrl.stages.common import check_vocab, config_from_dict

        check_vocab(tokenizer, config_from_dict(self.model_config), where=f"checkpoint {self.path}")
        return tokenizer

    def _verified(self, name: str) -> Path:
        file = self.path / name
        expected = self.manifest.get("files", {}).get(name)
        if not file.is_file():
            raise UserError(f"checkpoint {self.path}: missing {name}")
        if expected is None:
            raise UserError(f"checkpoint {self.path}: {name} is not listed in {MANIFEST}")
        if sha256_file(file) != expected:
            raise UserError(f"checkpoint {self.path}: {name} does not match its sha256 in {MANIFEST} (corrupt or tampered)")
        return file

    def weights(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(self._verified(WEIGHTS))
        except SafetensorError as err:
            raise UserError(f"checkpoint {self.path}: unreadable {WEIGHTS}: {err}") from None

    def adapters(self) -> dict[str, torch.Tensor]:
        if ADAPTERS not in self.manifest.get("files", {}):
            return {}
        try:
            return load_file(self._verified(ADAPTERS))
        except SafetensorError as err:
            raise UserError(f"checkpoint {self.path}: unreadable {ADAPTERS}: {err}") from None

    @property
    def content_hash(self) -> str:
        return self.manifest.get("files", {}).get(WEIGHTS, "")

    def lineage(self) -> dict:
        return {"path": str(self.path.resolve()), "stage": self.stage, "step": self.manifest.get("step"),
                "sha256": self.content_hash}


def load(path: str | os.PathLike, *, key: str = "ckpt", stages: Iterable[str] | None = None) -> Checkpoint:
    folder = resolve(path, key=key)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: {folder / MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or "stage" not in manifest:
        raise UserError(f"{key}: {folder / MANIFEST} has no 'stage': not a palmrl manifest")
    allowed = list(stages) if stages is not None else None
    if allowed is not None and manifest["stage"] not in allowed:
        raise UserError(f"{key}: {folder} is a {manifest['stage']} checkpoint; expected {' or '.join(allowed)}")
    if not (folder / MODEL_YAML).is_file():
        raise UserError(f"{key}: {folder} has no {MODEL_YAML}")
    return Checkpoint(folder, manifest)


def save(folder: Path, *, stage: str, step: int, weights: Mapping[str, torch.Tensor], model_config: Mapping,
         tokenizer, config: Mapping | None = None, metrics: Mapping | None = None,
         parent: Checkpoint | None = None, adapters: Mapping[str, torch.Tensor] | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp name, then rename). Rank 0 only."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    files: dict[str, str] = {}
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    files[WEIGHTS] = sha256_file(tmp / WEIGHTS)
    if adapters:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, tmp / ADAPTERS)
        files[ADAPTERS] = sha256_file(tmp / ADAPTERS)
    (tmp / MODEL_YAML).write_text(yaml.safe_dump(dict(model_config), sort_keys=False))
    tokenizer.save(tmp)

    manifest = {
        "stage": stage,
        "step": step,
        "parent": parent.lineage() if parent is not None else None,
        "files": files,
        "tokenizer_sha256": tokenizer.content_hash(),
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "palmrl_version": palmrl.__version__,
        "torch_version": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    readable_by_umask(tmp)

    # swap in: an existing folder of the same name (a re-saved final/) is replaced only now
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def readable_by_umask(folder: Path) -> None:
    """safetensors writes its files 0600; give every file the mode the user's umask asks for, like
    the JSON/YAML files beside it (a shared machine's readers need the weights too)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def prune_steps(stage_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders (final/ is never touched); 0 keeps all."""
    if keep_last <= 0:
        return
    steps = sorted(p for p in Path(stage_dir).glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
