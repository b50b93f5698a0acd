"""`palmrl ppo`: RLHF with PPO as in InstructGPT (https://arxiv.org/abs/2203.02155) and
"The N+ implementation details of RLHF with PPO" (Huang et al., 2024).

One iteration: sample responses to a batch of prompts with the KV cache → score them (reward model
at the last token, or a Python `reward_fn`) → per-token reward = −β·KL(actor ‖ frozen SFT
reference) plus the score at the last token → GAE → several epochs of clipped policy + value
updates over minibatches.

Models. With LoRA (the default) one frozen base holds the SFT policy; the actor and critic are
adapter scopes on it, the reference is the base with no scope, and a LoRA reward model whose base
is the same SFT checkpoint becomes a third scope: the base sits in memory once. With lora=none the
actor is fully trained and the reference and critic trunk are separate copies.
The critic starts from the reward model (critic_init=reward, InstructGPT's choice): the value head
copies a pairwise reward head, and with a shared base the critic scope copies the reward adapters
too. critic_init=policy (or a binned reward model, or reward_fn) starts a fresh value head.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple, Sequence

import deepspeed
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from palmrl import checkpoint, rl, tasks
from palmrl.data.chat import as_messages, clean_response, render_prompt
from palmrl.data.instructions import ShuffledBatches
from palmrl.data.preferences import load_prompts
from palmrl.engine import Hooks, Trainer
from palmrl.errors import TrainingDiverged, UserError
from palmrl.evaluate import sampled_reward, task_score
from palmrl.generate import generate
from palmrl.model.heads import ScalarHead
from palmrl.model.lora import LoRAConfig, add_lora, freeze_except_lora, lora_scope, lora_state_dict
from palmrl.model.palm import PaLM
from palmrl.reward import RewardModel, last_positions, reward_model_from_checkpoint
from palmrl.runtime import init_distributed, seed_everything
from palmrl.model.registry import apply_lora
from palmrl.stages.common import export_split

ACTOR, CRITIC, REWARD = "actor", "critic", "reward"
TRAIN_PROMPT_SAMPLES = 8  # samples per training prompt for its true reward (1,600 with 200 prompts): the demo's PPO gate reads it


class ActorCritic(nn.Module):
    """The trainable part of PPO, one DeepSpeed engine: actor logits and critic values in one forward.

    With `critic=False` (ppo.advantage=rloo) there is no value head and `values` are zeros.
    """

    def __init__(self, palm: PaLM, *, lora: bool, critic_trunk: PaLM | None = None, critic: bool = True):
        super().__init__()
        self.palm = palm                    # the actor (scope `actor` over the frozen base with LoRA)
        self.lora = lora
        self.critic_trunk = critic_trunk    # full fine-tuning only: a separate trunk for the critic
        self.value_head = ScalarHead(palm.config.dim, 1) if critic else None

    def actor_logits(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        with lora_scope(self.palm, ACTOR if self.lora else None):
            return self.palm(tokens, attention_mask=attention_mask)  # (B, T, V)

    def values(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if self.value_head is None:
            return torch.zeros(tokens.shape, device=tokens.device)
        trunk = self.palm if self.lora else self.critic_trunk
        with lora_scope(trunk, CRITIC if self.lora else None):
            hidden = trunk.trunk(tokens, attention_mask=attention_mask)  # (B, T, D)
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)

    def forward(self, tokens: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.actor_logits(tokens, attention_mask), self.values(tokens, attention_mask)


class Rollout(NamedTuple):
    sequences: Tensor       # (B, P+N) left-padded prompt, response, pad after eos
    attention_mask: Tensor  # (B, P+N) bool
    mask: Tensor            # (B, N) bool, response tokens incl. eos
    logprobs: Tensor        # (B, N) actor log-probs at sampling time
    ref_logprobs: Tensor    # (B, N) frozen reference log-probs
    values: Tensor          # (B, N) critic values at sampling time
    rewards: Tensor         # (B, N) shaped per-token rewards
    advantages: Tensor      # (B, N) GAE (whitened if configured)
    returns: Tensor         # (B, N) advantages + values
    scores: Tensor          # (B,) scores added at the last token (after normalising, penalty, clip)


def response_slice(x: Tensor, prompt_length: int) -> Tensor:
    """Positions whose outputs predict the response tokens: P-1 … P+N-2."""
    return x[:, prompt_length - 1:-1]


def load_reward_fn(path: str) -> Callable[[Sequence[str], Sequence[str]], Sequence[float]]:
    module_name, _, attr = str(path).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"reward_fn: cannot import '{path}' (expected package.module.function)") from None
    if not callable(fn):
        raise UserError(f"reward_fn: '{path}' is not callable")
    return fn


def prompt_text(prompt) -> str:
    """The last user message: what a reward function or the task checker reads."""
    return [m["content"] for m in as_messages(prompt) if m["role"] == "user"][-1]


def same_base(reward_ckpt: checkpoint.Checkpoint, policy_ckpt: checkpoint.Checkpoint) -> bool:
    """A LoRA reward model trained on top of the very policy checkpoint PPO starts from."""
    parent = reward_ckpt.manifest.get("parent") or {}
    has_lora = bool((reward_ckpt.manifest.get("lora") or {}).get("scopes"))
    return has_lora and parent.get("sha256") == policy_ckpt.content_hash and \
        Path(parent.get("path", "")).resolve() == policy_ckpt.path.resolve()


def run(cfg: DictConfig) -> Path:
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    p = cfg.ppo
    if cfg.data.get("kind") != "prompts":
        raise UserError(f"data: ppo needs prompts (data=prompts|my_prompts), got kind={cfg.data.get('kind')}")
    if p.variant not in ("standard", "reference"):
        raise UserError(f"ppo.variant must be standard or reference, got '{p.variant}'")
    if str(p.critic_init) not in ("reward", "policy"):
        raise UserError(f"ppo.critic_init must be reward or policy, got '{p.critic_init}'")
    advantage = str(p.advantage)
    if advantage not in ("gae", "rloo"):
        raise UserError(f"ppo.advantage must be gae or rloo, got '{advantage}'")
    rloo = advantage == "rloo"
    if rloo and (int(p.samples_per_prompt) < 2 or p.variant != "standard"):
        raise UserError(f"ppo.advantage=rloo needs ppo.samples_per_prompt >= 2 and ppo.variant=standard "
                        f"(got {p.samples_per_prompt} and {p.variant})")
    if str(p.kl_kind) not in rl.KL_KINDS:
        raise UserError(f"ppo.kl_kind must be one of {', '.join(rl.KL_KINDS)}, got '{p.kl_kind}'")
    if float(p.kl_coef) < 0:
        raise UserError(f"ppo.kl_coef must be >= 0, got {p.kl_coef}")
    if p.kl_target is not None and (float(p.kl_target) <= 0 or int(p.kl_horizon) <= 0):
        raise UserError(f"ppo.kl_target and ppo.kl_horizon must be > 0, got {p.kl_target} and {p.kl_horizon}")
    rollout_batch, minibatch = int(p.rollout_batch), int(p.minibatch)
    if rollout_batch % minibatch:
        raise UserError(f"ppo.rollout_batch ({rollout_batch}) must be a multiple of ppo.minibatch ({minibatch})")
    per_prompt = int(p.samples_per_prompt)
    if per_prompt < 1 or rollout_batch % per_prompt:
        raise UserError(f"ppo.samples_per_prompt ({per_prompt}) must divide ppo.rollout_batch ({rollout_batch})")

    # ---- models ----------------------------------------------------------------------------
    policy_ckpt = checkpoint.load(cfg.policy, key="policy", stages=["sft", "pretrain", "ppo"])
    tokenizer = policy_ckpt.tokenizer()
    palm, model_config = checkpoint.policy_from_checkpoint(policy_ckpt)
    use_lora = int(cfg.lora.rank) > 0

    reward_fn, reward_model, reward_ckpt = None, None, None
    if cfg.reward_fn:
        reward_fn = load_reward_fn(cfg.reward_fn)
    else:
        reward_ckpt = checkpoint.load(cfg.reward, key="reward", stages=["reward"])
        if reward_ckpt.manifest.get("tokenizer_sha256") != policy_ckpt.manifest.get("tokenizer_sha256"):
            raise UserError(f"reward: {reward_ckpt.path} uses a different tokenizer than policy {policy_ckpt.path}")
    shared_reward = reward_ckpt is not None and use_lora and same_base(reward_ckpt, policy_ckpt)

    lora_spec = apply_lora(palm, cfg.lora, ACTOR)
    critic_trunk, reference = None, None
    if use_lora:
        if not rloo:
            critic_lora = LoRAConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
                                     targets=tuple(lora_spec["scopes"][ACTOR]["targets"]))
            add_lora(palm, CRITIC, critic_lora)
            lora_spec["scopes"][CRITIC] = lora_spec["scopes"][ACTOR]
        freeze_except_lora(palm)  # the actor's (and the critic's) adapters train
    else:
        reference = copy.deepcopy(palm).eval().requires_grad_(False)
        critic_trunk = None if rloo else copy.deepcopy(palm)
    module = ActorCritic(palm, lora=use_lora, critic_trunk=critic_trunk, critic=not rloo)

    if reward_ckpt is not None:
        rm = reward_model_from_checkpoint(reward_ckpt)
        if shared_reward:
            # the reward adapters become a frozen scope of the shared base; the head stays outside
            spec = reward_ckpt.manifest["lora"]["scopes"][REWARD]
            add_lora(palm, REWARD, LoRAConfig(rank=int(spec["rank"]), alpha=float(spec["alpha"]), targets=tuple(spec["targets"])))
            reward_adapters = {k: v for k, v in lora_state_dict(rm.palm, REWARD).items()}
            own = dict(palm.named_parameters())
            with torch.no_grad():
                for name, tensor in reward_adapters.items():
                    own[name].copy_(tensor)
                    own[name].requires_grad_(False)
            reward_model = RewardModel(palm, objective=rm.objective, num_bins=rm.num_bins)
            reward_model.reward_head = rm.reward_head
            reward_model.score_mean, reward_model.score_std = rm.score_mean, rm.score_std
            del rm
        else:
            reward_model = rm
        # frozen: the head (and, when separate, its trunk); a shared base's actor/critic scopes still train
        (reward_model.reward_head if shared_reward else reward_model).requires_grad_(False)
        if str(p.critic_init) == "reward" and rm_is_scalar(reward_model) and not rloo:
            with torch.no_grad():
                module.value_head.load_state_dict(reward_model.reward_head.state_dict())
                if use_lora and shared_reward:
                    own = dict(palm.named_parameters())
                    for name, tensor in lora_state_dict(palm, REWARD).items():
                        own[name.replace(f".{REWARD}", f".{CRITIC}")].copy_(tensor)
    critic_from = "reward model" if (str(p.critic_init) == "reward" and reward_model is not None
                                     and rm_is_scalar(reward_model)) else "policy (fresh value head)"
    if rloo:
        critic_from = f"none: leave-one-out baseline over {per_prompt} samples per prompt (ppo.advantage=rloo)"

    # ---- data --------------------------------------------------------------------------------
    prompts = load_prompts(cfg.data, "train")
    on_tasks = str(cfg.data.get("source")) == "tasks"
    eval_examples = tasks.make_examples("test", int(cfg.train.eval_examples), seed=int(cfg.seed),
                                        tasks=cfg.data.get("tasks")) if on_tasks else []
    # the training prompts' true reward, measured on a fixed sample of them (what PPO optimises)
    pool_examples = [SimpleNamespace(prompt=prompt_text(x)) for x in prompts[:int(cfg.train.eval_examples)]] \
        if on_tasks else []
    max_new = int(p.max_new_tokens)
    prompt_ids = [render_prompt(tokenizer, as_messages(pr)) for pr in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_new > model_config.max_seq_len]
    if too_long:
        raise UserError(f"data: prompt #{too_long[0]} has {len(prompt_ids[too_long[0]])} tokens; with "
                        f"ppo.max_new_tokens={max_new} it exceeds model.max_seq_len={model_config.max_seq_len}")
    order = ShuffledBatches(prompts, batch_size=rollout_batch // per_prompt, pad_id=tokenizer.pad_id, seed=int(cfg.seed),
                       rank=dist.rank, world_size=dist.world_size)

    kl_ctl = (rl.AdaptiveKLController(float(p.kl_coef), float(p.kl_target), int(p.kl_horizon))
              if p.kl_target is not None else rl.FixedKLController(float(p.kl_coef)))
    updates_per_iter = int(p.epochs) * (rollout_batch // minibatch)

    def load_stage_state(state: dict) -> None:
        try:
            if "kl_ctl" in state:
                kl_ctl.load_state_dict(state["kl_ctl"])
        except ValueError as err:  # resuming with ppo.kl_target switched on or off
            raise UserError(f"resume: {err}") from None

    def check_frozen() -> None:
        after = frozen_digest(frozen)
        ppo_facts["frozen_sha256"]["after"] = after
        if after != frozen_before:
            raise TrainingDiverged("ppo: a frozen tensor (reference, reward model or shared base) changed during "
                                   "training; this is a bug, please report it")

    actor_lora = {"scopes": {ACTOR: lora_spec["scopes"][ACTOR]}, "active": ACTOR} if use_lora else {}
    ppo_facts = {"reward": str(reward_ckpt.path) if reward_ckpt else None, "reward_fn": cfg.reward_fn,
                 "variant": str(p.variant), "frozen_sha256": {}}
    trainer = Trainer(cfg, dist, module, stage="ppo", model_config=model_config.to_dict(), tokenizer=tokenizer,
                      parent=policy_ckpt, tokens_per_step=rollout_batch * dist.world_size * max_new,
                      optimizer_steps=int(cfg.train.max_steps) * updates_per_iter,
                      hooks=Hooks(export=export_actor(use_lora), state=lambda: {"kl_ctl": kl_ctl.state_dict()},
                                  load_state=load_stage_state, before_final_save=check_frozen),
                      manifest_extra={"lora": actor_lora, "ppo": ppo_facts})
    frozen = [module.palm, reference, reward_model]  # whatever of these exists and must never move
    frozen_before = frozen_digest(frozen)
    ppo_facts["frozen_sha256"]["before"] = frozen_before
    engine, device = trainer.engine, dist.device
    zero3_multi_rank = engine.zero_optimization_stage() == 3 and dist.world_size > 1

    def reference_logprobs(sequences: Tensor, attention_mask: Tensor, P: int) -> Tensor:
        if use_lora:
            with lora_scope(palm, None):
                logits = palm(sequences, attention_mask=attention_mask)
        else:
            logits = reference(sequences, attention_mask=attention_mask)
        return rl.token_logprobs(response_slice(logits, P), sequences[:, P:])

    def score_responses(batch_prompts, sequences, attention_mask, response_ids, ended) -> tuple[Tensor, list[str]]:
        texts = [clean_response(tokenizer, ids)[0] for ids in response_ids]
        if reward_fn is not None:
            raw = torch.tensor([float(s) for s in reward_fn([prompt_text(x) for x in batch_prompts], texts)])
        else:
            with lora_scope(palm, REWARD) if shared_reward else nullcontext():
                out = reward_model(sequences, last_positions(attention_mask), attention_mask=attention_mask)
            raw = reward_model.scores(out).float().cpu()
            if bool(p.normalise_scores):
                raw = (raw - reward_model.score_mean.cpu()) / reward_model.score_std.cpu().clamp_min(1e-6)
        if p.missing_eos_penalty is not None:
            raw = raw + torch.tensor([0.0 if e else float(p.missing_eos_penalty) for e in ended])
        return raw, texts

    @torch.no_grad()
    def rollout(step: int) -> tuple[Rollout, dict]:
        # samples_per_prompt responses to each prompt: contrasting them is the strongest signal a
        # binary reward gives, and the critic sees several outcomes of one state
        indices = [i for i in order.indices(step - 1) for _ in range(per_prompt)]
        batch_prompts = [prompts[i] for i in indices]
        generator = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step * 101 + dist.rank)
        module.eval()
        with lora_scope(palm, ACTOR if use_lora else None):
            out = generate(palm, [prompt_ids[i] for i in indices],
                           max_new_tokens=max_new, temperature=float(p.temperature), top_k=int(p.top_k),
                           top_p=float(p.top_p), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           generator=generator, stop_early=not zero3_multi_rank)
        seq, attn, mask, P = out.sequences.to(device), out.attention_mask.to(device), out.response_mask.to(device), out.prompt_length
        logits, values = engine(seq, attn)
        logprobs = rl.token_logprobs(response_slice(logits, P), seq[:, P:])
        values = response_slice(values, P)
        ref_logprobs = reference_logprobs(seq, attn, P)
        response_ids = [seq[b, P:][mask[b]].tolist() for b in range(seq.shape[0])]
        ended = [bool(ids) and ids[-1] == tokenizer.eos_id for ids in response_ids]
        raw_scores, texts = score_responses(batch_prompts, seq, attn, response_ids, ended)
        scores = raw_scores.to(device)
        if p.score_clip is not None:
            scores = scores.clamp(-float(p.score_clip), float(p.score_clip))
        if rloo:  # the baseline is the prompt's other samples; the return is that plus the KL-to-go
            shaped = rl.shaped_rewards(rl.leave_one_out(scores, per_prompt), logprobs, ref_logprobs, mask,
                                       kl_coef=kl_ctl.value, kl_kind=str(p.kl_kind))
            adv = rl.gae(shaped.rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
        else:
            shaped = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_ctl.value, kl_kind=str(p.kl_kind))
            adv = rl.gae(shaped.rewards, values, mask, gamma=float(p.gamma), lam=float(p.lam))
        advantages = rl.masked_whiten(adv.advantages, mask) if bool(p.whiten_advantages) else adv.advantages
        module.train()
        stats = {
            "reward": raw_scores.mean().item(),
            "kl": shaped.mean_kl.item(),
            "kl_coef": kl_ctl.value,
            "entropy": rl.masked_mean(rl.entropy_from_logits(response_slice(logits, P)), mask).item(),
            "response_tokens": mask.sum(1).float().mean().item(),
            "eos_rate": sum(ended) / len(ended),
        }
        if on_tasks:
            stats["true_reward"] = sum(tasks.checker([prompt_text(x) for x in batch_prompts], texts)) / len(texts)
        return Rollout(seq, attn, mask, logprobs, ref_logprobs, values, shaped.rewards, advantages,
                       adv.returns, scores), stats

    def step_fn(step: int) -> dict:
        data, stats = rollout(step)
        stats["kl"] = mean_over_ranks(stats["kl"])  # every rank sees the same KL: same β, same stop decision
        if not math.isfinite(stats["kl"]) or stats["kl"] > float(p.max_kl):
            raise TrainingDiverged(f"ppo: mean KL {stats['kl']:.2f} exceeds ppo.max_kl={p.max_kl} at iteration {step}; "
                                   f"{trainer.last_good()} (lower optim.lr or raise ppo.kl_coef)")
        P = data.sequences.shape[1] - data.mask.shape[1]
        sums: dict[str, float] = {}
        generator = torch.Generator().manual_seed(int(cfg.seed) + step)
        for _ in range(int(p.epochs)):
            for idx in torch.randperm(rollout_batch, generator=generator).split(minibatch):
                idx = idx.to(device)
                logits, values = engine(data.sequences[idx], data.attention_mask[idx])
                mask = data.mask[idx]
                logprobs = rl.token_logprobs(response_slice(logits, P), data.sequences[idx, P:])
                values = response_slice(values, P)
                if p.variant == "reference":
                    loss, parts = reference_update(logits, values, data, idx, P, mask)
                else:
                    pol = rl.ppo_policy_loss(logprobs, data.logprobs[idx], data.advantages[idx], mask, clip_eps=float(p.clip_eps))
                    entropy = rl.masked_mean(rl.entropy_from_logits(response_slice(logits, P)), mask)
                    loss = pol.loss - float(p.entropy_coef) * entropy
                    parts = {"policy_loss": pol.loss.item(), "clip_frac": pol.clip_frac.item(), "approx_kl": pol.approx_kl.item()}
                    if not rloo:
                        val = rl.ppo_value_loss(values, data.values[idx], data.returns[idx], mask, clip_eps=float(p.value_clip))
                        loss = loss + float(p.vf_coef) * val.loss
                        parts.update(value_loss=val.loss.item(), explained_variance=val.explained_variance.item())
                trainer.backward_step(loss)
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / updates_per_iter
        kl_ctl.update(stats["kl"], rollout_batch * dist.world_size)
        return {**stats, **sums}

    def reference_update(logits, values, data, idx, P, mask):
        """lucidrains' objective (ppo.variant=reference) for comparison; see rl.reference_variant_loss."""
        pooled_values = rl.masked_mean(values, mask, dim=1)
        old_pooled = rl.masked_mean(data.values[idx], mask, dim=1)
        old_logits = _old_logits_cache[0][idx]
        out = rl.reference_variant_loss(response_slice(logits, P), old_logits, data.sequences[idx, P:], data.scores[idx],
                                        pooled_values, old_pooled, mask, clip_eps=float(p.clip_eps),
                                        value_clip=float(p.value_clip), kl_coef=float(p.kl_coef),
                                        entropy_coef=float(p.entropy_coef))
        return out.loss, {"policy_loss": out.policy_loss.item(), "value_loss": out.value_loss.item(),
                          "clip_frac": out.clip_frac.item(), "entropy": out.entropy.item()}

    _old_logits_cache: list[Tensor] = []
    if p.variant == "reference":
        base_rollout = rollout

        def rollout(step: int):  # noqa: F811  the reference variant also keeps full old logits
            data, stats = base_rollout(step)
            with torch.no_grad():
                logits, _ = engine(data.sequences, data.attention_mask)
            _old_logits_cache[:] = [response_slice(logits, data.sequences.shape[1] - data.mask.shape[1]).detach()]
            return data, stats

    def eval_fn() -> dict:
        metrics: dict = {}
        if eval_examples:
            with lora_scope(palm, ACTOR if use_lora else None):
                score = task_score(palm, tokenizer, eval_examples, max_new_tokens=max_new)
                sampled = sampled_reward(palm, tokenizer, eval_examples, max_new_tokens=max_new, seed=int(cfg.seed),
                                         temperature=float(p.temperature))
                train_sampled = sampled_reward(palm, tokenizer, pool_examples, samples=TRAIN_PROMPT_SAMPLES,
                                               max_new_tokens=max_new, seed=int(cfg.seed), temperature=float(p.temperature))
            metrics.update(accuracy=score.accuracy, sampled_reward=sampled, train_sampled_reward=train_sampled,
                           format_rate=score.format_rate, response_tokens=score.mean_length)
            trainer.manifest_extra["samples"] = score.samples
        return metrics

    start_rows = {"prompts": f"{len(prompts):,}", "reward": cfg.reward_fn or str(reward_ckpt.path),
                  "shared base (LoRA scopes)": ", ".join(s for s in (ACTOR, None if rloo else CRITIC, REWARD if shared_reward else None) if s)
                  if use_lora else f"no (full fine-tuning: separate reference{'' if rloo else ' and critic'})",
                  "critic init": critic_from, "updates per iteration": updates_per_iter,
                  "KL control": f"adaptive, target {p.kl_target}" if p.kl_target is not None else f"fixed β={p.kl_coef}"}
    if eval_examples:
        with lora_scope(palm, None):
            before = task_score(palm, tokenizer, eval_examples, max_new_tokens=max_new)
            before_sampled = sampled_reward(palm, tokenizer, eval_examples, max_new_tokens=max_new, seed=int(cfg.seed),
                                            temperature=float(p.temperature))
            before_train = sampled_reward(palm, tokenizer, pool_examples, samples=TRAIN_PROMPT_SAMPLES,
                                          max_new_tokens=max_new, seed=int(cfg.seed), temperature=float(p.temperature))
        trainer.manifest_extra.update(init_accuracy=before.accuracy, init_sampled_reward=before_sampled,
                                      init_train_sampled_reward=before_train)
        start_rows["SFT policy: sampled true reward on the training prompts"] = f"{before_train:.4f}"
        start_rows["SFT policy: greedy accuracy / sampled true reward"] = f"{before.accuracy:.4f} / {before_sampled:.4f}"
    return trainer.fit(step_fn, eval_fn, start_rows=start_rows)


def mean_over_ranks(value: float) -> float:
    import torch.distributed as torch_dist

    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return tensor.item() / torch_dist.get_world_size()


def frozen_digest(modules: Sequence[nn.Module | None]) -> str:
    """sha256 over every parameter that does not train (the reference, the reward model, a shared base)."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            digest.update(name.encode())
            gather = deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else nullcontext()
            with gather:  # ZeRO-3 partitions frozen parameters too
                digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rm_is_scalar(model: RewardModel) -> bool:
    return model.objective == "pairwise"


def export_actor(use_lora: bool) -> Callable[[dict], tuple[dict, dict]]:
    """The policy checkpoint: the base and only the actor adapters (critic/reward scopes stay behind)."""
    def export(state: dict) -> tuple[dict, dict]:
        palm_state = {k.removeprefix("palm."): v for k, v in state.items() if k.startswith("palm.")}
        weights, adapters = export_split(palm_state)
        adapters = {k: v for k, v in adapters.items() if k.endswith(f".{ACTOR}")}
        return weights, (adapters if use_lora else {})
    return export
