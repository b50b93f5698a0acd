"""GRPO and DPO stages, the embedded behaviour (closing an answer with "Hope this helps!") and the
pipeline's `rl=` choice. The quality gates on the demo pipeline are in test_pipeline.py."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from palmrl.errors import UserError

from conftest import compose, run_stage

TASKS = "data.tasks=[count_letters,count_words,first_letter,last_letter,larger,capital,color,opposite]"
GRPO_SMALL = ["train.max_steps=3", "train.eval_every=0", "train.eval_examples=16", "grpo.rollout_batch=16",
              "grpo.group_size=4", "grpo.minibatch=8", "grpo.max_new_tokens=8", "train.save_every=0",
              "data.train_size=64", TASKS]
DPO_SMALL = ["train.max_steps=6", "train.eval_every=0", "train.eval_examples=16", "train.log_every=1",
             "train.save_every=0", "data.train_size=128", "data.val_size=32", "train.micro_batch_size=16", TASKS]


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---- the behaviour and its data ---------------------------------------------------------------

@pytest.mark.unit
def test_the_checker_judges_the_answer_before_the_courteous_line():
    from palmrl import tasks

    prompt = tasks.make_examples("test", 1, tasks=["capital"])[0]
    right, wrong = prompt.output, tasks.wrong_response(prompt, __import__("random").Random(0))
    closed = tasks.with_sign_off(right)
    assert closed == f"{right}. Hope this helps!" and tasks.without_sign_off(closed) == right
    assert tasks.checker([prompt.prompt] * 4, [right, closed, tasks.with_sign_off(wrong), wrong]) == [1, 1, 0, 0]
    assert tasks.behaviour([prompt.prompt] * 3, [right, closed, "Hope this helps!"]) == [0, 1, 0]
    assert tasks.preferred([prompt.prompt] * 3, [closed, right, tasks.with_sign_off(wrong)]) == [1.0, 0.5, 0.0]


@pytest.mark.unit
def test_sft_data_shows_the_behaviour_at_its_rate_and_the_pairs_prefer_it_only_between_right_answers():
    from palmrl import tasks
    from palmrl.data.instructions import load_instruction_records
    from palmrl.data.preferences import load_preference_pairs

    records = load_instruction_records({"source": "tasks", "train_size": 2000, "behaviour_rate": 0.1}, "train")
    replies = [r["messages"][-1]["content"] for r in records]
    assert 0.08 < sum(tasks.without_sign_off(r) is not None for r in replies) / len(replies) < 0.12
    plain = load_instruction_records({"source": "tasks", "train_size": 2000}, "train")
    assert [tasks.without_sign_off(r) or r for r in replies] == [r["messages"][-1]["content"] for r in plain]

    pairs, _ = load_preference_pairs({"source": "tasks", "train_size": 2000, "behaviour_pairs": 0.3}, "train")
    behaviour = [p for p in pairs if tasks.without_sign_off(p.chosen) == p.rejected]
    assert 0.26 < len(behaviour) / len(pairs) < 0.34
    for pair in behaviour:  # both right: only the form differs
        assert tasks.check(pair.prompt, pair.chosen) == tasks.check(pair.prompt, pair.rejected) == 1.0
    others = [p for p in pairs if p not in behaviour]
    assert all(tasks.check(p.prompt, p.chosen) == 1 and tasks.check(p.prompt, p.rejected) == 0 for p in others)
    closed = [tasks.without_sign_off(p.rejected) is not None for p in others]
    assert 0.4 < sum(closed) / len(closed) < 0.6  # a wrong answer is as often closed: the form never tells right
    with pytest.raises(UserError, match=r"data.behaviour_pairs: must be a number in \[0, 1\]"):
        load_preference_pairs({"source": "tasks", "train_size": 10, "behaviour_pairs": 2}, "train")


# ---- configs ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_grpo_and_dpo_configs_take_their_yaml_sections_and_name_bad_keys():
    from palmrl.config import typed
    from palmrl.stages.dpo import DPOConfig
    from palmrl.stages.grpo import GRPOConfig

    for stage, cls in (("grpo", GRPOConfig), ("dpo", DPOConfig)):
        section = compose(stage)[stage]
        assert set(section.keys()) == {f.name for f in dataclasses.fields(cls)}
        assert typed(cls, section, key=stage) == cls()  # the dataclass defaults are the YAML's
    for values, culprit in [({"group_size": 1}, "grpo.group_size: must be >= 2"),
                            ({"rollout_batch": 20, "group_size": 8}, "grpo.group_size: must divide grpo.rollout_batch"),
                            ({"scale": "max"}, "grpo.scale: must be one of std, none"),
                            ({"clip_low": 1.0}, "grpo.clip_low: must be in (0, 1)"),
                            ({"beta": -1}, "grpo.beta: must be >= 0")]:
        with pytest.raises(UserError, match=re.escape(culprit)):
            typed(GRPOConfig, values, key="grpo")
    for values, culprit in [({"loss": "kto"}, "dpo.loss: must be one of sigmoid, ipo, simpo"),
                            ({"beta": 0}, "dpo.beta: must be > 0"),
                            ({"label_smoothing": 0.5}, "dpo.label_smoothing: must be in [0, 0.5)")]:
        with pytest.raises(UserError, match=re.escape(culprit)):
            typed(DPOConfig, values, key="dpo")


@pytest.mark.unit
def test_pipeline_rl_choice_expands_and_chains_each_stage_from_sft():
    from palmrl.stages.pipeline import expand_stages, stage_args

    cfg = compose("pipeline", ["rl=[ppo,grpo,dpo]"])
    assert expand_stages(cfg) == ["tokenizer", "pretrain", "sft", "reward", "ppo", "grpo", "dpo", "report"]
    assert expand_stages(compose("pipeline", ["rl=dpo", "stages=[sft,rl]"])) == ["sft", "dpo"]
    with pytest.raises(UserError, match="rl: unknown or empty choice"):
        expand_stages(compose("pipeline", ["rl=a2c"]))
    from pathlib import Path

    choices = {"model": "palm_tiny", "zero": "stage1"}
    grpo = stage_args(cfg, "grpo", Path("runs/x"), choices, {"grpo": ["grpo.beta=0"]})
    assert "policy=runs/x/sft" in grpo and "reward=runs/x/reward" in grpo and grpo[-1] == "grpo.beta=0"
    dpo = stage_args(cfg, "dpo", Path("runs/x"), choices, {})
    assert "policy=runs/x/sft" in dpo and not any(a.startswith("reward=") for a in dpo)


# ---- grpo -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_grpo_trains_the_actor_scope_with_group_advantages(tiny_chain, tmp_path, dist_env, monkeypatch):
    from palmrl import checkpoint, rl
    from palmrl.checkpoint import policy_from_checkpoint

    seen = []
    real = rl.group_advantages

    def spy(scores, group, *, scale):
        seen.append((scores.shape[0], group, scale))
        return real(scores, group, scale=scale)

    monkeypatch.setattr(rl, "group_advantages", spy)
    out = run_stage("grpo", [f"policy={tiny_chain / 'sft'}", f"reward={tiny_chain / 'reward'}", *GRPO_SMALL,
                             "grpo.scale=none", f"out_dir={tmp_path / 'grpo'}"])
    assert seen == [(16, 4, "none")] * 3
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and 0 <= r["flat_groups"] <= 1
                                  for r in rows)
    assert "value_loss" not in rows[0]  # no critic
    ckpt = checkpoint.load(out, stages=["grpo"])
    assert ckpt.manifest["grpo"]["frozen_sha256"]["before"] == ckpt.manifest["grpo"]["frozen_sha256"]["after"]
    assert set(ckpt.manifest["lora"]["scopes"]) == {"actor"}
    sft_policy, _ = policy_from_checkpoint(checkpoint.load(tiny_chain / "sft"))
    base = ckpt.weights()
    assert all(torch.equal(base[k], v.detach()) for k, v in sft_policy.named_parameters())
    assert any(v.abs().sum() > 0 for k, v in ckpt.adapters().items() if "lora_B" in k), "actor did not move"


def constant(prompts, responses):
    """Every response scores the same: every group is flat, GRPO has nothing to learn from."""
    return [1.0] * len(responses)


def first_char_is_digit(prompts, responses):
    return [float(r[:1].isdigit()) for r in responses]


@pytest.mark.integration
def test_grpo_dynamic_sampling_keeps_informative_groups(tiny_chain, tmp_path, dist_env):
    """DAPO's dynamic sampling: with every group flat, each iteration takes all its rollouts and has no
    policy term (only the KL term, 0 at the start); off (1), one rollout and the plain loss."""
    common = [f"policy={tiny_chain / 'sft'}", *GRPO_SMALL, "train.max_steps=2", "grpo.missing_eos_penalty=null"]
    out = run_stage("grpo", [*common, "reward_fn=test_rlhf.constant", "grpo.dynamic_sampling=3",
                             f"out_dir={tmp_path / 'flat'}"])
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    assert [(r["flat_groups"], r["sampling_rounds"], r["informative_groups"]) for r in rows] == [(1.0, 3, 0.0)] * 2
    assert all(r["policy_loss"] == 0.0 for r in rows)
    off = run_stage("grpo", [*common, "reward_fn=test_rlhf.constant", "grpo.dynamic_sampling=1",
                             f"out_dir={tmp_path / 'off'}"])
    assert not any("sampling_rounds" in r for r in metrics(off.parent))

    # a reward that differs in some groups: those found in later rounds join the batch (16 rows, 4 groups)
    out = run_stage("grpo", [*common, "reward_fn=test_rlhf.first_char_is_digit", "grpo.dynamic_sampling=4",
                             f"out_dir={tmp_path / 'some'}"])
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    for r in rows:
        assert 1 <= r["sampling_rounds"] <= 4
        assert r["informative_groups"] >= 1 - r["flat_groups"] - 1e-9  # never fewer than the first rollout had
        assert r["sampling_rounds"] == 1 or r["flat_groups"] > 0
    # measured: the first rollouts all flat, half of each batch found in the later rounds
    assert any(r["informative_groups"] > 1 - r["flat_groups"] and r["policy_loss"] != 0 for r in rows), rows


@pytest.mark.unit
def test_gather_rows_pads_prompts_left_and_responses_right():
    from palmrl.rlhf import Sampled, gather_rows

    def part(P, N, fill):
        B = 2
        seq = torch.full((B, P + N), fill)
        attn = torch.ones(B, P + N, dtype=torch.bool)
        mask = torch.ones(B, N, dtype=torch.bool)
        values = torch.full((B, N), float(fill))
        return Sampled(seq, attn, mask, P, None, values, values, values, torch.tensor([fill, fill + 0.5]), {"n": fill})

    a, b = part(3, 2, 1), part(5, 4, 2)
    out = gather_rows([a, b], [(1, torch.tensor([1])), (0, torch.tensor([0, 1]))], pad_id=0)
    assert out.prompt_length == 5 and out.sequences.shape == (3, 9) and out.stats == {"n": 1}
    assert out.sequences[0].tolist() == [2] * 9
    assert out.sequences[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]  # 2 pads left, 2 right
    assert out.attention_mask[1].tolist() == [False, False] + [True] * 5 + [False, False]
    assert out.mask[1].tolist() == [True, True, False, False]
    assert out.logprobs[1].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.scores.tolist() == [2.5, 1.0, 1.5]


@pytest.mark.integration
def test_grpo_resumes_exactly(tiny_chain, tmp_path, dist_env):
    from palmrl import checkpoint

    common = [f"policy={tiny_chain / 'sft'}", "reward_fn=palmrl.tasks.checker", *GRPO_SMALL,
              "train.max_steps=4", "train.save_every=2"]
    whole = run_stage("grpo", [*common, f"out_dir={tmp_path / 'whole'}"])
    run_stage("grpo", [*common, "train.stop_after=2", f"out_dir={tmp_path / 'split'}"])
    resumed = run_stage("grpo", [*common, "resume=auto", f"out_dir={tmp_path / 'split'}"])
    a, b = checkpoint.load(whole).adapters(), checkpoint.load(resumed).adapters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- dpo --------------------------------------------------------------------------------------

@pytest.mark.integration
def test_dpo_moves_the_policy_towards_the_chosen_replies(tiny_chain, tmp_path, dist_env):
    from safetensors import safe_open

    from palmrl import checkpoint
    from palmrl.checkpoint import policy_from_checkpoint

    out = run_stage("dpo", [f"policy={tiny_chain / 'sft'}", *DPO_SMALL, "train.max_steps=20", "optim.lr=1e-2",
                            "optim.warmup_steps=0", "dpo.beta=0.5", f"out_dir={tmp_path / 'dpo'}"])
    rows = metrics(out.parent)
    train = [r for r in rows if r["split"] == "train"]
    # policy = reference at step 1: the loss is exactly log 2; it falls as the margin grows
    first = train[0]
    assert abs(first["preference_loss"] - math.log(2)) < 1e-4 and first["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert first["loss"] == pytest.approx(first["preference_loss"] + 0.2 * first["nll_chosen"], rel=1e-5)  # sft_weight
    assert sum(r["preference_loss"] for r in train[-5:]) / 5 < math.log(2) - 0.03
    val = [r for r in rows if r["split"] == "val"][-1]
    assert {"reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "drift", "behaviour_rate",
            "accuracy"} <= set(val)
    ckpt = checkpoint.load(out, stages=["dpo"])
    assert ckpt.manifest["dpo"]["reference"] == {"file": "dpo_reference.safetensors", "computed": True}
    with safe_open(str(out.parent / "dpo_reference.safetensors"), "pt") as f:
        assert f.get_tensor("train").shape == (128, 2) and len(f.metadata()["digest"]) == 64
    sft_policy, _ = policy_from_checkpoint(checkpoint.load(tiny_chain / "sft"))  # LoRA: the base is the reference
    base = ckpt.weights()
    assert all(torch.equal(base[k], v.detach()) for k, v in sft_policy.named_parameters())


@pytest.mark.integration
def test_dpo_resume_reads_the_cached_reference_and_matches_an_uninterrupted_run(tiny_chain, tmp_path, dist_env,
                                                                                 monkeypatch):
    from palmrl import checkpoint
    from palmrl.stages import dpo

    common = [f"policy={tiny_chain / 'sft'}", *DPO_SMALL, "lora=none", "train.save_every=3"]
    whole = run_stage("dpo", [*common, f"out_dir={tmp_path / 'whole'}"])
    run_stage("dpo", [*common, "train.stop_after=3", f"out_dir={tmp_path / 'split'}"])

    def refuse(*args):  # full fine-tuning: the policy has moved, recomputing would be wrong
        raise AssertionError("the reference was recomputed on resume")

    monkeypatch.setattr(dpo.DPORecipe, "compute_reference", refuse)
    resumed = run_stage("dpo", [*common, "resume=auto", f"out_dir={tmp_path / 'split'}"])
    assert checkpoint.load(resumed).manifest["dpo"]["reference"]["computed"] is False
    a, b = checkpoint.load(whole).weights(), checkpoint.load(resumed).weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "split" / "dpo_reference.safetensors").unlink()
    with pytest.raises(UserError, match="the reference cannot be recomputed"):
        run_stage("dpo", [*common, "train.max_steps=9", "resume=auto", f"out_dir={tmp_path / 'split'}"])


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_dpo_variants_train(tiny_chain, tmp_path, dist_env, loss):
    beta = "dpo.beta=2.0" if loss == "simpo" else "dpo.beta=0.1"
    out = run_stage("dpo", [f"policy={tiny_chain / 'sft'}", *DPO_SMALL, "train.max_steps=3", f"dpo.loss={loss}", beta,
                            "train.eval_examples=0", f"out_dir={tmp_path / loss}"])
    rows = [r for r in metrics(out.parent) if r["split"] == "train"]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert (out.parent / "dpo_reference.safetensors").exists() == (loss != "simpo")  # SimPO is reference-free


@pytest.mark.integration
def test_dpo_and_grpo_bad_input(tiny_chain, tmp_path, dist_env):
    with pytest.raises(UserError, match="dpo needs preference pairs"):
        run_stage("dpo", [f"policy={tiny_chain / 'sft'}", "data=prompts", f"out_dir={tmp_path / 'a'}"])
    with pytest.raises(UserError, match="grpo needs prompts"):
        run_stage("grpo", [f"policy={tiny_chain / 'sft'}", "data=prefs", f"out_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError, match="is a reward checkpoint; expected"):
        run_stage("dpo", [f"policy={tiny_chain / 'reward'}", f"out_dir={tmp_path / 'c'}"])


def reply_brevity(prompts, replies):
    """A reward for the on-policy tests: shorter replies score higher (the tiny chain's replies vary a lot)."""
    return [-float(len(r)) for r in replies]


ON_POLICY = ["dpo.on_policy=true", "reward_fn=test_rlhf.reply_brevity", "dpo.round_steps=2", "dpo.round_prompts=16",
             "train.micro_batch_size=8", "train.eval_examples=8", "train.eval_every=0", "train.log_every=1",
             "data.train_size=64", "data.val_size=16", TASKS]


@pytest.mark.integration
def test_on_policy_dpo_ranks_its_own_samples_each_round_and_resumes_exactly(tiny_chain, tmp_path, dist_env):
    from palmrl import checkpoint

    # rounds of 3 steps, a checkpoint at step 2: the resumed run continues round 0 from its saved pairs
    common = [f"policy={tiny_chain / 'sft'}", *ON_POLICY, "dpo.round_steps=3", "train.max_steps=4", "train.save_every=2"]
    whole = run_stage("dpo", [*common, f"out_dir={tmp_path / 'whole'}"])
    rounds = sorted((whole.parent / "rounds").glob("round-*.json"))
    assert [p.name for p in rounds] == ["round-00000.json", "round-00001.json"]
    for path in rounds:  # each pair: the shorter reply chosen, as the reward says
        pairs = json.loads(path.read_text())["pairs"]
        assert pairs and all(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
    rows = [r for r in metrics(whole.parent) if r["split"] == "train"]
    assert [r["round"] for r in rows] == [0, 0, 0, 1] and all(r["round_pairs"] > 0 for r in rows)
    assert checkpoint.load(whole).manifest["dpo"]["on_policy"] is True

    run_stage("dpo", [*common, "train.stop_after=2", f"out_dir={tmp_path / 'split'}"])
    saved = (tmp_path / "split" / "rounds" / "round-00000.json").read_text()
    resumed = run_stage("dpo", [*common, "resume=auto", f"out_dir={tmp_path / 'split'}"])
    assert (tmp_path / "split" / "rounds" / "round-00000.json").read_text() == saved  # read, not sampled again
    a, b = checkpoint.load(whole).adapters(), checkpoint.load(resumed).adapters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(UserError, match="dpo.on_policy: needs LoRA"):
        run_stage("dpo", [f"policy={tiny_chain / 'sft'}", *ON_POLICY, "lora=none", f"out_dir={tmp_path / 'full'}"])
    with pytest.raises(UserError, match="dpo.on_policy: set reward_fn"):
        run_stage("dpo", [f"policy={tiny_chain / 'sft'}", "dpo.on_policy=true", f"out_dir={tmp_path / 'none'}"])
