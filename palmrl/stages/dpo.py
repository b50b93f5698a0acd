"""`palmrl dpo`: direct preference optimisation on preference pairs — no reward model, no sampling.

Losses (`dpo.loss`, the math in rl/losses.py `dpo_loss`): `sigmoid` (DPO, Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290; with `dpo.label_smoothing` the conservative variant), `ipo` (Azar
et al. 2023) and `simpo` (Meng et al. 2024: reference-free, length-normalised, target margin γ).

The data is what `palmrl reward` reads (data=prefs | my_prefs): a prompt, a chosen and a rejected
reply. The log-probability of a reply is the sum over its tokens (its eos included) given the
prompt. The reference is the starting policy: its log-probabilities are computed once per pair
before the first update (with LoRA: the frozen base with the adapters off; no second model is
built) and cached in the run folder (`dpo_reference.safetensors`, keyed by a digest of the pairs,
the policy checkpoint and max_len), so a resumed run reads them instead of a policy that has moved.

Measured at every evaluation on the held-out pairs: the loss, implicit-reward accuracy (β·log
π/π_ref of the chosen reply above the rejected one's) and margin, the chosen/rejected log-probs, and
the drift from the reference (mean log π − log π_ref of a reply). On the embedded tasks also what
PPO measures: greedy checker accuracy, sampled true reward and behaviour rate on held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from palmrl import rl, tasks
from palmrl.config import Invalid, typed
from palmrl.data.chat import as_messages, clean_response, render_chat, render_prompt
from palmrl.data.instructions import ShuffledBatches
from palmrl.data.preferences import PreferencePair, load_preference_pairs
from palmrl.engine import Hooks, Trainer
from palmrl.errors import UserError
from palmrl.evaluate import sampled_scores, task_score
from palmrl.generate import generate_responses, seeded_generator
from palmrl.io import write_atomic
from palmrl.model.lora import lora_scope
from palmrl.model.palm import paired_prefix
from palmrl.model.registry import apply_lora
from palmrl.rlhf import ACTOR, POLICY_STAGES, export_actor, load_reward_fn, prompt_text
from palmrl.runtime import init_distributed, seed_everything
from palmrl.stages.common import policy_source

REFERENCE_FILE = "dpo_reference.safetensors"
ROUNDS_DIR = "rounds"  # on_policy: each round's pairs and their reference log-probs, written before its first update


@dataclass(frozen=True)
class DPOConfig:
    """The `dpo:` section of configs/dpo.yaml, typed and checked once."""

    loss: str = "sigmoid"           # sigmoid (DPO) | ipo | simpo (reference-free)
    beta: float = 0.1               # DPO/IPO: strength of the pull towards the reference; SimPO: reward scale (~2)
    label_smoothing: float = 0.0    # conservative DPO: the share of labels assumed flipped
    simpo_gamma: float = 0.5        # SimPO's target margin
    sft_weight: float = 0.2         # + this × the chosen replies' NLL per token (Llama 3's 0.2; RPO): keeps them likely
    on_policy: bool = False         # iterative DPO: each round's pairs are the policy's own samples, ranked
    round_steps: int = 20           # optimizer steps per round (on_policy)
    round_prompts: int = 64         # prompts sampled per round (on_policy)
    samples: int = 4                # responses per prompt; the best and the worst make a pair (on_policy)
    temperature: float = 1.0        # sampling temperature of the rounds (on_policy)

    def __post_init__(self):
        if self.loss not in rl.DPO_LOSSES:
            raise Invalid("loss", f"must be one of {', '.join(rl.DPO_LOSSES)}, got '{self.loss}'")
        if self.beta <= 0:
            raise Invalid("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise Invalid("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        for key in ("simpo_gamma", "sft_weight", "temperature"):
            if getattr(self, key) < 0:
                raise Invalid(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("round_steps", "round_prompts"):
            if getattr(self, key) < 1:
                raise Invalid(key, f"must be >= 1, got {getattr(self, key)}")
        if self.samples < 2:
            raise Invalid("samples", f"must be >= 2 (a pair needs two replies), got {self.samples}")


@dataclass(frozen=True)
class DPOTrainSettings:
    """The dpo stage's own `train:` keys."""

    max_len: int          # tokens per prompt + reply; longer rows lose the start of the prompt
    eval_examples: int    # held-out task prompts for the checker (embedded tasks)
    max_new_tokens: int   # response budget when measuring on task prompts

    def __post_init__(self):
        for key in ("max_len", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise Invalid(key, f"must be positive, got {getattr(self, key)}")
        if self.eval_examples < 0:
            raise Invalid("eval_examples", f"must be >= 0, got {self.eval_examples}")


class PairTokens(NamedTuple):
    """Chosen rows then rejected rows, right-padded to one length: one forward for both halves."""

    tokens: Tensor          # (2B, T) long
    attention_mask: Tensor  # (2B, T) bool
    reply_mask: Tensor      # (2B, T) bool: the reply's tokens (eos included), the ones whose log-probs are summed
    lengths: Tensor         # (2B,) reply tokens per row


def reply_rows(tokenizer, prompt, reply: str, max_len: int) -> tuple[list[int], list[bool]]:
    """(tokens, reply mask) of prompt + reply; an over-long row keeps bos and its last max_len - 1 tokens."""
    messages = as_messages(prompt)
    tokens = render_chat(tokenizer, [*messages, {"role": "assistant", "content": reply}]).tokens
    start = len(render_prompt(tokenizer, messages))
    mask = [i >= start for i in range(len(tokens))]
    if len(tokens) > max_len:
        tokens, mask = [tokenizer.bos_id, *tokens[-(max_len - 1):]], [False, *mask[-(max_len - 1):]]
    return tokens, mask


class PairRows(NamedTuple):
    """A pair's chosen and rejected (tokens int32, reply mask bool), as `reply_rows` renders them."""

    chosen: tuple[Tensor, Tensor]
    rejected: tuple[Tensor, Tensor]


def pair_rows(tokenizer, pairs: list[PreferencePair], max_len: int) -> list[PairRows]:
    """Every pair rendered once: the stage does this before its first step (and once per on-policy
    round), not at every step and evaluation. Kept as small tensors, as the reward stage keeps its."""
    def row(prompt, reply: str) -> tuple[Tensor, Tensor]:
        tokens, mask = reply_rows(tokenizer, prompt, reply, max_len)
        return torch.tensor(tokens, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool)
    return [PairRows(row(p.prompt, p.chosen), row(p.prompt, p.rejected)) for p in pairs]


def collate(rows: list[PairRows], pad_id: int) -> PairTokens:
    rows = [r.chosen for r in rows] + [r.rejected for r in rows]
    T = max(len(tokens) for tokens, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.bool)
    reply = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (row, mask) in enumerate(rows):
        tokens[b, :len(row)] = row
        attention[b, :len(row)] = True
        reply[b, :len(row)] = mask
    return PairTokens(tokens, attention, reply, reply.sum(1))


class Policy(nn.Module):
    """The DeepSpeed engine's module: the summed reply log-probs of a batch of pair rows, in the policy's
    LoRA scope when it has one."""

    def __init__(self, palm: nn.Module, lora: bool):
        super().__init__()
        self.palm, self.lora = palm, lora

    def forward(self, tokens: Tensor, attention_mask: Tensor, reply_mask: Tensor, scope: str | None = ACTOR) -> Tensor:
        with lora_scope(self.palm, scope if self.lora else None):
            return reply_logprobs(self.palm, tokens, attention_mask, reply_mask)


def reply_logprobs(model: nn.Module, tokens: Tensor, attention_mask: Tensor, reply_mask: Tensor) -> Tensor:
    """Summed log-probs (2B,) of each row's reply tokens. The logits at t predict the token at t + 1, and
    only those of reply tokens are made: a pair row is mostly prompt, and the output projection
    of every position was most of a small model's step."""
    predicts = torch.zeros_like(reply_mask)
    predicts[:, :-1] = reply_mask[:, 1:]  # the positions whose next token is a reply token
    # chosen rows then rejected ones: a pair's prompt is computed once for both (PaLM.trunk's shared_prefix)
    logits = model(tokens, attention_mask=attention_mask, keep=predicts,
                   shared_prefix=paired_prefix(tokens, attention_mask))  # (n, V)
    logprobs = rl.token_logprobs(logits[:, None], tokens[:, 1:][reply_mask[:, 1:]][:, None])[:, 0]  # (n,)
    rows = predicts.nonzero()[:, 0]
    return torch.zeros(len(tokens), dtype=logprobs.dtype, device=logprobs.device).index_add(0, rows, logprobs)


class DPORecipe:
    """build → reference log-probs → `step` and `evaluate` on the shared loop."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dpo = typed(DPOConfig, cfg.dpo, key="dpo")
        self.settings = typed(DPOTrainSettings, cfg.train, key="train")
        if cfg.data.get("kind") != "preferences":
            raise UserError(f"data: dpo needs preference pairs (data=prefs|my_prefs), got kind={cfg.data.get('kind')}")
        self.dist = init_distributed()
        seed_everything(int(cfg.seed))
        self.uses_reference = self.dpo.loss != "simpo"

    def build(self) -> None:
        cfg, settings = self.cfg, self.settings
        palm, self.model_config, self.tokenizer, self.parent, self.source = policy_source(cfg, "policy", POLICY_STAGES)
        if settings.max_len > self.model_config.max_seq_len:
            raise UserError(f"train.max_len ({settings.max_len}) exceeds the model's max_seq_len "
                            f"({self.model_config.max_seq_len})")
        spec = apply_lora(palm, cfg.lora, ACTOR)
        self.lora = {"scopes": spec["scopes"], "active": ACTOR} if spec else {}
        self.module = Policy(palm, lora=bool(spec))
        self.judge = self.build_judge() if self.dpo.on_policy else None

        self.train_pairs, self.stats = load_preference_pairs(cfg.data, "train")
        self.val_pairs, _ = load_preference_pairs(cfg.data, "val")
        # on-policy rounds render their own pairs; the data's pairs then only give the prompts
        self.train_rows = [] if self.dpo.on_policy else pair_rows(self.tokenizer, self.train_pairs, settings.max_len)
        self.val_rows = pair_rows(self.tokenizer, self.val_pairs, settings.max_len)
        micro = int(cfg.train.micro_batch_size)
        self.order = ShuffledBatches(self.train_pairs, batch_size=micro, pad_id=self.tokenizer.pad_id,
                                     seed=int(cfg.seed), rank=self.dist.rank, world_size=self.dist.world_size)
        on_tasks = str(cfg.data.get("source")) == "tasks"
        self.task_examples = tasks.make_examples("test", settings.eval_examples, seed=int(cfg.seed),
                                                 tasks=cfg.data.get("tasks")) if on_tasks else []

        self.facts = {"loss": self.dpo.loss, "beta": self.dpo.beta, "reference": None, "on_policy": self.dpo.on_policy}
        if self.dpo.on_policy:
            self.facts.update(reward=cfg.get("reward"), reward_fn=cfg.get("reward_fn"))
        self.prompt_pool = list({json.dumps(p.prompt): p.prompt for p in self.train_pairs}.values())  # in order
        self.rounds: dict[int, tuple[list[PairRows], Tensor]] = {}
        self.trainer = Trainer(cfg, self.dist, self.module, stage="dpo", model_config=self.model_config.to_dict(),
                               tokenizer=self.tokenizer, parent=self.parent,
                               tokens_per_step=2 * micro * int(cfg.train.grad_accum) * self.dist.world_size
                               * settings.max_len,
                               hooks=Hooks(export=export_actor(bool(spec))),
                               manifest_extra={"lora": self.lora, "dpo": self.facts, "data_stats": self.stats,
                                               **self.source})
        self.engine = self.trainer.engine

    # ---- the reference -------------------------------------------------------------------------
    def reference_digest(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([self.parent.content_hash if self.parent else self.source,
                                  self.settings.max_len]).encode())
        for pair in (*self.train_pairs, *self.val_pairs):
            digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode())
        return digest.hexdigest()

    @torch.no_grad()
    def compute_reference(self, rows: list[PairRows]) -> Tensor:
        """(N, 2) summed reply log-probs of chosen and rejected under the starting policy."""
        micro, out = int(self.cfg.train.micro_batch_size), []
        self.module.eval()
        for start in range(0, len(rows), micro):
            batch = self.to_device(collate(rows[start:start + micro], self.tokenizer.pad_id))
            logps = self.engine(batch.tokens, batch.attention_mask, batch.reply_mask, scope=None)  # adapters off
            out.append(logps.float().view(2, -1).T.cpu())
        self.module.train()
        return torch.cat(out)

    def load_reference(self) -> None:
        """The reference log-probs of every pair: from the run's cache when it matches, else computed now
        (before any update: the engine still holds the starting policy) and cached."""
        self.reference = {}
        if not self.uses_reference:
            return
        path, digest = self.trainer.out_dir / REFERENCE_FILE, self.reference_digest()
        if path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    cached = (f.metadata() or {}).get("digest") == digest
                if cached:
                    tensors = load_file(path)
                    self.reference = {"train": tensors["train"], "val": tensors["val"]}
                    self.facts["reference"] = {"file": REFERENCE_FILE, "computed": False}
                    return
            except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
                pass
        if self.trainer.will_resume():
            raise UserError(f"resume: {path} is missing or does not match this run's pairs; the reference "
                            f"cannot be recomputed from a policy that has trained (overwrite=true starts afresh)")
        train = self.train_rows  # on_policy: none; each round computes its own
        self.reference = {"train": self.compute_reference(train) if train else torch.zeros(0, 2),
                          "val": self.compute_reference(self.val_rows)}
        self.facts["reference"] = {"file": REFERENCE_FILE, "computed": True}
        if self.dist.is_main:
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(self.reference, str(tmp), metadata={"digest": digest})
            tmp.replace(path)

    # ---- on-policy rounds (iterative DPO) --------------------------------------------------------
    def build_judge(self):
        """What ranks a round's samples: `reward_fn=` or the reward model at `reward=`. With LoRA only:
        the frozen base is the reference of pairs made from a policy that has moved."""
        cfg = self.cfg
        if not self.module.lora:
            raise UserError("dpo.on_policy: needs LoRA (lora=r8, ...): the frozen base is the reference for the "
                            "pairs each round samples from a policy that has moved")
        if self.dpo.loss == "simpo":
            raise UserError("dpo.on_policy: use dpo.loss=sigmoid or ipo (simpo has no reference to anchor the rounds)")
        if cfg.get("reward_fn"):
            return load_reward_fn(str(cfg.reward_fn))
        if not cfg.get("reward"):
            raise UserError("dpo.on_policy: set reward_fn=<package.module.function> or reward=<a reward checkpoint> "
                            "to rank each round's samples")
        from palmrl import checkpoint
        from palmrl.reward import reward_model_from_checkpoint, score_texts

        ckpt = checkpoint.load(str(cfg.reward), key="reward", stages=["reward"],
                               trust_remote_code=bool(cfg.trust_remote_code))
        if self.parent is not None and ckpt.manifest.get("tokenizer_sha256") != self.parent.manifest.get(
                "tokenizer_sha256"):
            raise UserError(f"reward: {ckpt.path} uses a different tokenizer than policy {self.parent.path}")
        model = reward_model_from_checkpoint(ckpt).requires_grad_(False).to(self.dist.device)
        return lambda prompts, replies: score_texts(model, self.tokenizer, prompts, replies,
                                                    max_len=self.settings.max_len).tolist()

    def round_of(self, step: int) -> int:
        return (step - 1) // self.dpo.round_steps

    def round_data(self, step: int) -> tuple[list[PairRows], Tensor]:
        """Round r's pairs (rendered) and reference log-probs: from memory, from the run folder (a resumed run), or
        sampled now — only at the round's first step, when the policy is the one the round starts from."""
        r = self.round_of(step)
        if r in self.rounds:
            return self.rounds[r]
        self.rounds.clear()
        folder = self.trainer.out_dir / ROUNDS_DIR
        pairs_file, ref_file = folder / f"round-{r:05d}.json", folder / f"round-{r:05d}.safetensors"
        if pairs_file.is_file() and ref_file.is_file():
            saved = json.loads(pairs_file.read_text())
            pairs = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in saved["pairs"]]
            self.rounds[r] = (pair_rows(self.tokenizer, pairs, self.settings.max_len), load_file(ref_file)["reference"])
            return self.rounds[r]
        if step != r * self.dpo.round_steps + 1:
            raise UserError(f"resume: {pairs_file} is missing; round {r}'s pairs came from the policy at its start "
                            f"and cannot be sampled again (overwrite=true starts afresh)")
        pairs, gap = self.sample_pairs(r)
        rows = pair_rows(self.tokenizer, pairs, self.settings.max_len)
        reference = self.compute_reference(rows)
        if self.dist.is_main:
            folder.mkdir(exist_ok=True)
            tmp = ref_file.with_name(f".{ref_file.name}.tmp")
            save_file({"reference": reference}, str(tmp))
            tmp.replace(ref_file)
            write_atomic(pairs_file, json.dumps({"round": r, "score_gap": gap, "pairs": [
                {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]}) + "\n")
        self.rounds[r] = (rows, reference)
        return self.rounds[r]

    @torch.no_grad()
    def sample_pairs(self, r: int) -> tuple[list[PreferencePair], float]:
        """`round_prompts` prompts (the pool, in turn), `samples` replies to each from the current policy;
        the best-scored and the worst-scored reply of a prompt make a pair when their scores differ."""
        d, pool = self.dpo, self.prompt_pool
        prompts = [pool[(r * d.round_prompts + i) % len(pool)] for i in range(d.round_prompts)]
        ids = [render_prompt(self.tokenizer, as_messages(p)) for p in prompts for _ in range(d.samples)]
        self.module.eval()
        with lora_scope(self.module.palm, ACTOR):
            replies = generate_responses(
                self.module.palm, ids, batch_size=64, max_new_tokens=self.settings.max_new_tokens,
                temperature=d.temperature, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                generator=seeded_generator(int(self.cfg.seed) * 1_000_003 + r, self.dist.device))
        self.module.train()
        texts = [clean_response(self.tokenizer, reply)[0] for reply in replies]
        scores = [float(x) for x in self.judge([prompt_text(p) for p in prompts for _ in range(d.samples)], texts)]
        pairs, gaps = [], []
        for i, prompt in enumerate(prompts):
            group = sorted(zip(scores[i * d.samples:(i + 1) * d.samples], texts[i * d.samples:(i + 1) * d.samples]),
                           key=lambda x: x[0])
            (low, worst), (high, best) = group[0], group[-1]
            if high > low and best.strip() != worst.strip():
                pairs.append(PreferencePair(prompt, best, worst))
                gaps.append(high - low)
        if not pairs:
            raise UserError(f"dpo.on_policy: round {r} made no pair (every prompt's {d.samples} samples scored "
                            f"alike); raise dpo.samples or dpo.temperature")
        return pairs, sum(gaps) / len(gaps)

    # ---- the loop ------------------------------------------------------------------------------
    def to_device(self, batch: PairTokens) -> PairTokens:
        return PairTokens(*(t.to(self.dist.device) for t in batch))

    def loss(self, rows: list[PairRows], reference: Tensor | None) -> tuple[Tensor, rl.DPOLoss, dict,
                                                                             Tensor, Tensor | None]:
        """(total loss, the preference loss's parts, scalar stats, reply log-probs (2B,), reference (B, 2))."""
        batch = self.to_device(collate(rows, self.tokenizer.pad_id))
        logps = self.engine(batch.tokens, batch.attention_mask, batch.reply_mask)
        chosen, rejected = logps.chunk(2)
        lengths = batch.lengths.chunk(2)
        ref = reference.to(self.dist.device) if reference is not None else None
        out = rl.dpo_loss(chosen, rejected, ref[:, 0] if ref is not None else None,
                          ref[:, 1] if ref is not None else None, kind=self.dpo.loss, beta=self.dpo.beta,
                          label_smoothing=self.dpo.label_smoothing, chosen_lengths=lengths[0],
                          rejected_lengths=lengths[1], simpo_gamma=self.dpo.simpo_gamma)
        nll = -(chosen / lengths[0].clamp(min=1)).mean()  # per token, so long and short replies weigh alike
        total = out.loss + self.dpo.sft_weight * nll if self.dpo.sft_weight else out.loss
        chosen_mean, rejected_mean = chosen.detach().mean().item(), rejected.detach().mean().item()
        stats = {"loss": total.item(), "preference_loss": out.loss.item(), "nll_chosen": nll.item(),
                 "reward_accuracy": out.accuracy.item(), "reward_margin": out.margin.item(),
                 "logp_chosen": chosen_mean, "logp_rejected": rejected_mean}
        return total, out, stats, logps.detach(), ref

    def batch(self, step: int, micro_step: int) -> tuple[list[PairRows], Tensor | None, dict]:
        """This micro-step's pairs and reference: the data's (a pure function of the step), or the round's."""
        accum = self.trainer.train.grad_accum
        if not self.dpo.on_policy:
            idx = self.order.indices((step - 1) * accum + micro_step)
            return [self.train_rows[i] for i in idx], self.reference["train"][idx] if self.reference else None, {}
        rows, reference = self.round_data(step)
        r, micro = self.round_of(step), int(self.cfg.train.micro_batch_size)
        shuffle = torch.Generator(device="cpu").manual_seed(int(self.cfg.seed) + r)  # the round's order, every rank
        order = torch.randperm(len(rows), generator=shuffle).tolist()
        k = ((step - 1) % self.dpo.round_steps * accum + micro_step) * self.dist.world_size + self.dist.rank
        idx = [order[(k * micro + j) % len(rows)] for j in range(micro)]
        return [rows[i] for i in idx], reference[idx], {"round": r, "round_pairs": len(rows)}

    def step(self, step: int) -> dict:
        accum, totals = self.trainer.train.grad_accum, {}
        for micro_step in range(accum):
            rows, reference, extra = self.batch(step, micro_step)
            total, _, stats, _, _ = self.loss(rows, reference)
            stats.update(extra)
            self.trainer.backward_step(total)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        return totals

    @torch.no_grad()
    def evaluate(self) -> dict:
        micro, rows = int(self.cfg.train.micro_batch_size), self.val_rows
        sums: dict[str, float] = {}
        for start in range(0, len(rows), micro):
            chunk = list(range(start, min(start + micro, len(rows))))
            reference = self.reference["val"][chunk] if self.reference else None
            _, _, row, logps, ref = self.loss([rows[i] for i in chunk], reference)
            if ref is not None:  # mean log π − log π_ref of a reply: how far the policy moved on this data
                row["drift"] = (logps - torch.cat([ref[:, 0], ref[:, 1]])).mean().item()
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
        metrics = {k: v / len(rows) for k, v in sums.items()}
        if self.task_examples:
            metrics.update(self.task_metrics(ACTOR))
        return metrics

    def task_metrics(self, scope: str | None) -> dict:
        """Greedy checker accuracy, sampled true reward and behaviour rate on held-out task prompts."""
        new_tokens, seed = self.settings.max_new_tokens, int(self.cfg.seed)
        with lora_scope(self.module.palm, scope if self.module.lora else None):
            score = task_score(self.module.palm, self.tokenizer, self.task_examples, max_new_tokens=new_tokens)
            sampled = sampled_scores(self.module.palm, self.tokenizer, self.task_examples, seed=seed,
                                     max_new_tokens=new_tokens)
        self.trainer.manifest_extra["samples"] = score.samples
        return {"accuracy": score.accuracy, "sampled_reward": sampled.reward, "behaviour_rate": sampled.behaviour,
                "format_rate": score.format_rate, "response_tokens": score.mean_length}

    def run(self) -> Path:
        self.build()
        rows = {"pairs": f"{len(self.train_pairs):,} train, {len(self.val_pairs):,} held out",
                "loss": f"{self.dpo.loss}, β={self.dpo.beta}"
                        + (f", label smoothing {self.dpo.label_smoothing}" if self.dpo.label_smoothing else ""),
                "reference": "none (SimPO is reference-free)" if not self.uses_reference else
                ("the frozen base, adapters off" if self.module.lora else "the starting policy") +
                f", log-probs cached in {REFERENCE_FILE}",
                "LoRA": f"rank {self.lora['scopes'][ACTOR]['rank']}" if self.lora else "none (full fine-tuning)"}
        self.load_reference()
        if self.task_examples and not self.trainer.will_resume():
            before = self.task_metrics(None if self.module.lora else ACTOR)
            self.trainer.manifest_extra.update({f"init_{k}": v for k, v in before.items()})
            rows["policy before DPO: accuracy / sampled reward / behaviour rate"] = (
                f"{before['accuracy']:.4f} / {before['sampled_reward']:.4f} / {before['behaviour_rate']:.4f}")
        return self.trainer.fit(self.step, self.evaluate, start_rows=rows)


def run(cfg: DictConfig) -> Path:
    return DPORecipe(cfg).run()

