"""sft, reward and ppo beyond the pipeline's quality gates: LoRA freezing and merging, the binned
reward model, verifiable rewards, frozen models, bad input. (Exact resume after kill -9 and 2 ranks
under torchrun for every stage: test_reliability.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from palmrl.errors import UserError

from conftest import run_stage

SFT_SMALL = ["train.max_steps=6", "train.eval_every=0", "train.eval_examples=16", "train.log_every=1",
             "data.train_size=512", "data.val_size=12", "train.micro_batch_size=16"]  # a val set smaller than a batch works
REWARD_SMALL = ["train.max_steps=6", "train.eval_every=0", "train.log_every=1", "data.train_size=256",
                "data.val_size=64", "train.micro_batch_size=16"]
# the pipeline's task mix (configs/pipeline.yaml `tasks`), the tasks its SFT policy learnt
TASKS = "data.tasks=[count_letters,count_words,first_letter,last_letter,larger,capital,color,opposite]"
PPO_SMALL = ["train.max_steps=4", "train.eval_every=0", "train.eval_examples=16", "ppo.rollout_batch=16",
             "ppo.minibatch=8", "ppo.max_new_tokens=8", "train.save_every=0", "data.train_size=64"]


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_sft_lora_trains_adapters_only_and_merges_exactly(tiny_chain, tmp_path, dist_env):
    from palmrl import checkpoint
    from palmrl.checkpoint import model_from_checkpoint, policy_from_checkpoint

    out = run_stage("sft", [f"init_from={tiny_chain / 'pretrain'}", "lora=r8", f"out_dir={tmp_path / 'sft'}", *SFT_SMALL])
    base = load_file(tiny_chain / "pretrain" / "final" / "model.safetensors")
    assert load_file(out / "model.safetensors") == {}  # the frozen base is referenced, not written again
    after = checkpoint.load(out).weights()
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base), "base weights moved"
    adapters = load_file(out / "adapters.safetensors")
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k), "adapters did not train"

    ckpt = checkpoint.load(out, stages=["sft"])
    unmerged = model_from_checkpoint(ckpt).eval()
    merged, _ = policy_from_checkpoint(ckpt)
    tokens = torch.randint(7, 2048, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(unmerged(tokens), merged.eval()(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_a_lora_checkpoint_references_its_frozen_base_instead_of_rewriting_it(tiny_chain, tmp_path):
    """The tiny chain's PPO is LoRA on its full SFT policy: its model.safetensors holds none of the
    frozen base (the manifest names the base by path + sha256), and loading gives the whole model."""
    import shutil

    from palmrl import checkpoint
    from palmrl.errors import UserError

    lora, parent = checkpoint.load(tiny_chain / "ppo"), checkpoint.load(tiny_chain / "sft")
    base = lora.manifest["base"]
    assert base["sha256"] == parent.content_hash == checkpoint.load(base["path"]).content_hash
    own = lora._header_shapes(checkpoint.WEIGHTS)
    full = parent.weights()
    assert not set(own) & set(full)  # nothing of the base is written again
    assert (lora.path / checkpoint.WEIGHTS).stat().st_size < (parent.path / checkpoint.WEIGHTS).stat().st_size / 100
    weights = lora.weights()
    assert weights.keys() == full.keys() and all(torch.equal(weights[k], full[k]) for k in full)
    assert lora.weight_shapes() == {k: tuple(v.shape) for k, v in full.items()}
    assert lora.content_hash not in (parent.content_hash, lora.manifest["files"][checkpoint.WEIGHTS])

    def moved(edit) -> checkpoint.Checkpoint:
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(lora.path, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest["base"])
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return checkpoint.load(folder)

    gone = moved(lambda b: b.update(path=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match=r"its frozen base .*nowhere cannot be opened"):
        gone.weights()
    other = moved(lambda b: b.update(path=str((tiny_chain / "reward" / "final").resolve())))
    with pytest.raises(UserError, match="has changed since"):
        checkpoint.model_from_checkpoint(other)


@pytest.mark.integration
def test_sft_bad_input(tiny_chain, tmp_path, dist_env):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        run_stage("sft", [f"init_from={tiny_chain / 'pretrain'}", "data=my_instructions", f"data.path={bad}",
                          f"out_dir={tmp_path / 'x'}"])
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(UserError, match=r"missing\.jsonl:2.*output"):
        run_stage("sft", [f"init_from={tiny_chain / 'pretrain'}", "data=my_instructions", f"data.path={missing}",
                          "data.val_fraction=0.0", f"out_dir={tmp_path / 'y'}"])
    with pytest.raises(UserError, match="is a reward checkpoint"):
        run_stage("sft", [f"init_from={tiny_chain / 'reward'}", f"out_dir={tmp_path / 'z'}"])
    with pytest.raises(UserError, match="lora.rank"):
        run_stage("sft", [f"init_from={tiny_chain / 'pretrain'}", "lora.rank=4096", f"out_dir={tmp_path / 'w'}"])


# ---- reward ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_pairwise_loss_flips_when_halves_swap():
    from palmrl.reward import pairwise_loss

    chosen, rejected = torch.tensor([1.0, 0.5, -0.2]), torch.tensor([0.0, 1.0, -1.0])
    a, b = pairwise_loss(chosen, rejected), pairwise_loss(rejected, chosen)
    gap = chosen - rejected
    torch.testing.assert_close(a.loss, -torch.nn.functional.logsigmoid(gap).mean())
    torch.testing.assert_close(b.loss, -torch.nn.functional.logsigmoid(-gap).mean())
    assert a.accuracy.item() == pytest.approx(2 / 3) and b.accuracy.item() == pytest.approx(1 / 3)
    assert a.margin.item() == pytest.approx(-b.margin.item())


@pytest.mark.integration
def test_reward_lora_leaves_trunk_untouched(tiny_chain, tmp_path, dist_env):
    from palmrl import checkpoint
    from palmrl.checkpoint import policy_from_checkpoint

    out = run_stage("reward", [f"init_from={tiny_chain / 'sft'}", "lora=r8", "data.policy_negatives=0",
                               f"out_dir={tmp_path / 'rm'}", *REWARD_SMALL])
    reward = checkpoint.load(out, stages=["reward"])
    trunk = {k: v for k, v in reward.weights().items() if not k.startswith("reward_head.")}
    sft_policy, _ = policy_from_checkpoint(checkpoint.load(tiny_chain / "sft"))
    expected = {k: v.detach() for k, v in sft_policy.named_parameters()}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in trunk)
    assert reward.manifest["lora"]["scopes"]["reward"]["rank"] > 0



@pytest.mark.integration
def test_reward_bad_input(tiny_chain, tmp_path, dist_env):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p1", "chosen": "a", "rejected": "a"},
        {"prompt": "p2", "chosen": "good", "rejected": "bad"},
        {"prompt": "p3", "chosen": "x"},
    ]))
    with pytest.raises(UserError, match=r"pairs\.jsonl:3.*rejected"):
        run_stage("reward", [f"init_from={tiny_chain / 'sft'}", "data=my_prefs", f"data.path={pairs}",
                             "data.val_fraction=0.0", f"out_dir={tmp_path / 'a'}"])
    ratings = tmp_path / "ratings.jsonl"
    ratings.write_text(json.dumps({"prompt": "p", "response": "r", "rating": 9}) + "\n")
    with pytest.raises(UserError, match="rating"):
        run_stage("reward", [f"init_from={tiny_chain / 'sft'}", "data=my_ratings", f"data.path={ratings}",
                             "data.val_fraction=0.0", "reward.objective=binned", f"out_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError, match="is a ppo checkpoint"):
        run_stage("reward", [f"init_from={tiny_chain / 'ppo'}", f"out_dir={tmp_path / 'c'}"])


@pytest.mark.unit
def test_identical_pairs_are_dropped_and_counted(tmp_path):
    from palmrl.data.preferences import load_preference_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "same" if i % 2 else "good",
                                         "rejected": "same" if i % 2 else "bad"}) + "\n" for i in range(10)))
    kept, stats = load_preference_pairs({"source": "local", "path": str(pairs), "val_fraction": 0.0}, "train")
    assert stats["dropped_identical"] == 5 and len(kept) == 5


# ---- ppo -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_ppo_keeps_reference_and_reward_frozen(tiny_chain):
    from palmrl import checkpoint
    from palmrl.checkpoint import policy_from_checkpoint

    ppo = checkpoint.load(tiny_chain / "ppo", stages=["ppo"])
    frozen = ppo.manifest["ppo"]["frozen_sha256"]
    assert frozen["before"] == frozen["after"]
    sft_policy, _ = policy_from_checkpoint(checkpoint.load(tiny_chain / "sft"))
    base = ppo.weights()
    assert all(torch.equal(base[k], v.detach()) for k, v in sft_policy.named_parameters())
    assert any(v.abs().sum() > 0 for k, v in ppo.adapters().items() if "lora_B" in k), "actor did not move"


@pytest.mark.integration
def test_ppo_reference_variant_trains_through_its_own_loss(tiny_chain, tmp_path, dist_env, monkeypatch):
    """ppo.variant=reference end to end: every update goes through rl.reference_variant_loss (lucidrains'
    objective), the losses it reports are finite, and the actor moves."""
    from palmrl import checkpoint, rl

    calls = []
    real = rl.reference_variant_loss

    def spy(*args, **kwargs):
        calls.append(args[0].shape)  # the minibatch's response logits (b, N, V)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "reference_variant_loss", spy)
    out = run_stage("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={tiny_chain / 'reward'}", *PPO_SMALL,
                            "ppo.variant=reference", f"out_dir={tmp_path / 'lucidrains'}"])
    assert len(calls) == 4 * 2 * (16 // 8)  # iterations x epochs x minibatches, all through the variant's loss
    assert all(shape[0] == 8 for shape in calls)
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    assert len(rows) == 4
    for row in rows:
        assert "approx_kl" not in row and "explained_variance" not in row  # the standard loss's terms
        assert all(math.isfinite(row[k]) for k in ("loss", "policy_loss", "value_loss", "clip_frac", "entropy", "kl"))
        assert row["entropy"] > 0 and row["value_loss"] >= 0
    ppo = checkpoint.load(out)
    assert ppo.manifest["ppo"]["variant"] == "reference"
    assert any(v.abs().sum() > 0 for k, v in ppo.adapters().items() if "lora_B" in k), "actor did not move"


@pytest.mark.integration
@pytest.mark.parametrize("lora", ["r8", "none"])
def test_ppo_in_bf16_runs_its_frozen_models_at_the_actors_precision(tiny_chain, tmp_path, dist_env, lora,
                                                                     monkeypatch):
    """precision=bf16 (what `auto` picks on a GPU): DeepSpeed casts the actor to bf16 and the frozen models
    outside its engine follow: the reward head on the shared base (lora=r8; in fp32 it refused the bf16
    trunk's output), the separate reference and reward model (lora=none; an fp32 reference gave the
    first rollout a KL although actor and reference were the same policy). In both layouts every
    forward of the scoring (actor, critic, reference, reward model) and of the updates computes a
    prompt's block once for its responses (PaLM.trunk's shared_prefix)."""
    from palmrl import checkpoint
    from palmrl.model import palm
    from palmrl.rlhf import same_base

    reward = tiny_chain / "reward"  # its own base (the pipeline trains it with lora=none)
    if lora == "r8":  # a LoRA reward model on the SFT policy (`palmrl reward`'s default): PPO shares that base
        reward = run_stage("reward", [f"init_from={tiny_chain / 'sft'}", *REWARD_SMALL, "train.max_steps=2",
                                      "lora=r8", f"out_dir={tmp_path / 'reward'}"])
    assert same_base(checkpoint.load(reward), checkpoint.load(tiny_chain / "sft")) == (lora == "r8")

    grouped = []  # (rows, distinct prompt blocks) of each PPO forward that shares its prompts
    real = palm.distinct_prefixes

    def spy(tokens, attention_mask, P):
        found = real(tokens, attention_mask, P)
        grouped.append((tokens.shape[0], tokens.shape[0] if found is None else found[0].shape[0]))
        return found

    monkeypatch.setattr(palm, "distinct_prefixes", spy)
    out = run_stage("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={reward}", *PPO_SMALL,
                            "train.max_steps=2", "precision=bf16", f"lora={lora}", f"out_dir={tmp_path / lora}"])
    rows = [m for m in metrics(out.parent) if m["split"] == "train"]
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in ("loss", "kl", "reward", "value_loss"))
    assert rows[0]["kl"] == 0.0  # before any update the actor is the reference, to the last bit
    assert checkpoint.load(out).manifest["config"]["precision"] == "bf16"
    # 2 iterations: 4 scoring forwards over 16 rows (4 prompts x 4 responses), then 2 epochs x 2
    # minibatches of 8 rows x (actor, critic); 8 rows hold at most 4 prompts
    scoring, updates = [u for b, u in grouped if b == 16], [u for b, u in grouped if b == 8]
    assert len(grouped) == 24 and scoring == [4] * 8 and len(updates) == 16 and max(updates) <= 4


@pytest.mark.unit
def test_ppo_config_takes_the_yaml_section_and_names_bad_keys():
    from palmrl.config import typed
    from palmrl.stages.ppo import PPOConfig

    from conftest import compose

    section = compose("ppo").ppo
    assert set(section.keys()) == {f.name for f in dataclasses.fields(PPOConfig)}  # every key typed, no extra field
    ppo = typed(PPOConfig, section, key="ppo")
    assert ppo == PPOConfig()  # the dataclass defaults are the YAML's
    assert ppo.updates_per_iter == 2 * 128 // 32 and not ppo.rloo
    assert typed(PPOConfig, {"kl_target": 6, "kl_coef": 0}, key="ppo").kl_target == 6.0
    for values, culprit in [({"minibatch": 0}, "ppo.minibatch: must be >= 1"),
                            ({"rollout_batch": 20, "minibatch": 8}, "ppo.rollout_batch: must be a multiple of ppo.minibatch (8), got 20"),
                            ({"rollout_batch": 18, "minibatch": 6}, "ppo.samples_per_prompt: must divide ppo.rollout_batch (18), got 4"),
                            ({"advantage": "rloo", "samples_per_prompt": 1}, "ppo.samples_per_prompt: must be >= 2 with ppo.advantage=rloo"),
                            ({"advantage": "rloo", "variant": "reference"}, "ppo.variant: must be standard with ppo.advantage=rloo"),
                            ({"advantage": "vtrace"}, "ppo.advantage: must be one of gae, rloo"),
                            ({"variant": "trl"}, "ppo.variant: must be one of standard, reference"),
                            ({"critic_init": "zero"}, "ppo.critic_init"),
                            ({"kl_kind": "k9"}, "ppo.kl_kind: must be one of k1, k2, k3, abs"),
                            ({"kl_coef": -0.1}, "ppo.kl_coef: must be >= 0"),
                            ({"kl_target": 0}, "ppo.kl_target: must be > 0"),
                            ({"kl_horizon": 0}, "ppo.kl_horizon"),
                            ({"top_p": 0.0}, "ppo.top_p"),
                            ({"score_clip": -1.0}, "ppo.score_clip"),
                            ({"epochs": 1.5}, "ppo.epochs: expected an integer"),
                            ({"whiten_advantages": "yes"}, "ppo.whiten_advantages")]:
        with pytest.raises(UserError, match=re.escape(culprit)):
            typed(PPOConfig, values, key="ppo")


@pytest.mark.unit
def test_reward_model_normalises_by_its_held_out_statistics():
    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.reward import RewardModel, score

    torch.manual_seed(0)
    model = RewardModel(PaLM(ModelConfig(vocab_size=32, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=16)))
    model.score_mean.fill_(2.0)
    model.score_std.fill_(4.0)
    assert torch.equal(model.normalised(torch.tensor([2.0, 6.0, -2.0])), torch.tensor([0.0, 1.0, -1.0]))
    model.score_std.fill_(0.0)  # a degenerate held-out set: the std is floored at 1e-6, never a division by 0
    assert torch.isfinite(model.normalised(torch.tensor([3.0]))).all()
    model.score_std.fill_(4.0)
    tokens, mask = torch.randint(0, 32, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    assert torch.equal(score(model, tokens, mask, normalise=True), model.normalised(score(model, tokens, mask)))


@pytest.mark.integration
def test_ppo_bad_input(tiny_chain, tmp_path, dist_env):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="prompts"):
        run_stage("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={tiny_chain / 'reward'}", "data=my_prompts",
                          f"data.path={empty}", f"out_dir={tmp_path / 'a'}"])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 400}) + "\n")
    with pytest.raises(UserError, match="max_seq_len"):
        run_stage("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={tiny_chain / 'reward'}", "data=my_prompts",
                          f"data.path={long}", "data.val_fraction=0.0", f"out_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError, match="different tokenizer"):
        other = tmp_path / "other-reward"
        _reward_with_other_tokenizer(tiny_chain, other)
        run_stage("ppo", [f"policy={tiny_chain / 'sft'}", f"reward={other}", f"out_dir={tmp_path / 'c'}"])


def _reward_with_other_tokenizer(run_dir, folder):
    """A copy of the reward checkpoint whose tokenizer differs (the byte tokenizer)."""
    from palmrl import checkpoint
    from palmrl.tokenizer import byte_tokenizer

    src = checkpoint.load(run_dir / "reward")
    checkpoint.save(folder / "final", stage="reward", step=src.manifest["step"], weights=src.weights(),
                    adapters=src.adapters(), model_config=src.model_config, tokenizer=byte_tokenizer(),
                    extra={k: src.manifest[k] for k in ("lora", "reward")})


@pytest.mark.integration
def test_sample_best_of_n_keeps_the_top_score(tiny_chain, tmp_path):
    from conftest import palmrl_cli

    proc = palmrl_cli("sample", f"ckpt={tiny_chain / 'ppo'}", f"reward={tiny_chain / 'reward'}", "num_samples=4",
                      "best_of_n=true", "format=jsonl", "temperature=1.0", "prompt=What is the capital of France?",
                      "max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1 and len(rows[0]["all_scores"]) == 4
    assert rows[0]["score"] == pytest.approx(max(rows[0]["all_scores"]))
