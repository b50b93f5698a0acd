"""`palmrl sample`: generate from any checkpoint by path, batched with the KV cache.

Prompts come from `prompt=`, a `prompt_file=` (one per line, or .jsonl with a "prompt" field) or
stdin. Chat checkpoints (sft, reward, ppo) get the chat template; pretrain checkpoints continue raw
text. Output is plain text or one JSON object per sample.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.errors import UserError
from palmrl.generate import generate_responses, model_device, prepare_decoding, seeded_generator
from palmrl.io import check_output_file, read_jsonl, write_atomic
from palmrl.model.registry import config_from_dict
from palmrl.runtime import inference_placement, seed_everything

BATCH = 32  # prompts decoded together


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    if cfg.prompt_file is not None:
        path = Path(str(cfg.prompt_file))
        if path.suffix == ".jsonl":  # io's reader: file:line for bad JSON, non-objects, deep nesting, bad bytes
            prompts = []
            for number, record in read_jsonl(path, key="prompt_file"):
                if not isinstance(record.get("prompt"), str):
                    raise UserError(f"{path}:{number}: expected a JSON object with a \"prompt\" string")
                prompts.append(record["prompt"])
        else:
            if not path.is_file():
                raise UserError(f"prompt_file: no such file: {path}")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                line = path.read_bytes()[:err.start].count(b"\n") + 1
                raise UserError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x})") from None
            prompts = [line for line in lines if line.strip()]
    elif not sys.stdin.isatty():
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    else:
        raise UserError("prompt: give prompt=\"...\", prompt_file=..., or pipe prompts on stdin")
    if not prompts:
        raise UserError("prompt: no prompts given (empty file or stdin)")
    return prompts


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        from palmrl.data.chat import prompt_tokens

        return prompt_tokens(tokenizer, text)
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def decode_response(tokenizer, ids: list[int]) -> tuple[str, bool]:
    from palmrl.data.chat import clean_response

    return clean_response(tokenizer, ids)


def run(cfg: DictConfig) -> Path | None:
    seed_everything(int(cfg.seed))
    # the cheap checks first: settings, the output file, the prompts; then the checkpoint and the model
    if cfg.best_of_n and not cfg.reward:
        raise UserError("best_of_n=true needs reward=<a reward checkpoint> to pick the best sample")
    n = int(cfg.num_samples)
    if n <= 0:
        raise UserError(f"num_samples must be positive, got {n}")
    if int(cfg.max_new_tokens) <= 0:
        raise UserError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    check_output(cfg)
    prompts = read_prompts(cfg)
    ckpt = checkpoint.load(cfg.ckpt, key="ckpt", trust_remote_code=bool(cfg.trust_remote_code))
    tokenizer = ckpt.tokenizer()
    device, dtype = inference_placement(str(cfg.device), str(cfg.precision))
    model = checkpoint.model_from_checkpoint(ckpt).to(device=device, dtype=dtype)
    decode_weights = prepare_decoding(model, str(cfg.decode_weights))
    chat = ckpt.stage != "pretrain" if str(cfg.chat) == "auto" else bool(cfg.chat)

    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    start = time.perf_counter()
    responses = generate_responses(model, [encode_prompt(tokenizer, p, chat) for _, p in jobs], batch_size=BATCH,
                                   max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                                   top_k=int(cfg.top_k), top_p=float(cfg.top_p),
                                   eos_id=None if cfg.ignore_eos else tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                   generator=seeded_generator(int(cfg.seed), model_device(model)),
                                   decode_weights=decode_weights)
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in responses)
    print(f"sample: {len(responses)} responses, {tokens:,} tokens in {seconds:.2f} s: "
          f"{tokens / max(seconds, 1e-9):,.0f} tokens/s ({device.type}, {str(dtype).removeprefix('torch.')}, "
          f"{'fp16 decode weights, ' if decode_weights == 'fp16' and device.type == 'cpu' else ''}"
          f"up to {BATCH} rows per batch)",
          file=sys.stderr, flush=True)
    records = []
    for (index, prompt), ids in zip(jobs, responses):
        text, well_formed = decode_response(tokenizer, ids)
        records.append({"prompt_index": index, "prompt": prompt, "response": text,
                        "tokens": len(ids), "ended": well_formed, "chat": chat})
    if cfg.reward:
        records = score_records(cfg, ckpt, records, device)
    write_records(cfg, records)
    return None


def score_records(cfg: DictConfig, policy: checkpoint.Checkpoint, records: list[dict],
                  device: torch.device) -> list[dict]:
    """Score every response with a reward model; with best_of_n keep each prompt's best."""
    from palmrl.reward import reward_model_from_checkpoint, score_texts

    rm_ckpt = checkpoint.load(cfg.reward, key="reward", stages=["reward"],
                              trust_remote_code=bool(cfg.trust_remote_code))
    if rm_ckpt.manifest.get("tokenizer_sha256") != policy.manifest.get("tokenizer_sha256"):
        raise UserError(f"reward: {rm_ckpt.path} uses a different tokenizer than {policy.path}")
    rm = reward_model_from_checkpoint(rm_ckpt).to(device)  # scores in fp32: they rank close samples
    max_len = config_from_dict(rm_ckpt.model_config).max_seq_len
    scores = score_texts(rm, rm_ckpt.tokenizer(), [r["prompt"] for r in records], [r["response"] for r in records],
                         max_len=max_len)
    for rec, value in zip(records, scores.tolist()):
        rec["score"] = value
    if not cfg.best_of_n:
        return records
    best: dict[int, dict] = {}
    for rec in records:
        group = best.setdefault(rec["prompt_index"], {**rec, "all_scores": []})
        group["all_scores"].append(rec["score"])
        if rec["score"] > group["score"]:
            best[rec["prompt_index"]] = {**rec, "all_scores": group["all_scores"]}
    return [best[i] for i in sorted(best)]


def check_output(cfg: DictConfig) -> None:
    """Before any model is loaded: the format is known and output= is a file palmrl may write."""
    if cfg.format not in ("text", "jsonl"):
        raise UserError(f"format must be text or jsonl, got '{cfg.format}'")
    if cfg.output:
        inputs = [str(x) for x in (cfg.prompt_file, cfg.ckpt, cfg.reward) if x]
        check_output_file(str(cfg.output), key="output", inputs=inputs)


def write_records(cfg: DictConfig, records: list[dict]) -> None:
    """The records as text or JSON lines, to stdout or (atomically) to output=."""
    lines = []
    for rec in records:
        if cfg.format == "jsonl":
            lines.append(json.dumps(rec) + "\n")
        else:
            score = f" [score {rec['score']:.3f}]" if "score" in rec else ""
            sep = "\n→ " if rec.get("chat") else ""
            lines.append(f"### prompt {rec['prompt_index']}{score}\n{rec['prompt']}{sep}{rec['response']}\n\n")
    if cfg.output:
        write_atomic(Path(str(cfg.output)), "".join(lines))
    else:
        sys.stdout.write("".join(lines))
