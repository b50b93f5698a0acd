"""Measuring an assistant on the embedded tasks: the checker's accuracy and format-following rate.

The same numbers gate every stage (SFT above pretrain, PPO above SFT), so they are computed one way:
chat-template prompts, batched KV-cache generation, `palmrl.tasks.check` on the cleaned response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from palmrl import tasks
from palmrl.data.chat import clean_response, prompt_tokens
from palmrl.generate import generate_responses, model_device, seeded_generator


class Responses(NamedTuple):
    texts: list[str]          # cleaned responses, one per prompt
    well_formed: list[bool]   # ended with eos before any template token
    lengths: list[int]        # generated tokens, eos included


class TaskScore(NamedTuple):
    accuracy: float           # mean checker score (exact match) over the prompts
    format_rate: float        # share of responses that ended properly
    mean_length: float        # generated tokens per response
    samples: list[dict]       # the first few (prompt, response, score) for reports


def respond(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> Responses:
    """Chat-template responses to plain-text prompts (greedy by default)."""
    responses = generate_responses(model, [prompt_tokens(tokenizer, p) for p in prompts], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                   generator=seeded_generator(seed, model_device(model)))
    texts, flags, lengths = [], [], []
    for ids in responses:
        text, ok = clean_response(tokenizer, ids)
        texts.append(text)
        flags.append(ok)
        lengths.append(len(ids))
    return Responses(texts, flags, lengths)


def task_score(model, tokenizer, examples: Sequence[tasks.TaskExample], *, max_new_tokens: int = 24,
               batch_size: int = 64, keep_samples: int = 8) -> TaskScore:
    prompts = [ex.prompt for ex in examples]
    out = respond(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = tasks.checker(prompts, out.texts)
    n = max(1, len(prompts))
    samples = [{"prompt": p, "response": r, "score": s} for p, r, s in zip(prompts, out.texts, scores)][:keep_samples]
    return TaskScore(accuracy=sum(scores) / n, format_rate=sum(out.well_formed) / n,
                     mean_length=sum(out.lengths) / n, samples=samples)


class Sampled(NamedTuple):
    reward: float      # mean checker score of the samples: the expected true reward
    behaviour: float   # share of the samples closing their answer with the courteous line (tasks.behaviour)


def sampled_scores(model, tokenizer, examples: Sequence[tasks.TaskExample], *, samples: int = 2,
                   temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 0) -> Sampled:
    """The policy's expected true reward and behaviour rate over `samples` samples per prompt.

    This is what RL maximises (greedy accuracy only moves once the argmax flips), so it is the
    number that says whether RL helped.
    """
    prompts = [ex.prompt for ex in examples for _ in range(samples)]
    out = respond(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    n = max(1, len(prompts))
    return Sampled(sum(tasks.checker(prompts, out.texts)) / n, sum(tasks.behaviour(prompts, out.texts)) / n)


def sampled_reward(model, tokenizer, examples: Sequence[tasks.TaskExample], *, samples: int = 2,
                   temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 0) -> float:
    """The mean checker score of `samples` samples per prompt (`sampled_scores(...).reward`)."""
    return sampled_scores(model, tokenizer, examples, samples=samples, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed).reward
