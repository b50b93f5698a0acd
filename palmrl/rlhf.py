"""The online RLHF recipe PPO and GRPO share (stages/ppo.py, stages/grpo.py): models, sampling,
scoring, evaluation, checkpoints; the stages add their advantages and losses.

The recipe, in the order a stage's `run` calls it: the typed config section → `build_models`
(policy, LoRA scopes, reference, critic, reward model) → `build_data` (prompts, evaluation
examples, prompt order) → `build_trainer` → `Trainer.fit` over `step` (= the stage's `rollout`, the
divergence check, `update`, the KL controller) and `evaluate`. The math is rl/'s and reward.py's.

Models. With LoRA (the default) one frozen base holds the SFT policy; the actor and critic are
adapter scopes on it, the reference is the base with no scope, and a LoRA reward model whose base
is the same SFT checkpoint becomes a third scope: the base sits in memory once. With lora=none the
actor is fully trained and the reference and critic trunk are separate copies.
The critic (PPO with GAE) starts from the reward model (critic_init=reward, InstructGPT's choice):
the value head copies a pairwise reward head, and with a shared base the critic scope copies the
reward adapters too. critic_init=policy (or a binned reward model, or reward_fn) starts a fresh one.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import deepspeed
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from palmrl import checkpoint, rl, tasks
from palmrl.checkpoint import export_split
from palmrl.config import typed
from palmrl.data.chat import as_messages, clean_response, render_prompt
from palmrl.data.instructions import ShuffledBatches
from palmrl.data.preferences import load_prompts
from palmrl.engine import Hooks, Trainer
from palmrl.errors import TrainingDiverged, UserError
from palmrl.evaluate import sampled_reward, sampled_scores, task_score
from palmrl.generate import generate, seeded_generator
from palmrl.model.heads import ScalarHead
from palmrl.model.lora import LoRAConfig, add_lora, freeze_except_lora, lora_scope, lora_state_dict
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.model.registry import apply_lora
from palmrl.reward import RewardModel, last_positions, reward_model_from_checkpoint
from palmrl.runtime import Dist, init_distributed, mean_over_ranks, seed_everything

ACTOR, CRITIC, REWARD = "actor", "critic", "reward"
TRAIN_PROMPT_SAMPLES = 4  # samples per training prompt for its true reward (800 with 200 prompts)
POLICY_STAGES = ["sft", "pretrain", "ppo", "grpo", "dpo"]  # what an RL stage may start from


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

    def actor_logits(self, tokens: Tensor, attention_mask: Tensor, keep: slice | None = None,
                     shared_prefix: int = 0) -> Tensor:
        with lora_scope(self.palm, ACTOR if self.lora else None):  # (B, T, V), or the kept positions'
            return self.palm(tokens, attention_mask=attention_mask, keep=keep, shared_prefix=shared_prefix)

    def values(self, tokens: Tensor, attention_mask: Tensor, shared_prefix: int = 0) -> Tensor:
        if self.value_head is None:
            return torch.zeros(tokens.shape, device=tokens.device)
        trunk = self.palm if self.lora else self.critic_trunk
        with lora_scope(trunk, CRITIC if self.lora else None):
            hidden = trunk.trunk(tokens, attention_mask=attention_mask, shared_prefix=shared_prefix)  # (B, T, D)
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)

    def forward(self, tokens: Tensor, attention_mask: Tensor, keep: slice | None = None,
                shared_prefix: int = 0) -> tuple[Tensor, Tensor]:
        """(actor logits at the positions `keep` names (all: None), critic values (B, T)); `shared_prefix`
        (PaLM.trunk): the prompt block, computed once per distinct prompt in the batch."""
        return (self.actor_logits(tokens, attention_mask, keep, shared_prefix),
                self.values(tokens, attention_mask, shared_prefix))


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
    informative: Tensor | None = None  # (B,) bool, GRPO's dynamic sampling: rows of groups whose scores differ


class Sampled(NamedTuple):
    """One iteration's responses before any advantage: what PPO and GRPO share."""

    sequences: Tensor       # (B, P+N) left-padded prompt, response, pad after eos
    attention_mask: Tensor  # (B, P+N) bool
    mask: Tensor            # (B, N) bool, response tokens incl. eos
    prompt_length: int      # P
    logits: Tensor | None   # (B, N, V) the response's actor logits at sampling time (None once batches are gathered)
    logprobs: Tensor        # (B, N) actor log-probs at sampling time
    ref_logprobs: Tensor    # (B, N) frozen reference log-probs
    values: Tensor          # (B, N) critic values (zeros without a critic)
    scores: Tensor          # (B,) scores after the no-eos penalty and clip
    stats: dict             # reward, entropy, lengths, eos rate, rollout speed (+ true reward, behaviour rate)


def gather_rows(parts: Sequence[Sampled], picks: Sequence[tuple[int, Tensor]], pad_id: int) -> Sampled:
    """Rows of several Sampled batches as one: `picks` holds (part, row indices) in order. Prompt
    blocks are left-padded and responses right-padded to the widest part (a left-padded row gets the
    same logits; padding is masked everywhere). `logits` is not carried (None); stats are the first part's."""
    P = max(part.prompt_length for part in parts)
    N = max(part.mask.shape[1] for part in parts)

    def pad(x: Tensor, left: int, right: int, value) -> Tensor:
        shape = list(x.shape)
        pieces = []
        if left:
            pieces.append(x.new_full([shape[0], left, *shape[2:]], value))
        pieces.append(x)
        if right:
            pieces.append(x.new_full([shape[0], right, *shape[2:]], value))
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else x

    fields = {k: [] for k in ("sequences", "attention_mask", "mask", "logprobs", "ref_logprobs", "values", "scores")}
    for index, rows in picks:
        part = parts[index]
        left, right = P - part.prompt_length, N - part.mask.shape[1]
        fields["sequences"].append(pad(part.sequences[rows], left, right, pad_id))
        fields["attention_mask"].append(pad(part.attention_mask[rows], left, right, False))
        fields["mask"].append(pad(part.mask[rows], 0, right, False))
        for key in ("logprobs", "ref_logprobs", "values"):
            fields[key].append(pad(getattr(part, key)[rows], 0, right, 0.0))
        fields["scores"].append(part.scores[rows])
    cat = {k: torch.cat(v) for k, v in fields.items()}
    return Sampled(cat["sequences"], cat["attention_mask"], cat["mask"], P, None, cat["logprobs"],
                   cat["ref_logprobs"], cat["values"], cat["scores"], dict(parts[0].stats))


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


def response_positions(prompt_length: int) -> slice:
    """Positions whose outputs predict the response tokens: P-1 … P+N-2."""
    return slice(prompt_length - 1, -1)


def response_slice(x: Tensor, prompt_length: int) -> Tensor:
    """x (B, P+N, ...) at the positions that predict the response (B, N, ...)."""
    return x[:, response_positions(prompt_length)]


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



class OnlineRecipe(ABC):
    """The built state of one online RLHF run and its phases; the Trainer calls `step` and `evaluate`.

    A stage supplies `stage`, `critic`, `group`, the KL controller and its description, `rollout`
    (advantages from `sample_and_score`) and `minibatch_loss`; `self.ppo` is its typed config section.
    """

    stage = ""

    @property
    @abstractmethod
    def critic(self) -> bool:
        """Whether a learned value function trains beside the actor."""

    @property
    @abstractmethod
    def group(self) -> int:
        """Responses sampled per prompt (adjacent in the rollout)."""

    @abstractmethod
    def kl_controller(self): ...

    @abstractmethod
    def kl_description(self) -> str: ...

    @abstractmethod
    def critic_note(self) -> str: ...

    @abstractmethod
    def rollout(self, step: int) -> tuple[Rollout, dict]: ...

    @abstractmethod
    def minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor,
                       values: Tensor) -> tuple[Tensor, dict]: ...

    def __init__(self, cfg: DictConfig, ppo, dist: Dist):  # ppo: the stage's typed section (PPOConfig, GRPOConfig)
        self.cfg, self.ppo, self.dist, self.seed = cfg, ppo, dist, int(cfg.seed)
        self.policy_ckpt = checkpoint.load(cfg.policy, key="policy", stages=POLICY_STAGES,
                                           trust_remote_code=bool(cfg.trust_remote_code))
        self.tokenizer = self.policy_ckpt.tokenizer()
        self.models = self.build_models()
        self.build_data()
        self.kl_ctl = self.kl_controller()

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
            if self.critic:
                add_lora(palm, CRITIC, LoRAConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
                                                  targets=tuple(lora_spec["scopes"][ACTOR]["targets"])))
                lora_spec["scopes"][CRITIC] = lora_spec["scopes"][ACTOR]
            freeze_except_lora(palm)
        else:
            reference = copy.deepcopy(palm).eval().requires_grad_(False).to(self.dist.device)
            critic_trunk = copy.deepcopy(palm) if self.critic else None
        module = ActorCritic(palm, lora=use_lora, critic_trunk=critic_trunk, critic=self.critic)

        # the reward model is built after the value head: both draw their initial weights from the seeded RNG
        reward_model = self.build_reward_model(reward_ckpt, palm, shared) if reward_ckpt is not None else None
        from_reward = (self.critic and ppo.critic_init == "reward" and reward_model is not None
                       and rm_is_scalar(reward_model))
        if from_reward:
            init_critic_from_reward(module, reward_model, shared)
        critic_from = "reward model" if from_reward else "policy (fresh value head)"
        if not self.critic:
            critic_from = self.critic_note()
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
        self.order = ShuffledBatches(self.prompts, batch_size=self.ppo.rollout_batch // self.group,
                                pad_id=self.tokenizer.pad_id, seed=self.seed, rank=self.dist.rank,
                                world_size=self.dist.world_size)

    def build_trainer(self) -> Trainer:
        """The engine over the actor-critic; the frozen tensors are hashed now and again before the final save."""
        cfg, ppo, models = self.cfg, self.ppo, self.models
        self.ppo_facts = {"reward": models.reward_path, "reward_fn": cfg.reward_fn, "frozen_sha256": {}}
        if self.stage == "ppo":
            self.ppo_facts["variant"] = ppo.variant
        self.trainer = Trainer(
            cfg, self.dist, models.module, stage=self.stage, model_config=models.model_config.to_dict(),
            tokenizer=self.tokenizer, parent=self.policy_ckpt,
            tokens_per_step=ppo.rollout_batch * self.dist.world_size * ppo.max_new_tokens,
            optimizer_steps=int(cfg.train.max_steps) * ppo.updates_per_iter,
            hooks=Hooks(export=export_actor(models.use_lora), state=lambda: {"kl_ctl": self.kl_ctl.state_dict()},
                        load_state=self.load_stage_state, before_final_save=self.check_frozen),
            manifest_extra={"lora": models.actor_lora, self.stage: self.ppo_facts})
        self.match_engine_precision()
        self.frozen = [models.palm, models.reference, models.reward_model]  # whatever exists and must never move
        self.ppo_facts["frozen_sha256"]["before"] = frozen_digest(self.frozen)
        self.engine = self.trainer.engine
        self.zero3 = self.engine.zero_optimization_stage() == 3
        # ZeRO-3 forwards are collectives (every rank gathers each layer) unless the weights were gathered
        # for the whole rollout: only then may a rank stop decoding when its own rows are done
        self.independent_decoding = not (self.zero3 and self.dist.world_size > 1 and not self.ppo.gather_for_rollout)
        return self.trainer

    def match_engine_precision(self) -> None:
        """The frozen models outside the engine in the dtype the engine gave the actor (bf16 under
        `precision=bf16`, and `auto` on a GPU): the reward head reads the shared trunk's bf16 output,
        and the reference's log-probs are taken at the actor's precision, so that before any update
        the actor's and the reference's log-probs are equal and the KL is exactly 0."""
        models = self.models
        dtype = next(models.module.parameters()).dtype
        if models.reference is not None:
            models.reference.to(dtype)
        if models.reward_model is not None:  # a shared base is the engine's already: only its head
            (models.reward_model.reward_head if models.shared_reward else models.reward_model).to(dtype)

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
            raise TrainingDiverged(f"{self.stage}: a frozen tensor (reference, reward model or shared base) changed "
                                   "during training; this is a bug, please report it")

    # ---- one iteration -------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Rollout → divergence check → updates → KL controller: one PPO iteration."""
        data, stats = self.rollout(step)
        stats["kl"] = mean_over_ranks(stats["kl"])  # every rank: same β, same stop decision
        if not math.isfinite(stats["kl"]) or stats["kl"] > self.ppo.max_kl:
            knob = f"{self.stage}.{'beta' if self.stage == 'grpo' else 'kl_coef'}"
            raise TrainingDiverged(f"{self.stage}: mean KL {stats['kl']:.2f} exceeds {self.stage}.max_kl="
                                   f"{self.ppo.max_kl} at iteration {step}; {self.trainer.last_good()} (lower optim.lr "
                                   f"or raise {knob})")
        t0 = time.perf_counter()
        sums = self.update(step, data)
        stats["time_update_s"] = time.perf_counter() - t0
        self.kl_ctl.update(stats["kl"], self.ppo.rollout_batch * self.dist.world_size)
        return {**stats, **sums}

    @torch.no_grad()
    def sample_and_score(self, step: int, extra_round: int = 0) -> Sampled:
        """This iteration's prompts, `group` responses to each, their sampling-time and reference
        log-probs, values and scores: everything PPO and GRPO need before their advantages.
        `extra_round` > 0 (GRPO's dynamic sampling): as many other prompts, drawn at random for this
        step, round and rank (so a resumed run draws them again), with their own sampling seed."""
        ppo, models, device, eos_id = self.ppo, self.models, self.dist.device, self.tokenizer.eos_id
        # several responses to each prompt: contrasting them is the strongest signal a binary
        # reward gives, and the critic sees several outcomes of one state
        chosen = self.order.indices(step - 1)
        if extra_round:
            rng = np.random.default_rng([self.seed, step, extra_round, self.dist.rank])
            chosen = rng.choice(len(self.prompts), size=len(chosen), replace=len(chosen) > len(self.prompts)).tolist()
        indices = [i for i in chosen for _ in range(self.group)]
        batch_prompts = [self.prompts[i] for i in indices]
        generator = seeded_generator(self.seed * 1_000_003 + step * 101 + self.dist.rank + extra_round * 7919,
                                     self.dist.device)
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
        t0 = time.perf_counter()

        # sampling-time log-probs and values, the reference's log-probs, the scores
        # every forward computes a prompt's block once for its `group` responses (PaLM.trunk's shared_prefix)
        logits, values = self.engine(seq, attn, response_positions(P), P)  # logits (B, N, V): the response's only
        logprobs = rl.token_logprobs(logits, seq[:, P:])
        values = response_slice(values, P)
        ref_logprobs = self.reference_logprobs(seq, attn, P)
        response_ids = [seq[b, P:][mask[b]].tolist() for b in range(seq.shape[0])]
        ended = [bool(ids) and ids[-1] == eos_id for ids in response_ids]
        texts = [clean_response(self.tokenizer, ids)[0] for ids in response_ids]
        scored = rl.sequence_scores(self.score(batch_prompts, seq, attn, texts, P), torch.tensor(ended),
                                    missing_eos_penalty=ppo.missing_eos_penalty, clip=ppo.score_clip)
        score_s = time.perf_counter() - t0
        models.module.train()

        stats = {"reward": scored.penalised.mean().item(),
                 "entropy": rl.masked_mean(rl.entropy_from_logits(logits), mask).item(),
                 "response_tokens": mask.sum(1).float().mean().item(), "eos_rate": sum(ended) / len(ended),
                 "rollout_tokens_per_s": sampled_tokens / max(rollout_s, 1e-9),
                 # where an iteration's time goes (the update's share is added by step)
                 "time_generate_s": rollout_s, "time_score_s": score_s}
        if self.on_tasks:  # the checker's verdict on what was sampled, and how often it shows the behaviour
            prompts = [prompt_text(x) for x in batch_prompts]
            stats["true_reward"] = sum(tasks.checker(prompts, texts)) / len(texts)
            stats["behaviour_rate"] = sum(tasks.behaviour(prompts, texts)) / len(texts)
        return Sampled(seq, attn, mask, P, logits, logprobs, ref_logprobs, values, scored.clipped.to(device), stats)

    def reference_logprobs(self, sequences: Tensor, attention_mask: Tensor, P: int) -> Tensor:
        """Log-probs of the response under the frozen SFT policy: the base with no scope, or its copy."""
        if self.models.reference is None:
            with lora_scope(self.models.palm, None):
                logits = self.models.palm(sequences, attention_mask=attention_mask, keep=response_positions(P),
                                          shared_prefix=P)
        else:
            logits = self.models.reference(sequences, attention_mask=attention_mask, keep=response_positions(P),
                                           shared_prefix=P)
        return rl.token_logprobs(logits, sequences[:, P:])

    def score(self, batch_prompts: list, sequences: Tensor, attention_mask: Tensor, texts: list[str],
              prompt_length: int = 0) -> Tensor:
        """Raw scores (B,) on the CPU: the reward function's, or the reward model's at the last real token
        (normalised by its held-out mean and std when ppo.normalise_scores); `prompt_length`: the prompt
        block the model computes once per prompt (PaLM.trunk's shared_prefix)."""
        models = self.models
        if models.reward_fn is not None:
            return torch.tensor([float(s) for s in models.reward_fn([prompt_text(x) for x in batch_prompts], texts)])
        with lora_scope(models.palm, REWARD) if models.shared_reward else nullcontext():
            out = models.reward_model(sequences, last_positions(attention_mask), attention_mask=attention_mask,
                                      shared_prefix=prompt_length)
        raw = models.reward_model.scores(out).float().cpu()
        return models.reward_model.normalised(raw) if self.ppo.normalise_scores else raw

    def update(self, step: int, data: Rollout) -> dict:
        """`epochs` shuffled passes over the rollout in minibatches, one optimizer step each; the mean of each
        loss term over the iteration's updates."""
        ppo, sums = self.ppo, {}
        generator = torch.Generator(device="cpu").manual_seed(self.seed + step)  # randperm's order, then moved
        for _ in range(ppo.epochs):
            for idx in torch.randperm(ppo.rollout_batch, generator=generator).split(ppo.minibatch):
                idx = idx.to(self.dist.device)
                logits, values = self.engine(data.sequences[idx], data.attention_mask[idx],
                                             response_positions(data.prompt_length), data.prompt_length)
                loss, parts = self.minibatch_loss(data, idx, logits, response_slice(values, data.prompt_length))
                self.trainer.backward_step(loss)
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / ppo.updates_per_iter
        return sums

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The actor on the held-out task prompts (greedy accuracy, sampled true reward) and on its training prompts."""
        if not self.eval_examples:
            return {}
        score, sampled, train_sampled = self.true_reward(ACTOR if self.models.use_lora else None)
        self.trainer.manifest_extra["samples"] = score.samples
        return {"accuracy": score.accuracy, "sampled_reward": sampled.reward, "train_sampled_reward": train_sampled,
                "format_rate": score.format_rate, "response_tokens": score.mean_length,
                "behaviour_rate": sampled.behaviour}

    def true_reward(self, scope: str | None):
        """(greedy task score, sampled true reward and behaviour rate on held-out prompts, sampled true
        reward on training prompts) of `scope`'s policy."""
        max_new, temperature, palm = self.ppo.max_new_tokens, self.ppo.temperature, self.models.palm
        with self.policy_for_generation(), lora_scope(palm, scope):
            score = task_score(palm, self.tokenizer, self.eval_examples, max_new_tokens=max_new)
            sampled = sampled_scores(palm, self.tokenizer, self.eval_examples, max_new_tokens=max_new, seed=self.seed,
                                     temperature=temperature)
            train_sampled = sampled_reward(palm, self.tokenizer, self.pool_examples, samples=TRAIN_PROMPT_SAMPLES,
                                           max_new_tokens=max_new, seed=self.seed, temperature=temperature)
        return score, sampled, train_sampled

    def start_rows(self) -> dict:
        """The start summary; on the embedded tasks it first measures the SFT policy (the base, no scope)."""
        ppo, models = self.ppo, self.models
        scopes = (ACTOR, CRITIC if self.critic else None, REWARD if models.shared_reward else None)
        rows = {"prompts": f"{len(self.prompts):,}", "reward": self.cfg.reward_fn or models.reward_path,
                "shared base (LoRA scopes)": ", ".join(s for s in scopes if s) if models.use_lora
                else f"no (full fine-tuning: separate reference{' and critic' if self.critic else ''})",
                "critic init": models.critic_from, "updates per iteration": ppo.updates_per_iter,
                "KL control": self.kl_description()}
        if self.eval_examples:
            before, before_sampled, before_train = self.true_reward(None)
            self.trainer.manifest_extra.update(init_accuracy=before.accuracy, init_sampled_reward=before_sampled.reward,
                                               init_train_sampled_reward=before_train,
                                               init_behaviour_rate=before_sampled.behaviour)
            rows["SFT policy: sampled true reward on the training prompts"] = f"{before_train:.4f}"
            rows["SFT policy: greedy accuracy / sampled true reward / behaviour rate"] = (
                f"{before.accuracy:.4f} / {before_sampled.reward:.4f} / {before_sampled.behaviour:.4f}")
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


def run_online(cfg: DictConfig, recipe_cls: type[OnlineRecipe], settings_cls: type) -> Path:
    """A stage's `run`: its section typed (every check before anything is built), models then data
    (model initialisation draws from the seeded RNG), the start summary (on the embedded tasks the
    starting policy is measured once the engine exists, before updates), then the loop."""
    stage = recipe_cls.stage
    settings = typed(settings_cls, cfg[stage], key=stage)
    if cfg.data.get("kind") != "prompts":
        raise UserError(f"data: {stage} needs prompts (data=prompts|my_prompts), got kind={cfg.data.get('kind')}")
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    recipe = recipe_cls(cfg, settings, dist)
    trainer = recipe.build_trainer()
    start_rows = recipe.start_rows()
    return trainer.fit(recipe.step, recipe.evaluate, start_rows=start_rows)
