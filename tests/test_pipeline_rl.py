"""Quality gates that train further from the demo pipeline's checkpoints with the RL stages: PPO and
GRPO on a verifiable reward, and the stages' defaults on rewards written only for these tests.

The second file of quality gates (test_pipeline.py holds the rest): under `make test` (xdist,
--dist loadfile) it is scheduled last, so the worker that is free by then runs it beside the one
that built the demo pipeline (conftest.py). Both use the one `pipeline_run`.
"""

from __future__ import annotations

import functools

import pytest
from test_stages import TASKS, metrics

from conftest import run_stage


@pytest.mark.quality
def test_ppo_and_grpo_with_verifiable_reward_raise_true_reward(pipeline_run, tmp_path, dist_env):
    """PPO on the checker's reward (reward_fn=): the policy's expected true reward on its prompts
    rises by a clear margin in 16 iterations while the KL to the SFT reference stays bounded; GRPO
    on the same reward and budget gains at least as much, no slower."""
    from palmrl import checkpoint

    out = run_stage("ppo", [f"policy={pipeline_run / 'sft'}", "reward_fn=palmrl.tasks.checker", TASKS,
                            f"out_dir={tmp_path / 'rlvr'}", "data.train_size=64", "train.max_steps=16",
                            "train.eval_every=0", "train.eval_examples=64", "optim.lr=2e-3", "ppo.rollout_batch=64",
                            "ppo.minibatch=16", "ppo.epochs=2", "ppo.max_new_tokens=8", "train.save_every=0"])
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    assert len(rows) == 16 and all(0.0 <= r["true_reward"] <= 1.0 for r in rows)
    # with reward_fn the score is the checker's (minus the missing-eos penalty)
    assert all(r["reward"] == pytest.approx(r["true_reward"] - (1 - r["eos_rate"]), abs=1e-6) for r in rows)
    assert max(r["kl"] for r in rows) < 5.0
    # expected true reward on the 64 training prompts, 8 samples each (512 per policy: the
    # stage's own 2-sample figure moves by ±0.03 between equally good runs)
    before, after = (expected_true_reward(checkpoint.load(c), out.parent) for c in (pipeline_run / "sft", out))
    assert after >= before + 0.05, (before, after)

    # GRPO on the same reward, the same rollout budget (64 responses x 16 iterations, 4 per prompt):
    # a gain at least PPO's (within the 512-sample noise of the two measures) in no more wall time
    grpo = run_stage("grpo", [f"policy={pipeline_run / 'sft'}", "reward_fn=palmrl.tasks.checker", TASKS,
                              f"out_dir={tmp_path / 'rlvr-grpo'}", "data.train_size=64", "train.max_steps=16",
                              "train.eval_every=0", "train.eval_examples=64", "optim.lr=2e-3", "grpo.rollout_batch=64",
                              "grpo.group_size=4", "grpo.minibatch=16", "grpo.epochs=2", "grpo.max_new_tokens=8",
                              "grpo.dynamic_sampling=1", "train.save_every=0"])  # one rollout per iteration, as PPO
    grpo_after = expected_true_reward(checkpoint.load(grpo), grpo.parent)
    assert grpo_after - before >= (after - before) - 0.03, (before, after, grpo_after)
    walls = [checkpoint.load(c).manifest["wall_s"] for c in (out, grpo)]
    assert walls[1] <= walls[0] * 1.1, walls


def expected_true_reward(ckpt, ppo_dir, samples: int = 8) -> float:
    from types import SimpleNamespace

    from palmrl.checkpoint import policy_from_checkpoint
    from palmrl.data.preferences import load_prompts
    from palmrl.evaluate import sampled_reward
    from palmrl.rlhf import prompt_text

    from conftest import compose

    data = compose("ppo", [TASKS, "data.train_size=64"]).data
    examples = [SimpleNamespace(prompt=prompt_text(x)) for x in load_prompts(data, "train")]
    policy, _ = policy_from_checkpoint(ckpt)
    return sampled_reward(policy.eval(), ckpt.tokenizer(), examples, samples=samples, max_new_tokens=8, seed=1)


# ---- defaults that optimise a reward they were not tuned on ------------------------------------
# Two reward functions written only for this test: neither is the checker nor the embedded behaviour.

def brevity(prompts, responses):
    """Shorter replies score higher: 1 for an empty reply, 0 from 30 characters on."""
    return [1.0 - min(len(r), 30) / 30 for r in responses]


def has_digit(prompts, responses):
    """1 when the reply holds a digit anywhere."""
    return [float(any(c.isdigit() for c in r)) for r in responses]


@functools.cache  # the SFT policy's figure is shared by the parametrised runs
def held_out_mean(ckpt_dir, fn, samples: int = 2) -> float:
    from palmrl import checkpoint, tasks
    from palmrl.checkpoint import policy_from_checkpoint
    from palmrl.evaluate import respond

    examples = tasks.make_examples("test", 200, seed=0, tasks=TASKS.split("=", 1)[1].strip("[]").split(","))
    prompts = [ex.prompt for ex in examples for _ in range(samples)]
    ckpt = checkpoint.load(ckpt_dir)
    policy, _ = policy_from_checkpoint(ckpt)
    texts = respond(policy.eval(), ckpt.tokenizer(), prompts, max_new_tokens=16, temperature=1.0, seed=1).texts
    return sum(fn(prompts, texts)) / len(texts)


@pytest.mark.quality
@pytest.mark.parametrize("stage,reward", [("grpo", "brevity"), ("grpo", "has_digit"), ("ppo", "brevity"),
                                          ("ppo", "has_digit")])
def test_default_settings_optimise_rewards_they_were_not_tuned_on(pipeline_run, tmp_path, dist_env, stage, reward):
    """The stage's own defaults (configs/<stage>.yaml: iterations, β, lr, advantages) from the demo's SFT
    policy raise a new reward's mean on held-out prompts (200 x 2 samples) with the KL bounded.
    Measured (one thread): GRPO brevity 0.83 → 0.97, has_digit 0.37 → 0.97 (1.00 with seed=1); PPO
    brevity 0.83 → 0.91, has_digit 0.36 → 0.74 (0.71 and 0.72 with seed=1 and 2). has_digit is the hard
    one: a digit in a reply to a non-numeric task is rare under the SFT policy, so nearly every GRPO
    group scores all alike (no signal without dynamic sampling: 0.37 → 0.37), and PPO at its earlier lr
    of 1e-3 did not find it in 30 iterations (0.36 → 0.37, with gae or rloo)."""
    out = run_stage(stage, [f"policy={pipeline_run / 'sft'}", f"reward_fn=test_pipeline_rl.{reward}", TASKS,
                            "train.eval_every=0", "train.eval_examples=0", "train.save_every=0",
                            f"out_dir={tmp_path / stage}"])
    fn = globals()[reward]
    before, after = held_out_mean(pipeline_run / "sft", fn), held_out_mean(out, fn)
    assert after >= before + 0.05, (before, after)
    kls = [r["kl"] for r in metrics(out.parent) if r["split"] == "train"]
    assert len(kls) == 30 and max(kls) < 25.0, kls  # the default iterations, under the default max_kl (measured ≤ 8)
