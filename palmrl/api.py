"""palmrl from Python (notebooks, scripts, other tools): load a checkpoint and generate, score or
compute log-probabilities; run any stage in this process with the CLI's own Hydra composition.

    import palmrl

    policy = palmrl.load("runs/default/sft")
    policy.generate("What is the capital of France?", max_new_tokens=16, temperature=0)
    policy.logprobs(["What is 2 + 2?"], ["4"])                  # log p(response | prompt), summed
    rm = palmrl.load("runs/default/reward")
    rm.score(["What is 2 + 2?"] * 2, ["4", "5"])                # reward model scores
    ckpt = palmrl.run("sft", ["init_from=runs/default/pretrain", "run_name=nb", "train.max_steps=50"])

docs/api.md is the page (its example runs in the test suite). Everything here is what the stages
use themselves: `checkpoint.load` (hash-checked, never unpickles), the decode loop of
`palmrl.generate`, the chat template of `palmrl.data.chat`, the reward model of `palmrl.reward`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from palmrl import checkpoint
from palmrl.data.chat import as_messages, clean_response, render_chat, render_prompt
from palmrl.errors import UserError
from palmrl.generate import generate_responses, model_device, prepare_decoding, seeded_generator
from palmrl.rl.logprobs import token_logprobs
from palmrl.runtime import inference_placement


class LLM:
    """A loaded checkpoint: a policy (pretrain, sft, ppo, grpo, dpo, HF-based) or a reward model.

    Attributes: `checkpoint` (palmrl.checkpoint.Checkpoint: stage, manifest, lineage), `tokenizer`,
    `model` (torch module, eval mode), `chat` (whether prompts get the chat template: every stage
    but pretrain), `device`.
    """

    def __init__(self, ckpt: checkpoint.Checkpoint, *, device: str = "auto", precision: str = "auto",
                 chat: bool | None = None, decode_weights: str = "fp32"):
        self.checkpoint = ckpt
        self.tokenizer = ckpt.tokenizer()
        self.device, dtype = inference_placement(device, precision)
        self.is_reward = ckpt.stage == "reward"
        if self.is_reward:
            from palmrl.reward import reward_model_from_checkpoint

            self.model = reward_model_from_checkpoint(ckpt).to(self.device)  # scores stay fp32
        else:
            self.model = checkpoint.model_from_checkpoint(ckpt).eval().to(device=self.device, dtype=dtype)
            prepare_decoding(self.model, decode_weights)
        self.decode_weights = str(decode_weights)
        self.chat = ckpt.stage != "pretrain" if chat is None else bool(chat)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
             chat: bool | None = None, trust_remote_code: bool = False, decode_weights: str = "fp32") -> LLM:
        """A checkpoint folder (a stage folder resolves to final/, or a step folder): weights checked
        against the manifest's sha256, nothing unpickled. device: auto | cpu | cuda[:N]; precision:
        auto (bf16 on a GPU that has it) | fp32 | bf16; decode_weights: fp32 | fp16 (CPU decoding
        through fp16 weight copies: faster, tokens may differ)."""
        return cls(checkpoint.load(path, trust_remote_code=trust_remote_code), device=device, precision=precision,
                   chat=chat, decode_weights=decode_weights)

    def __repr__(self) -> str:
        return (f"palmrl.LLM({str(self.checkpoint.path)!r}, stage={self.checkpoint.stage!r}, "
                f"parameters={sum(p.numel() for p in self.model.parameters()):,}, device={str(self.device)!r})")

    # prompts

    def _prompt_ids(self, prompt: str | Sequence[dict]) -> list[int]:
        if self.chat:  # a string is one user turn; a message list is a conversation so far
            return render_prompt(self.tokenizer, as_messages(prompt))
        if not isinstance(prompt, str):
            raise UserError("a pretrain checkpoint continues text: give prompts as strings")
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def _policy(self, what: str) -> None:
        if self.is_reward:
            raise UserError(f"{what}: {self.checkpoint.path} is a reward checkpoint; load a policy "
                            f"(pretrain, sft, ppo, grpo, dpo) to {what}, or call score()")

    # the three things a checkpoint does

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                 batch_size: int = 16) -> str | list[str] | list[list[str]]:
        """Sample replies. A string prompt returns a string (a list of `num_samples` strings when
        num_samples > 1); a list of prompts returns one entry per prompt in the same shape.
        temperature 0 is greedy; `seed` makes the call reproducible."""
        self._policy("generate")
        if num_samples < 1 or max_new_tokens < 1:
            raise UserError(f"num_samples and max_new_tokens must be positive, got {num_samples}, {max_new_tokens}")
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        ids = [self._prompt_ids(p) for p in batch for _ in range(num_samples)]
        replies = generate_responses(self.model, ids, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                     generator=seeded_generator(seed, model_device(self.model)),
                                     decode_weights=self.decode_weights)
        texts = [clean_response(self.tokenizer, r)[0] for r in replies]
        grouped = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(batch))]
        out = [g[0] if num_samples == 1 else g for g in grouped]
        return out[0] if single else out

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[str], responses: Sequence[str], *,
                 per_token: bool = False) -> list[float] | list[list[float]]:
        """log p(response | prompt) under the model, summed over the response's tokens (with the
        chat template: its closing eos too, as the RL stages count it); `per_token=True` gives each
        token's log-probability instead."""
        self._policy("logprobs")
        if len(prompts) != len(responses):
            raise UserError(f"logprobs: {len(prompts)} prompts but {len(responses)} responses")
        out = []
        for prompt, response in zip(prompts, responses):
            tokens, mask = self._scored_ids(prompt, response)
            t = torch.tensor([tokens], device=model_device(self.model))
            logits = self.model(t)
            lp = token_logprobs(logits[:, :-1], t[:, 1:])[0]
            picked = [float(v) for v, keep in zip(lp.tolist(), mask[1:]) if keep]
            out.append(picked if per_token else sum(picked))
        return out

    def _scored_ids(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        if self.chat:
            rendered = render_chat(self.tokenizer, [*as_messages(prompt), {"role": "assistant", "content": response}])
            tokens, mask = rendered.tokens, list(rendered.loss_mask)
            # only the last reply counts (earlier assistant turns of a conversation are context)
            last = max(i for i, keep in enumerate(mask) if keep)
            first = last
            while first > 0 and mask[first - 1]:
                first -= 1
            mask = [first <= i <= last for i in range(len(mask))]
        else:
            head = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
            tail = self.tokenizer.encode(response)
            tokens, mask = head + tail, [False] * len(head) + [True] * len(tail)
        if len(tokens) > self.model.config.max_seq_len:
            raise UserError(f"logprobs: prompt + response is {len(tokens)} tokens, over the model's context of "
                            f"{self.model.config.max_seq_len}")
        return tokens, mask

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, normalise: bool = False) -> list[float]:
        """Reward model scores of (prompt, response) pairs (higher is better); `normalise` maps them
        to the training scores' mean 0 and std 1, as PPO sees them."""
        if not self.is_reward:
            raise UserError(f"score: {self.checkpoint.path} is a {self.checkpoint.stage} checkpoint; "
                            f"score() needs a reward checkpoint (palmrl reward)")
        if len(prompts) != len(responses):
            raise UserError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        from palmrl.model.registry import config_from_dict
        from palmrl.reward import score_texts

        max_len = int(config_from_dict(self.checkpoint.model_config).max_seq_len)
        scores = score_texts(self.model, self.tokenizer, list(prompts), list(responses), max_len=max_len,
                             normalise=normalise)
        return [float(s) for s in scores.tolist()]


def load(path: str | os.PathLike, **kwargs) -> LLM:
    """`LLM.load`: a checkpoint ready to generate, score or compute log-probs."""
    return LLM.load(path, **kwargs)


def run(stage: str, overrides: Sequence[str] = ()) -> Path:
    """Run a stage in this process, composed exactly as `palmrl <stage> overrides...` composes it
    (configs/<stage>.yaml + the overrides); returns what the stage returns: the final checkpoint
    folder of a training stage, the run folder of `pipeline`. Errors are palmrl.UserError with the
    CLI's one-line message."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from palmrl.cli import STAGES, _hydra_error_line, stage_runner
    from palmrl.config import CONFIG_DIR
    from palmrl.runtime import run_stage

    if stage not in STAGES or stage == "serve":
        raise UserError(f"unknown stage '{stage}' for palmrl.run; choose one of: "
                        f"{', '.join(s for s in STAGES if s != 'serve')}")
    overrides = [str(o) for o in overrides]
    runner = stage_runner(stage)
    if stage == "pipeline":
        import functools

        from palmrl.stages.pipeline import route_overrides

        overrides, routed = route_overrides(overrides)
        runner = functools.partial(runner, routed=routed)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name=stage):
            cfg = compose(config_name=stage, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(_hydra_error_line(err)) from None
    result = run_stage(stage, cfg, runner)
    return Path(result) if result is not None else None
