"""Self-describing checkpoint folders (docs/checkpoints.md), written atomically, loaded without unpickling.

    runs/<run>/<stage>/step-000200/   model.safetensors   consolidated weights (fp32, every ZeRO stage)
                       final/         adapters.safetensors LoRA scopes when not merged (optional)
                                      model.yaml          ModelConfig fields
                                      tokenizer.model     (or tokenizer.json for the byte tokenizer)
                                      manifest.json       stage, step, parent, config, metrics, hashes

A folder is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks valid. Loading checks the manifest's sha256 of every weight file.

Models come back from a folder here too: `model_from_checkpoint` (LoRA scopes attached as saved),
`policy_from_checkpoint` (scopes merged), and `load_source` for a Hugging Face model folder or hub
name, the starting point of `model=hf` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import palmrl
from palmrl.errors import UserError
from palmrl.io import quiet_transformers, readable_by_umask, sha256_file, sha256_files, transformers
from palmrl.model.hf import HFCausalLM, HFConfig
from palmrl.model.lora import LoRAConfig, add_lora, load_lora_state_dict, merge_lora, set_lora_scope
from palmrl.model.registry import build_model, check_vocab, config_from_dict
from palmrl.tokenizer import HEADERS_TEMPLATE, HFTokenizer, Tokenizer

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"
MODEL_YAML = "model.yaml"


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
    trust_remote_code: bool = False  # the user's consent (trust_remote_code=true), never the folder's

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def model_config(self) -> dict:
        """model.yaml, read only after its sha256 matched the manifest's (load checks it)."""
        try:
            config = yaml.safe_load(self._verified(MODEL_YAML).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"checkpoint {self.path}: unreadable {MODEL_YAML} ({str(err).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise UserError(f"checkpoint {self.path}: {MODEL_YAML} is not a mapping of model settings")
        return config

    def tokenizer(self):
        tokenizer = Tokenizer.load(self.path)
        expected = self.manifest.get("tokenizer_sha256")
        if not expected:
            raise UserError(f"checkpoint {self.path}: {MANIFEST} has no tokenizer_sha256, so its tokenizer "
                            f"cannot be checked (a palmrl checkpoint always records it)")
        if tokenizer.content_hash() != expected:
            raise UserError(f"checkpoint {self.path}: its tokenizer does not match tokenizer_sha256 in {MANIFEST}")
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
            raise UserError(f"checkpoint {self.path}: {name} does not match its sha256 in {MANIFEST} "
                            f"(corrupt or tampered)")
        return file

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight of the model: model.safetensors, over its frozen base's when it has one."""
        try:
            own = load_file(self._verified(WEIGHTS))
        except SafetensorError as err:
            raise UserError(f"checkpoint {self.path}: unreadable {WEIGHTS}: {err}") from None
        base = self.base()
        return own if base is None else {**base.weights(), **own}

    def base(self, _depth: int = 0) -> Checkpoint | None:
        """The checkpoint whose weights this one's model.safetensors leaves out (`base` in the
        manifest: a LoRA run keeps only the tensors that differ from its parent's), checked by path
        and sha256; None when the folder holds all of its weights."""
        spec = self.manifest.get("base")
        if not spec:
            return None
        if _depth > 16:
            raise UserError(f"checkpoint {self.path}: its chain of base checkpoints is longer than 16")
        where = f"checkpoint {self.path}: its frozen base {spec.get('path')}"
        try:
            base = load(spec["path"], key="base")
        except (UserError, KeyError, TypeError) as err:
            raise UserError(f"{where} cannot be opened ({err}); a LoRA checkpoint keeps only what differs "
                            f"from its base, so that folder must stay where it was") from None
        if base.content_hash != spec.get("sha256"):
            raise UserError(f"{where} has changed since (sha256 {base.content_hash[:12]}…, expected "
                            f"{str(spec.get('sha256'))[:12]}…)")
        base.base(_depth + 1)  # its own base, checked the same way
        return base

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape in model.safetensors (and its base's), from the headers alone (nothing
        loaded, not yet verified: `weights()` verifies); {} when a header is unreadable (`weights()` says why)."""
        own = self._header_shapes(WEIGHTS)
        spec = self.manifest.get("base")
        if not spec:
            return own
        try:
            base = load(spec["path"], key="base")
        except (UserError, KeyError, TypeError):
            return {}
        return {**base.weight_shapes(), **own}

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """As `weight_shapes`, for adapters.safetensors ({} without one)."""
        return self._header_shapes(ADAPTERS) if ADAPTERS in self.manifest.get("files", {}) else {}

    def _header_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        try:
            with safe_open(self.path / name, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError):
            return {}

    def adapters(self) -> dict[str, torch.Tensor]:
        if ADAPTERS not in self.manifest.get("files", {}):
            return {}
        try:
            return load_file(self._verified(ADAPTERS))
        except SafetensorError as err:
            raise UserError(f"checkpoint {self.path}: unreadable {ADAPTERS}: {err}") from None

    @property
    def content_hash(self) -> str:
        """The weights' identity: model.safetensors' sha256 alone for a folder that holds every weight
        and no adapters; otherwise a digest of it, adapters.safetensors' and the base's, so two LoRA
        checkpoints on one base never share an identity."""
        files = self.manifest.get("files", {})
        own, adapters, spec = files.get(WEIGHTS, ""), files.get(ADAPTERS), self.manifest.get("base")
        if not spec and not adapters:
            return own
        base = spec.get("sha256", "") if spec else ""
        return hashlib.sha256(f"{own}:{adapters or ''}:{base}".encode()).hexdigest()

    def short_name(self, sep: str = "/") -> str:
        """runs/<run>/<stage>/final -> "<run><sep><stage>"; a step folder keeps its step."""
        parts = self.path.resolve().parts
        return sep.join(parts[-3:-1] if parts[-1] == "final" else parts[-3:])

    def lineage(self) -> dict:
        return {"path": str(self.path.resolve()), "stage": self.stage, "step": self.manifest.get("step"),
                "sha256": self.content_hash}


# the manifest keys loading reads, and the types they must have (anything else is carried, not read)
MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "step": (int,), "files": (dict,), "tokenizer_sha256": (str,), "parent": (dict, type(None)),
    "lora": (dict, type(None)), "metrics": (dict,), "config": (dict,), "reward": (dict, type(None)),
    "base": (dict, type(None)),
}


def _check_manifest(manifest: dict, where: str) -> None:
    """Wrong types in a manifest are one line naming the key, not an AttributeError deep in a loader."""
    for name, types in MANIFEST_TYPES.items():
        if name in manifest and (not isinstance(manifest[name], types) or isinstance(manifest[name], bool)):
            raise UserError(f"{where}: '{name}' has the wrong type ({type(manifest[name]).__name__})")
    if not isinstance(manifest.get("files"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise UserError(f"{where} has no 'files' table of sha256 digests")
    lora = manifest.get("lora") or {}
    scopes = lora.get("scopes", {})
    if not isinstance(scopes, dict) or not all(
            isinstance(spec, dict) and isinstance(spec.get("rank"), int) and isinstance(spec.get("alpha"), (int, float))
            and isinstance(spec.get("targets"), list) for spec in scopes.values()):
        raise UserError(f"{where}: 'lora.scopes' is not a table of rank/alpha/targets per scope")


def load(path: str | os.PathLike, *, key: str = "ckpt", stages: Iterable[str] | None = None,
         trust_remote_code: bool = False) -> Checkpoint:
    """Open a checkpoint folder: its manifest read, model.yaml verified against the manifest.
    `trust_remote_code` is the user's consent to run modelling code a Hugging Face-based checkpoint
    names (auto_map); nothing in the folder can give it."""
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
    _check_manifest(manifest, f"{key}: {folder / MANIFEST}")
    ckpt = Checkpoint(folder, manifest, trust_remote_code=bool(trust_remote_code))
    _ = ckpt.model_config  # verified and parsed before anything obeys it
    return ckpt


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
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    base = shared_base(parent, weights) if adapters else None
    if base is not None:  # a LoRA run: the frozen base stays in the parent, referenced by path + sha256
        weights = {k: v for k, v in weights.items() if k not in base[1]}
    save_file(weights, tmp / WEIGHTS)
    files[WEIGHTS] = sha256_file(tmp / WEIGHTS)
    if adapters:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, tmp / ADAPTERS)
        files[ADAPTERS] = sha256_file(tmp / ADAPTERS)
    (tmp / MODEL_YAML).write_text(yaml.safe_dump(dict(model_config), sort_keys=False))
    files[MODEL_YAML] = sha256_file(tmp / MODEL_YAML)  # loading obeys model.yaml: it is verified like the weights
    tokenizer.save(tmp)

    manifest = {
        "stage": stage,
        "step": step,
        "parent": parent.lineage() if parent is not None else None,
        "base": None if base is None else {"path": str(base[0].path.resolve()), "sha256": base[0].content_hash,
                                           "tensors": len(base[1])},
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


def shared_base(parent: Checkpoint | None, weights: Mapping[str, torch.Tensor]) -> tuple[Checkpoint, set[str]] | None:
    """(parent, the names of the tensors it already holds bit for bit) when a checkpoint can leave
    them out; None when it shares none (or has no palmrl parent, e.g. a Hugging Face source). The
    parent's tensors are read one at a time (memory-mapped), never all at once."""
    if parent is None or WEIGHTS not in parent.manifest.get("files", {}):
        return None
    chain, ckpt = [], parent
    while ckpt is not None:
        chain.append(ckpt)
        ckpt = ckpt.base()
    where: dict[str, Path] = {}
    for ckpt in reversed(chain):  # the base first: a child's own tensors take precedence
        where.update({name: ckpt.path / WEIGHTS for name in ckpt._header_shapes(WEIGHTS)})
    same = set()
    for file in set(where.values()):
        with safe_open(file, framework="pt") as f:
            for name in (n for n, w in where.items() if w == file and n in weights):
                theirs, ours = f.get_tensor(name), weights[name]
                if theirs.dtype == ours.dtype and theirs.shape == ours.shape and torch.equal(theirs, ours):
                    same.add(name)
    return (parent, same) if same else None


def prune_steps(stage_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders (final/ is never touched); 0 keeps all."""
    if keep_last <= 0:
        return
    steps = sorted(p for p in Path(stage_dir).glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# models from checkpoints and from Hugging Face sources


def load_trunk_weights(model, weights: Mapping[str, torch.Tensor], *, where: str) -> None:
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


def attach_adapters(model, ckpt: Checkpoint) -> list[str]:
    """Recreate the LoRA scopes recorded in the manifest and load their tensors; returns the scopes."""
    lora = ckpt.manifest.get("lora") or {}
    scopes = lora.get("scopes", {})
    if not scopes:
        return []
    shapes = ckpt.adapter_shapes()
    for scope, spec in scopes.items():
        # the recorded rank against the saved adapters, before any are allocated (an edited manifest)
        saved = {shape[0] for name, shape in shapes.items() if name.endswith(f".lora_A.{scope}")}
        if shapes and saved != {int(spec["rank"])}:
            raise UserError(f"checkpoint {ckpt.path}: the manifest gives LoRA scope '{scope}' rank {spec['rank']} but "
                            f"{ADAPTERS} holds rank {', '.join(map(str, sorted(saved))) or 'none'}")
        add_lora(model, scope, LoRAConfig(rank=int(spec["rank"]), alpha=float(spec["alpha"]),
                                          dropout=0.0, targets=tuple(spec["targets"])))
    load_lora_state_dict(model, ckpt.adapters())
    set_lora_scope(model, lora.get("active"))
    return list(scopes)


def model_from_checkpoint(ckpt: Checkpoint, *, adapters: bool = True):
    """The model (PaLM or HF) a checkpoint describes, with its LoRA adapters attached (active scope as saved)."""
    config = config_from_dict(ckpt.model_config)
    if getattr(config, "family", None) == "hf" and needs_remote_code(config) and not ckpt.trust_remote_code:
        raise UserError(f"checkpoint {ckpt.path}: its model needs its own modelling code (auto_map); palmrl "
                        f"runs it only when you pass trust_remote_code=true on the command line")
    if getattr(config, "family", None) != "hf":
        check_fits_weights(config, ckpt.weight_shapes(), where=str(ckpt.path))
    model = build_model(config, trust_remote_code=ckpt.trust_remote_code)
    load_trunk_weights(model, ckpt.weights(), where=str(ckpt.path))
    if adapters:
        attach_adapters(model, ckpt)
    return model


def check_fits_weights(config, shapes: Mapping[str, tuple[int, ...]], *, where: str) -> None:
    """A PaLM model.yaml against its weights' shapes, before the model is allocated: a model.yaml whose
    sizes were edited (depth 10**9, a huge dim) is refused instead of exhausting memory. The model is
    built on the meta device (shapes, no storage) once its depth is known to match the file's."""
    if not shapes:
        return
    layers = {name.split(".")[1] for name in shapes if name.startswith("layers.")}
    if config.depth != len(layers):
        raise UserError(f"{where}: model.yaml says depth {config.depth} but {WEIGHTS} holds {len(layers)} layers")
    embedding = shapes.get("token_emb.weight")
    if embedding is not None and embedding != (config.vocab_size, config.dim):
        raise UserError(f"{where}: model.yaml says vocab_size {config.vocab_size} and dim {config.dim} but the token "
                        f"embedding in {WEIGHTS} is {embedding[0]} x {embedding[1]}")
    try:
        with torch.device("meta"):
            model = build_model(config)
    except (RuntimeError, ValueError, OverflowError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{where}: model.yaml describes no model that can be built: {reason}") from None
    for name, param in model.named_parameters():
        if name in shapes and tuple(param.shape) != shapes[name]:
            raise UserError(f"{where}: tensor '{name}' has shape {shapes[name]}, the model in model.yaml "
                            f"expects {tuple(param.shape)}")


def needs_remote_code(config) -> bool:
    """An HF architecture transformers does not ship: its config names code to import (auto_map)."""
    return bool(config.hf_config.get("auto_map")) or bool(config.source.get("trust_remote_code"))


def policy_from_checkpoint(ckpt: Checkpoint):
    """The checkpoint's policy as one plain model: any LoRA scopes it carries merged into the base."""
    model = model_from_checkpoint(ckpt)
    for scope in (ckpt.manifest.get("lora") or {}).get("scopes", {}):
        merge_lora(model, scope)
    return model, config_from_dict(ckpt.model_config)


def _source_weights_sha256(folder: Path) -> str:
    """One digest over an HF source folder's weight files (recorded in the manifest as hf_source)."""
    return sha256_files(sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")))


def export_split(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Gathered module state → (model.safetensors tensors, adapters.safetensors tensors)."""
    weights = {k: v for k, v in state.items() if "lora_" not in k}
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    return weights, adapters


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_source(model_cfg: Mapping) -> tuple[HFCausalLM, HFTokenizer]:
    """`model=hf`: the causal LM and tokenizer at model.path (a local folder, or a hub name when the
    hub is reachable), in fp32. Remote code runs only with model.trust_remote_code=true."""
    tf = transformers()
    path = model_cfg.get("path")
    if not path:
        raise UserError("model.path: set it to an HF model folder or hub name (model=hf model.path=gpt2)")
    path, revision = str(path), model_cfg.get("revision")
    trust = bool(model_cfg.get("trust_remote_code", False))
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"model.path: {local} is not a Hugging Face model folder (no config.json)")
    if not local.exists() and (path.startswith(("/", ".", "~")) or os.sep in path and path.count("/") > 1):
        raise UserError(f"model.path: no such folder: {local}")
    where = str(local) if local.exists() else path
    remote_code = "needs its own code to load; palmrl runs it only with model.trust_remote_code=true"
    if local.is_dir():
        try:
            declared = json.loads((local / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"model.path: {local / 'config.json'} is not valid JSON ({err})") from None
        if not trust and isinstance(declared, dict) and "auto_map" in declared:
            raise UserError(f"model.path: {where} {remote_code}")
    try:
        hf_config = tf.AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust)
    except ValueError as err:
        message = str(err).splitlines()[0]
        if "trust_remote_code" in message or "custom code" in message:
            raise UserError(f"model.path: {where} {remote_code}") from None
        raise UserError(f"model.path: {where}: {message[:200]}") from None
    except OSError as err:
        raise UserError(f"model.path: {where} is neither a local HF model folder nor a reachable hub model "
                        f"({str(err).splitlines()[0][:160]})") from None
    causal = getattr(tf, "MODEL_FOR_CAUSAL_LM_MAPPING", {})
    if type(hf_config) not in causal and not trust:
        raise UserError(f"model.path: {where} is a {hf_config.model_type!r} model, not a causal LM "
                        f"(AutoModelForCausalLM cannot load it)")
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        # transformers would make an empty tokenizer of the model's type and carry on
        raise UserError(f"model.path: {local} has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])}); save the "
                        f"model's tokenizer into it: AutoTokenizer.from_pretrained(...).save_pretrained('{local}')")
    tokenizer = HFTokenizer.load(where, trust_remote_code=trust, revision=revision)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:  # safetensors, or a pytorch_model.bin through torch's weights-only unpickler: no code runs
            model = tf.AutoModelForCausalLM.from_pretrained(where, revision=revision, trust_remote_code=trust,
                                                            dtype=torch.float32, weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"model.path: {where}: its pytorch_model.bin holds more than tensors (a pickle that "
                            f"would run code); palmrl refused it") from None
        except (OSError, ValueError) as err:
            raise UserError(f"model.path: could not load {where} ({str(err).splitlines()[0][:160]})") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise UserError(f"model.path: the tokenizer of {where} has {tokenizer.vocab_size} ids but the model's "
                        f"embedding has only {vocab} rows: tokenizer and model do not match")
    source = {"path": path, "revision": revision or getattr(hf_config, "_commit_hash", None),
              "sha256": _source_weights_sha256(local) if local.is_dir() else None,
              "model_type": hf_config.model_type, "trust_remote_code": trust}
    config = HFConfig(hf_config=model.config.to_dict(), source=source)
    return HFCausalLM(model, config), tokenizer


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
