"""`palmrl ppo`: RLHF with PPO as in InstructGPT (https://arxiv.org/abs/2203.02155) and
"The N+ implementation details of RLHF with PPO" (Huang et al., 2024).

One iteration: sample responses to a batch of prompts with the KV cache → score them (reward model
at the last token, or a Python `reward_fn`) → per-token reward = −β·KL(actor ‖ frozen SFT
reference) plus the score at the last token → GAE → several epochs of clipped policy + value
updates over minibatches.

The recipe, in the order `run` calls it: `PPOConfig` (the `ppo:` section, checked once) →
`build_models` (policy, LoRA scopes, reference, critic, reward model) → `build_data` (prompts,
evaluation examples, prompt order) → `build_trainer` → `Trainer.fit` over `step` (= `rollout`, the
divergence check, `update`, the KL controller) and `evaluate`. The math is rl/'s and reward.py's.

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
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, NamedTuple

import deepspeed
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from palmrl import checkpoint, rl, tasks
from palmrl.config import Invalid, typed
from palmrl.data.chat import as_messages, clean_response, render_prompt
from palmrl.data.instructions import ShuffledBatches
from palmrl.data.preferences import load_prompts
from palmrl.engine import Hooks, Trainer
from palmrl.errors import TrainingDiverged, UserError
from palmrl.evaluate import sampled_reward, task_score
from palmrl.generate import generate, seeded_generator
from palmrl.model.heads import ScalarHead
from palmrl.model.lora import LoRAConfig, add_lora, freeze_except_lora, lora_scope, lora_state_dict
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.model.registry import apply_lora
from palmrl.reward import RewardModel, last_positions, reward_model_from_checkpoint
from palmrl.runtime import Dist, init_distributed, mean_over_ranks, seed_everything
from palmrl.stages.common import export_split

ACTOR, CRITIC, REWARD = "actor", "critic", "reward"
TRAIN_PROMPT_SAMPLES = 8  # samples per training prompt for its true reward (1,600 with 200 prompts): the demo gate


@dataclass(frozen=True)
class PPOConfig:
    """The `ppo:` section of configs/ppo.yaml, typed and checked once at the stage's boundary."""

    variant: Literal["standard", "reference"] = "standard"  # reference: lucidrains' objective, only for comparison
    rollout_batch: int = 128            # responses per iteration per rank
    samples_per_prompt: int = 4         # contrasting a prompt's responses is the strongest signal a binary reward gives
    minibatch: int = 32                 # sequences per optimizer step
    epochs: int = 2                     # passes over each rollout batch
    max_new_tokens: int = 16            # response budget (task answers are short)
    temperature: float = 1.0            # 1.0 samples the policy's own distribution
    top_k: int = 0                      # 0 disables; truncation makes log-probs off-policy
    top_p: float = 1.0                  # 1.0 disables, for the same reason
    kl_coef: float = 0.1                # β (initial value when adaptive); higher resists hacking a weak reward model
    kl_target: float | None = None      # a target KL (nats per sequence) turns on the adaptive controller
    kl_horizon: int = 10000             # adaptive controller horizon, in sequences
    kl_kind: str = "k1"                 # per-token KL estimator, one of rl.KL_KINDS; k1 is InstructGPT's
    advantage: Literal["gae", "rloo"] = "gae"  # gae: learned critic (InstructGPT); rloo: leave-one-out, no critic
    gamma: float = 1.0                  # no discount: the episode is one short response
    lam: float = 0.95                   # GAE λ
    clip_eps: float = 0.2               # policy ratio clip (Schulman et al. 2017)
    value_clip: float = 0.2             # value prediction clip around the rollout values
    vf_coef: float = 0.1                # weight of the value loss
    entropy_coef: float = 0.0           # entropy bonus weight; the KL penalty already keeps the policy from collapsing
    whiten_advantages: bool = True      # zero mean / unit variance advantages per rollout batch
    normalise_scores: bool = True       # reward-model scores over the RM's held-out distribution
    score_clip: float | None = 5.0      # clip (normalised) scores to ±score_clip; null disables
    missing_eos_penalty: float | None = -1.0  # added to the score of a response cut without eos; null disables
    critic_init: Literal["reward", "policy"] = "reward"  # reward: value scope and head from the RM (InstructGPT)
    max_kl: float = 25.0                # stop (keeping the last good checkpoint) past this mean KL per sequence
    gather_for_rollout: bool = True     # ZeRO-3: weights gathered once per rollout instead of per forward

    def __post_init__(self):
        for key in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, key) < 1:
                raise Invalid(key, f"must be >= 1, got {getattr(self, key)}")
        if self.rollout_batch % self.minibatch:
            raise Invalid("rollout_batch", f"must be a multiple of ppo.minibatch ({self.minibatch}), "
                                           f"got {self.rollout_batch}")
        if self.rollout_batch % self.samples_per_prompt:
            raise Invalid("samples_per_prompt", f"must divide ppo.rollout_batch ({self.rollout_batch}), "
                                                f"got {self.samples_per_prompt}")
        if self.advantage == "rloo" and self.samples_per_prompt < 2:  # a leave-one-out baseline needs another sample
            raise Invalid("samples_per_prompt", f"must be >= 2 with ppo.advantage=rloo, got {self.samples_per_prompt}")
        if self.advantage == "rloo" and self.variant != "standard":
            raise Invalid("variant", f"must be standard with ppo.advantage=rloo, got '{self.variant}'")
        if self.kl_kind not in rl.KL_KINDS:
            raise Invalid("kl_kind", f"must be one of {', '.join(rl.KL_KINDS)}, got '{self.kl_kind}'")
        for key in ("kl_coef", "temperature", "top_k", "vf_coef"):
            if getattr(self, key) < 0:
                raise Invalid(key, f"must be >= 0, got {getattr(self, key)}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise Invalid("kl_target", f"must be > 0 (or null for a fixed coefficient), got {self.kl_target}")
        if self.kl_horizon <= 0:
            raise Invalid("kl_horizon", f"must be > 0, got {self.kl_horizon}")
        if not 0 < self.top_p <= 1:
            raise Invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise Invalid(key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("clip_eps", "value_clip", "score_clip", "max_kl"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise Invalid(key, f"must be > 0, got {getattr(self, key)}")

    @property
    def rloo(self) -> bool:
        return self.advantage == "rloo"

    @property
    def updates_per_iter(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)


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
    prompt_length: int      # P: the response starts at this position
    old_logits: Tensor | None  # (B, N, V) actor logits at sampling time; kept only for ppo.variant=reference


class Models(NamedTuple):
    """What build_models makes; None where the configuration needs no such piece."""

    palm: PaLM                           # the policy: the actor's model and, with LoRA, the base every scope shares
    model_config: ModelConfig            # its hyperparameters (model.yaml of every checkpoint PPO writes)
    use_lora: bool                       # actor (and critic) are LoRA scopes of a frozen base; else fully trained
    module: ActorCritic                  # the DeepSpeed engine's module: actor (+ critic)
    reference: PaLM | None               # lora=none only: a frozen copy (with LoRA: the base, no scope)
    reward_model: RewardModel | None     # None with reward_fn
    reward_fn: Callable | None           # reward_fn= instead of a reward model
    reward_path: str | None              # the reward checkpoint folder, for the manifest
    shared_reward: bool                  # the reward model is a frozen `reward` scope of the policy's base
    actor_lora: dict                     # the manifest's `lora` entry of the exported policy ({} without LoRA)
    critic_from: str                     # where the critic starts, for the start summary


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
    ppo = typed(PPOConfig, cfg.ppo, key="ppo")  # every ppo.* check, before anything is built
    if cfg.data.get("kind") != "prompts":
        raise UserError(f"data: ppo needs prompts (data=prompts|my_prompts), got kind={cfg.data.get('kind')}")
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    recipe = PPORecipe(cfg, ppo, dist)  # models, then data: model initialisation draws from the seeded RNG
    trainer = recipe.build_trainer()
    start_rows = recipe.start_rows()  # embedded tasks: the SFT policy measured once the engine exists, before updates
    return trainer.fit(recipe.step, recipe.evaluate, start_rows=start_rows)


class PPORecipe:
    """The built state of one PPO run and its phases; the Trainer calls `step` and `evaluate`."""

    def __init__(self, cfg: DictConfig, ppo: PPOConfig, dist: Dist):
        self.cfg, self.ppo, self.dist, self.seed = cfg, ppo, dist, int(cfg.seed)
        self.policy_ckpt = checkpoint.load(cfg.policy, key="policy", stages=["sft", "pretrain", "ppo"],
                                           trust_remote_code=bool(cfg.trust_remote_code))
        self.tokenizer = self.policy_ckpt.tokenizer()
        self.models = self.build_models()
        self.build_data()
        self.kl_ctl = (rl.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
                       if ppo.kl_target is not None else rl.FixedKLController(ppo.kl_coef))

    # ---- build ---------------------------------------------------------------------------------
    def build_models(self) -> Models:
        cfg, ppo = self.cfg, self.ppo
        palm, model_config = checkpoint.policy_from_checkpoint(self.policy_ckpt)
        use_lora = int(cfg.lora.rank) > 0
        reward_fn, reward_ckpt = (load_reward_fn(cfg.reward_fn), None) if cfg.reward_fn else (None, self.load_reward())
        shared = reward_ckpt is not None and use_lora and same_base(reward_ckpt, self.policy_ckpt)

        # the actor (and critic) scopes train; without LoRA the reference and critic are copies
        lora_spec = apply_lora(palm, cfg.lora, ACTOR)
        critic_trunk, reference = None, None
        if use_lora:
            if not ppo.rloo:
                add_lora(palm, CRITIC, LoRAConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
                                                  targets=tuple(lora_spec["scopes"][ACTOR]["targets"])))
                lora_spec["scopes"][CRITIC] = lora_spec["scopes"][ACTOR]
            freeze_except_lora(palm)
        else:
            reference = copy.deepcopy(palm).eval().requires_grad_(False).to(self.dist.device)
            critic_trunk = None if ppo.rloo else copy.deepcopy(palm)
        module = ActorCritic(palm, lora=use_lora, critic_trunk=critic_trunk, critic=not ppo.rloo)

        # the reward model is built after the value head: both draw their initial weights from the seeded RNG
        reward_model = self.build_reward_model(reward_ckpt, palm, shared) if reward_ckpt is not None else None
        from_reward = ppo.critic_init == "reward" and reward_model is not None and rm_is_scalar(reward_model)
        if from_reward and not ppo.rloo:
            init_critic_from_reward(module, reward_model, shared)
        critic_from = "reward model" if from_reward else "policy (fresh value head)"
        if ppo.rloo:
            critic_from = (f"none: leave-one-out baseline over {ppo.samples_per_prompt} samples per prompt "
                           f"(ppo.advantage=rloo)")
        actor_lora = {"scopes": {ACTOR: lora_spec["scopes"][ACTOR]}, "active": ACTOR} if use_lora else {}
        return Models(palm, model_config, use_lora, module, reference, reward_model, reward_fn,
                      str(reward_ckpt.path) if reward_ckpt else None, shared, actor_lora, critic_from)

    def load_reward(self) -> checkpoint.Checkpoint:
        reward_ckpt = checkpoint.load(self.cfg.reward, key="reward", stages=["reward"],
                                      trust_remote_code=bool(self.cfg.trust_remote_code))
        if reward_ckpt.manifest.get("tokenizer_sha256") != self.policy_ckpt.manifest.get("tokenizer_sha256"):
            raise UserError(f"reward: {reward_ckpt.path} uses a different tokenizer than policy "
                            f"{self.policy_ckpt.path}")
        return reward_ckpt

    def build_reward_model(self, reward_ckpt: checkpoint.Checkpoint, palm: PaLM, shared: bool) -> RewardModel:
        """The frozen reward model: its own model, or (shared) a `reward` scope of the policy's base."""
        rm = reward_model_from_checkpoint(reward_ckpt)
        if not shared:
            return rm.requires_grad_(False).to(self.dist.device)

        # the reward adapters become a frozen scope of the shared base; the head stays outside
        spec = reward_ckpt.manifest["lora"]["scopes"][REWARD]
        add_lora(palm, REWARD, LoRAConfig(rank=int(spec["rank"]), alpha=float(spec["alpha"]),
                                          targets=tuple(spec["targets"])))
        own = dict(palm.named_parameters())
        with torch.no_grad():
            for name, tensor in lora_state_dict(rm.palm, REWARD).items():
                own[name].copy_(tensor)
                own[name].requires_grad_(False)
        reward_model = RewardModel(palm, objective=rm.objective, num_bins=rm.num_bins)
        reward_model.reward_head = rm.reward_head.requires_grad_(False).to(self.dist.device)
        reward_model.score_mean, reward_model.score_std = rm.score_mean, rm.score_std
        return reward_model  # the shared base's actor/critic scopes still train

    def build_data(self) -> None:
        cfg, max_new, max_len = self.cfg, self.ppo.max_new_tokens, self.models.model_config.max_seq_len
        self.prompts = load_prompts(cfg.data, "train")
        self.on_tasks = on_tasks = str(cfg.data.get("source")) == "tasks"  # the embedded tasks have a checker
        self.eval_examples = tasks.make_examples("test", int(cfg.train.eval_examples), seed=self.seed,
                                                 tasks=cfg.data.get("tasks")) if on_tasks else []
        # the training prompts' true reward, measured on a fixed sample of them (what PPO optimises)
        pool = self.prompts[:int(cfg.train.eval_examples)] if on_tasks else []
        self.pool_examples = [SimpleNamespace(prompt=prompt_text(x)) for x in pool]
        self.prompt_ids = [render_prompt(self.tokenizer, as_messages(pr)) for pr in self.prompts]
        too_long = [i for i, ids in enumerate(self.prompt_ids) if len(ids) + max_new > max_len]
        if too_long:
            raise UserError(f"data: prompt #{too_long[0]} has {len(self.prompt_ids[too_long[0]])} tokens; with "
                            f"ppo.max_new_tokens={max_new} it exceeds model.max_seq_len={max_len}")
        self.order = ShuffledBatches(self.prompts, batch_size=self.ppo.rollout_batch // self.ppo.samples_per_prompt,
                                pad_id=self.tokenizer.pad_id, seed=self.seed, rank=self.dist.rank,
                                world_size=self.dist.world_size)

    def build_trainer(self) -> Trainer:
        """The engine over the actor-critic; the frozen tensors are hashed now and again before the final save."""
        cfg, ppo, models = self.cfg, self.ppo, self.models
        self.ppo_facts = {"reward": models.reward_path, "reward_fn": cfg.reward_fn, "variant": ppo.variant,
                          "frozen_sha256": {}}
        self.trainer = Trainer(
            cfg, self.dist, models.module, stage="ppo", model_config=models.model_config.to_dict(),
            tokenizer=self.tokenizer, parent=self.policy_ckpt,
            tokens_per_step=ppo.rollout_batch * self.dist.world_size * ppo.max_new_tokens,
            optimizer_steps=int(cfg.train.max_steps) * ppo.updates_per_iter,
            hooks=Hooks(export=export_actor(models.use_lora), state=lambda: {"kl_ctl": self.kl_ctl.state_dict()},
                        load_state=self.load_stage_state, before_final_save=self.check_frozen),
            manifest_extra={"lora": models.actor_lora, "ppo": self.ppo_facts})
        self.frozen = [models.palm, models.reference, models.reward_model]  # whatever exists and must never move
        self.ppo_facts["frozen_sha256"]["before"] = frozen_digest(self.frozen)
        self.engine = self.trainer.engine
        self.zero3 = self.engine.zero_optimization_stage() == 3
        # ZeRO-3 forwards are collectives (every rank gathers each layer) unless the weights were gathered
        # for the whole rollout: only then may a rank stop decoding when its own rows are done
        self.independent_decoding = not (self.zero3 and self.dist.world_size > 1 and not self.ppo.gather_for_rollout)
        return self.trainer

    def policy_for_generation(self):
        """ZeRO-3 with ppo.gather_for_rollout: the policy's weights gathered once and the per-forward
        gather hooks lifted while sampling (DeepSpeed's unwrap_model_for_generation; TRL measured ~10x
        over gathering at every token); otherwise nothing to do."""
        if self.zero3 and self.ppo.gather_for_rollout:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            return unwrap_model_for_generation(self.engine)
        return nullcontext()

    def load_stage_state(self, state: dict) -> None:
        try:
            if "kl_ctl" in state:
                self.kl_ctl.load_state_dict(state["kl_ctl"])
        except ValueError as err:  # resuming with ppo.kl_target switched on or off
            raise UserError(f"resume: {err}") from None

    def check_frozen(self) -> None:
        after = frozen_digest(self.frozen)
        self.ppo_facts["frozen_sha256"]["after"] = after
        if after != self.ppo_facts["frozen_sha256"]["before"]:
            raise TrainingDiverged("ppo: a frozen tensor (reference, reward model or shared base) changed during "
                                   "training; this is a bug, please report it")

    # ---- one iteration -------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Rollout → divergence check → updates → KL controller: one PPO iteration."""
        data, stats = self.rollout(step)
        stats["kl"] = mean_over_ranks(stats["kl"])  # every rank: same β, same stop decision
        if not math.isfinite(stats["kl"]) or stats["kl"] > self.ppo.max_kl:
            raise TrainingDiverged(f"ppo: mean KL {stats['kl']:.2f} exceeds ppo.max_kl={self.ppo.max_kl} at iteration "
                                   f"{step}; {self.trainer.last_good()} (lower optim.lr or raise ppo.kl_coef)")
        sums = self.update(step, data)
        self.kl_ctl.update(stats["kl"], self.ppo.rollout_batch * self.dist.world_size)
        return {**stats, **sums}

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict]:
        """Sample, score, shape rewards and compute advantages for this iteration's prompts."""
        ppo, models, device, eos_id = self.ppo, self.models, self.dist.device, self.tokenizer.eos_id
        # samples_per_prompt responses to each prompt: contrasting them is the strongest signal a
        # binary reward gives, and the critic sees several outcomes of one state
        indices = [i for i in self.order.indices(step - 1) for _ in range(ppo.samples_per_prompt)]
        batch_prompts = [self.prompts[i] for i in indices]
        generator = seeded_generator(self.seed * 1_000_003 + step * 101 + self.dist.rank, self.dist.device)
        models.module.eval()
        t0 = time.perf_counter()
        with self.policy_for_generation(), lora_scope(models.palm, ACTOR if models.use_lora else None):
            out = generate(models.palm, [self.prompt_ids[i] for i in indices], max_new_tokens=ppo.max_new_tokens,
                           temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p, eos_id=eos_id,
                           pad_id=self.tokenizer.pad_id, generator=generator, stop_early=self.independent_decoding)
        sampled_tokens = int(out.response_mask.sum())
        rollout_s = time.perf_counter() - t0
        seq, attn, mask = out.sequences.to(device), out.attention_mask.to(device), out.response_mask.to(device)
        P = out.prompt_length

        # sampling-time log-probs and values, the reference's log-probs, the scores
        logits, values = self.engine(seq, attn)
        logprobs = rl.token_logprobs(response_slice(logits, P), seq[:, P:])
        values = response_slice(values, P)
        ref_logprobs = self.reference_logprobs(seq, attn, P)
        response_ids = [seq[b, P:][mask[b]].tolist() for b in range(seq.shape[0])]
        ended = [bool(ids) and ids[-1] == eos_id for ids in response_ids]
        texts = [clean_response(self.tokenizer, ids)[0] for ids in response_ids]
        scored = rl.sequence_scores(self.score(batch_prompts, seq, attn, texts), torch.tensor(ended),
                                    missing_eos_penalty=ppo.missing_eos_penalty, clip=ppo.score_clip)
        scores = scored.clipped.to(device)

        # per-token rewards and advantages: GAE over the critic, or the prompt's other samples as baseline
        if ppo.rloo:  # the return is the leave-one-out score plus the KL-to-go
            shaped = rl.shaped_rewards(rl.leave_one_out(scores, ppo.samples_per_prompt), logprobs, ref_logprobs, mask,
                                       kl_coef=self.kl_ctl.value, kl_kind=ppo.kl_kind)
            adv = rl.gae(shaped.rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
        else:
            shaped = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=self.kl_ctl.value,
                                       kl_kind=ppo.kl_kind)
            adv = rl.gae(shaped.rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
        advantages = rl.masked_whiten(adv.advantages, mask) if ppo.whiten_advantages else adv.advantages
        models.module.train()

        stats = {"reward": scored.penalised.mean().item(), "kl": shaped.mean_kl.item(), "kl_coef": self.kl_ctl.value,
                 "entropy": rl.masked_mean(rl.entropy_from_logits(response_slice(logits, P)), mask).item(),
                 "response_tokens": mask.sum(1).float().mean().item(), "eos_rate": sum(ended) / len(ended),
                 "rollout_tokens_per_s": sampled_tokens / max(rollout_s, 1e-9)}
        if self.on_tasks:  # the checker's verdict on what was sampled
            stats["true_reward"] = sum(tasks.checker([prompt_text(x) for x in batch_prompts], texts)) / len(texts)
        old_logits = response_slice(logits, P) if ppo.variant == "reference" else None
        return Rollout(seq, attn, mask, logprobs, ref_logprobs, values, shaped.rewards, advantages,
                       adv.returns, scores, P, old_logits), stats

    def reference_logprobs(self, sequences: Tensor, attention_mask: Tensor, P: int) -> Tensor:
        """Log-probs of the response under the frozen SFT policy: the base with no scope, or its copy."""
        if self.models.reference is None:
            with lora_scope(self.models.palm, None):
                logits = self.models.palm(sequences, attention_mask=attention_mask)
        else:
            logits = self.models.reference(sequences, attention_mask=attention_mask)
        return rl.token_logprobs(response_slice(logits, P), sequences[:, P:])

    def score(self, batch_prompts: list, sequences: Tensor, attention_mask: Tensor, texts: list[str]) -> Tensor:
        """Raw scores (B,) on the CPU: the reward function's, or the reward model's at the last real token
        (normalised by its held-out mean and std when ppo.normalise_scores)."""
        models = self.models
        if models.reward_fn is not None:
            return torch.tensor([float(s) for s in models.reward_fn([prompt_text(x) for x in batch_prompts], texts)])
        with lora_scope(models.palm, REWARD) if models.shared_reward else nullcontext():
            out = models.reward_model(sequences, last_positions(attention_mask), attention_mask=attention_mask)
        raw = models.reward_model.scores(out).float().cpu()
        return models.reward_model.normalised(raw) if self.ppo.normalise_scores else raw

    def update(self, step: int, data: Rollout) -> dict:
        """`epochs` shuffled passes over the rollout in minibatches, one optimizer step each; the mean of each
        loss term over the iteration's updates."""
        ppo, sums = self.ppo, {}
        minibatch_loss = self.reference_minibatch_loss if ppo.variant == "reference" else self.minibatch_loss
        generator = torch.Generator(device="cpu").manual_seed(self.seed + step)  # randperm's order, then moved
        for _ in range(ppo.epochs):
            for idx in torch.randperm(ppo.rollout_batch, generator=generator).split(ppo.minibatch):
                idx = idx.to(self.dist.device)
                logits, values = self.engine(data.sequences[idx], data.attention_mask[idx])
                loss, parts = minibatch_loss(data, idx, response_slice(logits, data.prompt_length),
                                             response_slice(values, data.prompt_length))
                self.trainer.backward_step(loss)
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / ppo.updates_per_iter
        return sums

    def minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor, values: Tensor) -> tuple[Tensor, dict]:
        """Clipped policy loss − entropy bonus (+ clipped value loss with a critic); logits (b, N, V), values (b, N)."""
        ppo, mask = self.ppo, data.mask[idx]
        logprobs = rl.token_logprobs(logits, data.sequences[idx, data.prompt_length:])
        pol = rl.ppo_policy_loss(logprobs, data.logprobs[idx], data.advantages[idx], mask, clip_eps=ppo.clip_eps)
        entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask)
        loss = pol.loss - ppo.entropy_coef * entropy
        parts = {"policy_loss": pol.loss.item(), "clip_frac": pol.clip_frac.item(), "approx_kl": pol.approx_kl.item()}
        if not ppo.rloo:
            val = rl.ppo_value_loss(values, data.values[idx], data.returns[idx], mask, clip_eps=ppo.value_clip)
            loss = loss + ppo.vf_coef * val.loss
            parts.update(value_loss=val.loss.item(), explained_variance=val.explained_variance.item())
        return loss, parts

    def reference_minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor,
                                 values: Tensor) -> tuple[Tensor, dict]:
        """lucidrains' objective (ppo.variant=reference) for comparison; see rl.reference_variant_loss."""
        ppo, mask = self.ppo, data.mask[idx]
        out = rl.reference_variant_loss(logits, data.old_logits[idx], data.sequences[idx, data.prompt_length:],
                                        data.scores[idx], rl.masked_mean(values, mask, dim=1),
                                        rl.masked_mean(data.values[idx], mask, dim=1), mask, clip_eps=ppo.clip_eps,
                                        value_clip=ppo.value_clip, kl_coef=ppo.kl_coef, entropy_coef=ppo.entropy_coef)
        return out.loss, {"policy_loss": out.policy_loss.item(), "value_loss": out.value_loss.item(),
                          "clip_frac": out.clip_frac.item(), "entropy": out.entropy.item()}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The actor on the held-out task prompts (greedy accuracy, sampled true reward) and on its training prompts."""
        if not self.eval_examples:
            return {}
        score, sampled, train_sampled = self.true_reward(ACTOR if self.models.use_lora else None)
        self.trainer.manifest_extra["samples"] = score.samples
        return {"accuracy": score.accuracy, "sampled_reward": sampled, "train_sampled_reward": train_sampled,
                "format_rate": score.format_rate, "response_tokens": score.mean_length}

    def true_reward(self, scope: str | None):
        """(greedy task score, sampled true reward on held-out prompts, on training prompts) of `scope`'s policy."""
        max_new, temperature, palm = self.ppo.max_new_tokens, self.ppo.temperature, self.models.palm
        with self.policy_for_generation(), lora_scope(palm, scope):
            score = task_score(palm, self.tokenizer, self.eval_examples, max_new_tokens=max_new)
            sampled = sampled_reward(palm, self.tokenizer, self.eval_examples, max_new_tokens=max_new, seed=self.seed,
                                     temperature=temperature)
            train_sampled = sampled_reward(palm, self.tokenizer, self.pool_examples, samples=TRAIN_PROMPT_SAMPLES,
                                           max_new_tokens=max_new, seed=self.seed, temperature=temperature)
        return score, sampled, train_sampled

    def start_rows(self) -> dict:
        """The start summary; on the embedded tasks it first measures the SFT policy (the base, no scope)."""
        ppo, models = self.ppo, self.models
        scopes = (ACTOR, None if ppo.rloo else CRITIC, REWARD if models.shared_reward else None)
        rows = {"prompts": f"{len(self.prompts):,}", "reward": self.cfg.reward_fn or models.reward_path,
                "shared base (LoRA scopes)": ", ".join(s for s in scopes if s) if models.use_lora
                else f"no (full fine-tuning: separate reference{'' if ppo.rloo else ' and critic'})",
                "critic init": models.critic_from, "updates per iteration": ppo.updates_per_iter,
                "KL control": (f"adaptive, target {ppo.kl_target}" if ppo.kl_target is not None
                               else f"fixed β={ppo.kl_coef}")}
        if self.eval_examples:
            before, before_sampled, before_train = self.true_reward(None)
            self.trainer.manifest_extra.update(init_accuracy=before.accuracy, init_sampled_reward=before_sampled,
                                               init_train_sampled_reward=before_train)
            rows["SFT policy: sampled true reward on the training prompts"] = f"{before_train:.4f}"
            rows["SFT policy: greedy accuracy / sampled true reward"] = f"{before.accuracy:.4f} / {before_sampled:.4f}"
        return rows


def init_critic_from_reward(module: ActorCritic, reward_model: RewardModel, shared: bool) -> None:
    """InstructGPT's critic init: the value head (and, on a shared base, the critic scope) copy the reward model."""
    with torch.no_grad():
        module.value_head.load_state_dict(reward_model.reward_head.state_dict())
        if shared:
            own = dict(module.palm.named_parameters())
            for name, tensor in lora_state_dict(module.palm, REWARD).items():
                own[name.replace(f".{REWARD}", f".{CRITIC}")].copy_(tensor)


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
