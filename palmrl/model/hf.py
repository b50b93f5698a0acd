"""Any Hugging Face causal LM as the base of sft, reward, ppo and sample (`model=hf model.path=...`).

`HFCausalLM` wraps a `transformers` AutoModelForCausalLM behind the interface the stages use from
PaLM: `trunk(tokens, attention_mask, cache)` → final-normed hidden states, `logits(hidden)`,
`forward(...)` → logits, `new_cache(B, max_len)` for batched generation through the model's own
KV cache, and `config` with `dim`, `vocab_size`, `max_seq_len`. Left-padded batches get position
ids from the attention mask, so ragged prompts decode as they would alone.

Dropout is switched off (see HFCausalLM). GPT-2-style `Conv1D` projections are turned into `nn.Linear` once (a transpose) when the model is
built, so palmrl's LoRA scopes, merging and ZeRO sharding treat every family alike; `export_hf`
transposes them back and writes a standard `save_pretrained` folder.

`HFTokenizer` wraps the model's fast tokenizer behind palmrl's Tokenizer interface. The chat
template is the tokenizer's own when it has one (rendered incrementally so the SFT loss covers
exactly the assistant turns); otherwise palmrl's template is written out as plain-text headers
(`### User:` ... `### Assistant:`), each reply closed by eos.

Nothing runs remote code unless `model.trust_remote_code=true`; checkpoints made from an HF model
store weights in safetensors and the tokenizer as JSON files, and record the source (path or hub
name, revision, sha256 of its weight files) in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from palmrl.errors import UserError

FAMILY = "hf"
TOKENIZER_DIR = "hf_tokenizer"   # inside a palmrl checkpoint folder
HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
# the same format as a Jinja chat template, written into exported folders of template-less models
HEADERS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token }}"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - a dependency of palmrl
        raise UserError("model=hf needs the transformers package: pip install transformers") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


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
        tf = _transformers()
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
    def new_cache(self, batch_size: int, max_len: int, **_) -> HFCache:
        tf = _transformers()
        return HFCache(tf.DynamicCache(), torch.zeros(batch_size, 0, dtype=torch.long, device=self._device()))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def trunk(self, tokens: Tensor, *, attention_mask: Tensor | None = None, cache: HFCache | None = None) -> Tensor:
        """Final-normed hidden states (B, T, D) of `tokens`; with a cache, only the new tokens."""
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

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None, cache: HFCache | None = None) -> Tensor:
        return self.logits(self.trunk(tokens, attention_mask=attention_mask, cache=cache))

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

    def select(self, index: Tensor) -> HFCache:  # pragma: no cover - beam search is not used
        raise NotImplementedError("HF caches are not reordered by palmrl")


# ---------------------------------------------------------------------------------------------
# tokenizer


class HFTokenizer:
    """A transformers fast tokenizer behind palmrl's Tokenizer interface."""

    kind = "hf"

    def __init__(self, tokenizer, *, origin: str):
        self.tk = tokenizer
        self.origin = origin
        if tokenizer.eos_token_id is None:
            raise UserError(f"{origin}: the tokenizer has no eos token; palmrl needs one to end replies")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.origin}, {self.vocab_size} ids, chat template: {self.has_template})"

    @classmethod
    def load(cls, folder: str | os.PathLike, *, trust_remote_code: bool = False, revision: str | None = None) -> HFTokenizer:
        tf = _transformers()
        try:
            tk = tf.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{folder}: no usable tokenizer ({str(err).splitlines()[0][:160]})") from None
        if not getattr(tk, "is_fast", False):
            raise UserError(f"{folder}: palmrl needs a fast tokenizer (tokenizer.json)")
        return cls(tk, origin=str(folder))

    # ---- text <-> ids ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tk(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a reply or start a new turn: every special token (eos, pad, template markers)."""
        return frozenset(int(i) for i in self.tk.all_special_ids) | {self.eos_id, self.pad_id}

    # ---- chat --------------------------------------------------------------------------
    def _template(self, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> list[int]:
        ids = self.tk.apply_chat_template([dict(m) for m in messages], tokenize=True,
                                          add_generation_prompt=generation_prompt)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids and the SFT loss mask (True on assistant replies and what closes them)."""
        if not self.has_template:
            tokens: list[int] = []
            mask: list[bool] = []
            for message in messages:
                head = self.encode(HEADERS[message["role"]])
                reply = message["role"] == "assistant"
                body = self.encode(message["content"]) + ([self.eos_id] if reply else [])
                tail = [] if reply else self.encode("\n\n")
                tokens += head + body + tail
                mask += [False] * len(head) + [reply] * len(body) + [False] * len(tail)
            return tokens, mask
        tokens, mask = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:i], generation_prompt=True)
            through = self._template(messages[: i + 1], generation_prompt=False)
            if through[: len(before)] != before or before[: len(tokens)] != tokens:
                raise UserError(f"{self.origin}: its chat template does not render conversations "
                                f"incrementally, so assistant turns cannot be masked")
            mask += [False] * (len(before) - len(tokens)) + [True] * (len(through) - len(before))
            tokens = through
        full = self._template(messages, generation_prompt=False) if messages else []
        mask += [False] * (len(full) - len(tokens))
        return full, mask

    def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_template:
            return self.render_chat(messages)[0] + self.encode(HEADERS["assistant"])
        return self._template(messages, generation_prompt=True)

    # ---- persistence -------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        target = Path(folder) / TOKENIZER_DIR
        self.tk.save_pretrained(str(target))
        return target

    def content_hash(self) -> str:
        """sha256 over what decides the encoding: the backend model, specials and chat template."""
        blob = json.dumps({"backend": json.loads(self.tk.backend_tokenizer.to_str()),
                           "special": {k: str(v) for k, v in sorted(self.tk.special_tokens_map.items())},
                           "template": getattr(self.tk, "chat_template", None)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# loading a source model, exporting a policy


def _weights_sha256(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def load_source(model_cfg: Mapping) -> tuple[HFCausalLM, HFTokenizer]:
    """`model=hf`: the causal LM and tokenizer at model.path (a local folder, or a hub name when the
    hub is reachable), in fp32. Remote code runs only with model.trust_remote_code=true."""
    tf = _transformers()
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
    tokenizer = HFTokenizer.load(where, trust_remote_code=trust, revision=revision)
    with _quiet():
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(where, revision=revision, trust_remote_code=trust,
                                                            dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise UserError(f"model.path: could not load {where} ({str(err).splitlines()[0][:160]})") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise UserError(f"model.path: the tokenizer of {where} has {tokenizer.vocab_size} ids but the model's "
                        f"embedding has only {vocab} rows: tokenizer and model do not match")
    source = {"path": path, "revision": revision or getattr(hf_config, "_commit_hash", None),
              "sha256": _weights_sha256(local) if local.is_dir() else None,
              "model_type": hf_config.model_type, "trust_remote_code": trust}
    config = HFConfig(hf_config=model.config.to_dict(), source=source)
    return HFCausalLM(model, config), tokenizer


@contextlib.contextmanager
def _quiet():
    import logging

    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger("transformers").setLevel(level)


def export_hf(model: HFCausalLM, tokenizer: HFTokenizer, folder: Path) -> Path:
    """Write `model` (LoRA already merged) as a standard HF folder: config, safetensors, tokenizer."""
    tf = _transformers()
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
    with _quiet():
        fresh.save_pretrained(str(folder), safe_serialization=True)
    if not tokenizer.has_template:  # the policy was trained on palmrl's header format: say so
        tokenizer.tk.chat_template = HEADERS_TEMPLATE
    tokenizer.tk.save_pretrained(str(folder))
    from palmrl.checkpoint import readable_by_umask

    readable_by_umask(folder)
    return folder
