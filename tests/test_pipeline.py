"""The main job: `palmrl pipeline` end to end on the embedded data, with every stage's quality gate.

One pipeline run (the test profile: the same code path, fewer steps) is shared by the quality
gates here and in test_stages.py through the `pipeline_run` fixture in conftest.py; the plumbing
tests use the session's `tiny_chain` instead.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_stages import TASKS, metrics

from conftest import run_stage

RL_KL_BOUND = 5.0  # nats per sequence on the rollouts (ppo.max_kl / grpo.max_kl stop a run at 25)


def manifest(run_dir, stage):
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())


@pytest.mark.quality
def test_pretrain_beats_unigram_baseline(pipeline_run):
    m = manifest(pipeline_run, "pretrain")["metrics"]
    assert m["loss"] < m["unigram_loss"] - 0.3, m


@pytest.mark.quality
def test_pretrain_validation_loss_drops(pipeline_run):
    out = pipeline_run / "pretrain"
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in line]
    first, last = val[0]["loss"], val[-1]["loss"]
    assert math.log(2048) - last > 2.0, f"val loss {last:.3f} barely below uniform {math.log(2048):.3f}"
    assert last < first - 0.3
    assert last < val[-1]["unigram_loss"], "a trained LM must beat the unigram baseline"

    final = out / "final"
    m = manifest(pipeline_run, "pretrain")
    assert m["stage"] == "pretrain" and m["step"] == 300  # configs/pipeline.yaml: train.max_steps=300
    assert m["metrics"]["loss"] == pytest.approx(last)
    assert {"model.safetensors", "model.yaml", "tokenizer.model", "manifest.json"} <= {p.name for p in final.iterdir()}
    assert (out / "step-000150").is_dir() and (out / "config.yaml").is_file()  # train.save_every=150


@pytest.mark.quality
def test_sft_raises_checker_accuracy(pipeline_run):
    sft = manifest(pipeline_run, "sft")
    acc, before = sft["metrics"]["accuracy"], sft["init_accuracy"]
    assert acc >= before + 0.15, (before, acc)
    assert sft["metrics"]["format_rate"] >= 0.9


@pytest.mark.quality
def test_reward_model_accuracy_above_chance(pipeline_run):
    acc = manifest(pipeline_run, "reward")["metrics"]["accuracy"]
    assert acc >= 0.70, acc


@pytest.mark.quality
def test_ppo_keeps_true_reward_within_the_kl_bound(pipeline_run):
    """PPO against the *learned* reward model keeps the policy's true reward (the task checker, which
    PPO never sees) on its prompts, with the KL to the SFT policy bounded and no critic (rloo).

    The reward model has learnt two things from the embedded preferences: right over wrong, and the
    courteous closing line over none; PPO spends its KL budget mostly on the second, which carries
    to every prompt (test_rl_learns_the_preferred_behaviour_on_held_out_prompts). The true reward on
    its own 200 first training prompts (4 fresh samples each, before and after) must not fall: the
    gain it made when the preferences held only facts (+0.015-0.04) is now in the noise. On held-out
    prompts it only must not collapse."""
    ppo = manifest(pipeline_run, "ppo")
    sft_acc = manifest(pipeline_run, "sft")["metrics"]["accuracy"]
    assert ppo["init_accuracy"] == pytest.approx(sft_acc, abs=0.02)  # same held-out measure, same policy
    before, after = ppo["init_train_sampled_reward"], ppo["metrics"]["train_sampled_reward"]
    assert after >= before - 0.03, (before, after)  # 800 samples a side: std of the difference ~0.016
    rows = [json.loads(line) for line in (pipeline_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if r["split"] == "train"]
    assert 0.0 < max(kls) < RL_KL_BOUND, kls  # nats per sequence (measured: up to ~1.2, the closing line's cost)
    assert ppo["config"]["ppo"]["advantage"] == "rloo" and not any("value_loss" in r for r in rows)  # no critic
    assert ppo["metrics"]["format_rate"] >= 0.9
    # held-out: 400 samples a side, so the difference has a noise std of ~0.03; "not collapsed" = within 3 of them
    assert ppo["metrics"]["sampled_reward"] >= ppo["init_sampled_reward"] - 0.1
    assert ppo["metrics"]["accuracy"] >= ppo["init_accuracy"] - 0.08


# The RL stages from the same SFT policy (the test pipeline runs rl=[ppo,grpo,dpo]): each must learn
# the behaviour the embedded preferences favour (closing an answer with "Hope this helps!", shown by
# ~12% of the SFT policy's samples) on held-out prompts it never trained on, keep the answers right,
# and stay near the SFT policy. Held-out: 200 prompts x 2 samples, so the rates move by ~±0.03.


@pytest.mark.quality
@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_rl_learns_the_preferred_behaviour_on_held_out_prompts(pipeline_run, stage):
    m = manifest(pipeline_run, stage)
    sft = manifest(pipeline_run, "sft")
    assert m["parent"]["path"].endswith("sft/final")  # all three start from the same SFT policy
    assert m["init_accuracy"] == pytest.approx(sft["metrics"]["accuracy"], abs=0.02)
    before, after = m["init_behaviour_rate"], m["metrics"]["behaviour_rate"]
    assert before < 0.25, before  # the SFT policy shows it only sometimes
    assert after >= before + 0.30, (before, after)
    # "kept": within two standard errors of a 200-prompt accuracy near 0.85 (2 x 0.025); across CPUs
    # (AVX-512 vs AVX2 kernels) the same run measured DPO at SFT - 0.005 and SFT - 0.04
    assert m["metrics"]["accuracy"] >= m["init_accuracy"] - 0.05, (m["init_accuracy"], m["metrics"]["accuracy"])
    assert m["metrics"]["format_rate"] >= 0.9
    if stage == "dpo":  # no rollouts: how far the policy moved on the held-out pairs, per reply
        assert -5.0 < m["metrics"]["drift"] < 5.0, m["metrics"]["drift"]
    else:
        kls = [r["kl"] for r in metrics(pipeline_run / stage) if r["split"] == "train"]
        assert max(kls) < RL_KL_BOUND, kls


@pytest.mark.quality
def test_best_of_n_not_worse_than_single_sample(pipeline_run):
    report = json.loads((pipeline_run / "report" / "report.json").read_text())
    curve = report["best_of_n"]
    rewards = {int(row["n"]): row["true_reward"] for row in curve["rows"]} if "rows" in curve else \
        {int(n): v["true_reward"] for n, v in curve.items()}
    ns = sorted(rewards)
    # 64 prompts, paired (the same prompts at every n): a margin for sampling noise, not for a worse reranker
    assert rewards[ns[-1]] >= rewards[ns[0]] - 0.03, rewards


@pytest.mark.quality
def test_report_lists_real_plots(pipeline_run):
    report_dir = pipeline_run / "report"
    text = (report_dir / "report.md").read_text()
    pngs = sorted(report_dir.glob("*.png"))
    assert pngs, "no plots"
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert png.name in text


@pytest.mark.integration
def test_rerun_skips_finished_stages(tiny_chain, tiny_chain_args, tmp_path):
    from conftest import palmrl_cli

    same = [arg for arg in tiny_chain_args if not arg.startswith("stages=")]
    proc = palmrl_cli("pipeline", *same, "stages=[pretrain,sft]", cwd=tiny_chain.parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pretrain: already done" in proc.stderr and "sft: already done" in proc.stderr


@pytest.mark.integration
def test_model_and_zero_choices_reach_the_stages(tmp_path):
    """`palmrl pipeline model=palm_small zero=stage2 …` (the issue's command): model= and zero= are
    config groups of the pipeline, passed on to the stages by name; a value inside them is refused."""
    from palmrl.tokenizer import Tokenizer

    from conftest import palmrl_cli

    proc = palmrl_cli("pipeline", "model=palm_small", "zero=stage2", "run_name=small", "stages=[tokenizer]",
                      "tokenizer.tokenizer.max_documents=500", cwd=tmp_path)  # 8192 pieces in seconds, not a minute
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model=palm_small" in proc.stderr  # the stage command the pipeline prints
    assert Tokenizer.load(tmp_path / "runs" / "small" / "tokenizer").vocab_size == 8192  # palm_small's vocabulary

    bad = palmrl_cli("pipeline", "model.dim=128", "run_name=small", cwd=tmp_path)
    assert bad.returncode == 2 and "pretrain.model.dim=" in bad.stderr, bad.stderr[-2000:]
    typo = palmrl_cli("pipeline", "model=palm_smal", "run_name=small", cwd=tmp_path)
    assert typo.returncode == 2 and "palm_smal" in typo.stderr


# quality gates that train further from the demo pipeline's checkpoints

@pytest.mark.quality
def test_binned_reward_orders_responses_by_rating(pipeline_run, tmp_path, dist_env):
    from palmrl import checkpoint
    from palmrl.data.preferences import load_ratings
    from palmrl.reward import reward_model_from_checkpoint, score_texts

    out = run_stage("reward", [f"init_from={pipeline_run / 'sft'}", "data=ratings", "reward.objective=binned",
                               "reward.num_bins=5", "lora=none", "optim.lr=1e-3", TASKS, f"out_dir={tmp_path / 'binned'}",
                               "train.max_steps=500", "train.eval_every=0", "data.train_size=6000", "data.val_size=200"])
    ckpt = checkpoint.load(out, stages=["reward"])
    rm = reward_model_from_checkpoint(ckpt)
    tasks = TASKS.split("=", 1)[1].strip("[]").split(",")
    rated = load_ratings({"source": "tasks", "val_size": 200, "seed": 0, "tasks": tasks}, "val", 5)
    scores = score_texts(rm, ckpt.tokenizer(), [r.prompt for r in rated], [r.response for r in rated], max_len=96)
    ratings = torch.tensor([r.rating for r in rated], dtype=torch.float)
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(scores), rank(ratings)]))[0, 1].item()
    assert spearman > 0.3, spearman  # measured 0.60
    top, bottom = scores[ratings == 5].mean(), scores[ratings <= 2].mean()
    assert top > bottom + 0.3, (top.item(), bottom.item())
    assert ckpt.manifest["metrics"]["accuracy"] > 1 / 5 + 0.1
