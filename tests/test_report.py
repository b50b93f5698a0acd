"""`palmrl report`: numbers from a synthetic run folder, best-of-n with real tiny checkpoints, real PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from palmrl import checkpoint, tasks
from palmrl.errors import UserError
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.report import ReportSettings, best_of_n_table, find_stages, powers_of_two, write_report
from palmrl.tokenizer import byte_tokenizer

from conftest import compose

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = ReportSettings(prompts=8, max_n=4, max_new_tokens=6, samples=3)  # seconds, not minutes
TINY = ModelConfig(vocab_size=263, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=128)


def _metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save(folder: Path, stage: str, seed: int, metrics: dict, extra: dict, head: bool = False) -> None:
    torch.manual_seed(seed)
    model = PaLM(TINY)
    weights = dict(model.named_parameters())
    if head:  # a random (not zero-initialised) head, so the reward model's scores differ between responses
        weights["reward_head.proj.weight"] = torch.randn(1, TINY.dim)
        weights["reward_head.proj.bias"] = torch.zeros(1)
    checkpoint.save(folder / "final", stage=stage, step=10, weights=weights, model_config=TINY.to_dict(),
                    tokenizer=byte_tokenizer(), config={}, metrics=metrics, extra=extra)


PRETRAIN_VAL = {"loss": 4.5, "perplexity": 90.0, "unigram_loss": 5.25}
SFT_VAL = {"loss": 2.0, "accuracy": 0.25, "format_rate": 0.9, "response_tokens": 3.0}
REWARD_VAL = {"loss": 0.6, "accuracy": 0.75, "margin": 0.4, "score_mean": 0.1, "score_std": 1.2}
PPO_TRAIN = [{"step": i, "split": "train", "reward": 0.1 * i, "true_reward": 0.2 + 0.1 * i, "kl": 0.5 * i,
              "kl_coef": 0.05, "entropy": 3.0 - 0.1 * i, "response_tokens": 4.0, "eos_rate": 1.0,
              "time_generate_s": 2.0 * i, "time_score_s": 1.0, "time_update_s": 0.5 + i} for i in (1, 2, 3)]
PPO_VAL = {"accuracy": 0.5, "format_rate": 1.0, "response_tokens": 3.5}


def make_run(root: Path) -> Path:
    """runs/demo with all four trained stages: hand-written curves, real tiny checkpoints."""
    run = root / "runs" / "demo"
    (run / "tokenizer").mkdir(parents=True)
    byte_tokenizer().save(run / "tokenizer")
    _metrics(run / "pretrain", [{"step": s, "split": "train", "loss": 6.0 - s / 10} for s in range(10, 60, 10)]
             + [{"step": 50, "split": "val", **PRETRAIN_VAL}])
    _save(run / "pretrain", "pretrain", 0, PRETRAIN_VAL, {})
    _metrics(run / "sft", [{"step": 5, "split": "train", "loss": 3.0}, {"step": 10, "split": "train", "loss": 2.1},
                           {"step": 10, "split": "val", **SFT_VAL}])
    _save(run / "sft", "sft", 1, SFT_VAL, {"init_accuracy": 0.05, "samples": [], "lora": {}})
    _metrics(run / "reward", [{"step": 5, "split": "train", "loss": 0.69, "accuracy": 0.5},
                              {"step": 10, "split": "val", **REWARD_VAL}])
    _save(run / "reward", "reward", 2, REWARD_VAL,
          {"reward": {"objective": "pairwise", "num_bins": 5, "score_mean": 0.0, "score_std": 1.0}}, head=True)
    _metrics(run / "ppo", [*PPO_TRAIN, {"step": 3, "split": "val", **PPO_VAL}])
    _save(run / "ppo", "ppo", 3, PPO_VAL, {"init_accuracy": 0.25, "samples": [], "lora": {}})
    return run


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 8_000, f"{path.name} is only {len(data)} bytes: an empty figure?"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05, f"{path.name} is a blank image"


def test_report_puts_the_rl_stages_side_by_side(tmp_path):
    run = make_run(tmp_path)
    _metrics(run / "grpo", [*PPO_TRAIN, {"step": 3, "split": "val", **PPO_VAL, "behaviour_rate": 0.6}])
    _save(run / "grpo", "grpo", 4, {**PPO_VAL, "behaviour_rate": 0.6, "sampled_reward": 0.7},
          {"init_accuracy": 0.25, "init_behaviour_rate": 0.1, "init_sampled_reward": 0.65, "wall_s": 42.0, "lora": {}})
    dpo_val = {"loss": 0.5, "reward_accuracy": 0.8, "reward_margin": 0.3, "drift": -2.5, "accuracy": 0.5,
               "sampled_reward": 0.66, "behaviour_rate": 0.5}
    _metrics(run / "dpo", [{"step": s, "split": "train", "loss": 0.69 - s / 100, "reward_accuracy": 0.5 + s / 100}
                           for s in (1, 2, 3)] + [{"step": 3, "split": "val", **dpo_val}])
    _save(run / "dpo", "dpo", 5, dpo_val, {"init_accuracy": 0.25, "init_behaviour_rate": 0.1, "wall_s": 7.0,
                                           "dpo": {"loss": "sigmoid"}, "lora": {}})
    report = write_report(run, settings=ReportSettings(prompts=0, samples=2, max_new_tokens=4))
    assert [p.name for p in report.plots] == ["pretrain.png", "sft.png", "reward.png", "ppo.png", "grpo.png",
                                              "dpo.png", "rl.png"]
    for plot in report.plots[-3:]:
        assert_real_png(plot)
    md = report.markdown.read_text()
    assert "## RL stages side by side" in md
    assert "| grpo | 0.1 → 0.6 | 0.65 → 0.7 | — | 1.5 | 42 s |" in md
    assert "| dpo | 0.1 → 0.5 | — → 0.66 | — | -2.5 (drift) | 7 s |" in md
    assert set(report.data["samples"][0]) >= {"sft", "ppo", "grpo", "dpo"}  # every policy's greedy reply


def test_report_of_a_full_run(tmp_path):
    run = make_run(tmp_path)
    report = write_report(run, settings=SETTINGS)

    # every stage's plot and the best-of-n curve: real images, each linked from report.md
    names = ["pretrain.png", "sft.png", "reward.png", "ppo.png", "rl.png", "best_of_n.png"]
    assert [p.name for p in report.plots] == names
    md = report.markdown.read_text()
    for name in names:
        assert_real_png(run / "report" / name)
        assert f"]({name})" in md
    assert "| pretrain | val loss | 4.5 |" in md and "below by 0.75" in md

    # the per-stage numbers come from the manifests and metrics.jsonl
    data = json.loads(report.json.read_text())
    stages = data["stages"]
    assert list(stages) == ["tokenizer", "pretrain", "sft", "reward", "ppo"]
    assert stages["tokenizer"] == {**stages["tokenizer"], "kind": "byte", "vocab_size": 263}
    assert stages["pretrain"]["val_loss"] == 4.5 and stages["pretrain"]["below_unigram"] == pytest.approx(0.75)
    assert stages["sft"]["accuracy"] == 0.25 and stages["sft"]["init_accuracy"] == 0.05
    assert stages["reward"]["accuracy"] == 0.75 and stages["reward"]["chance"] == 0.5
    ppo = stages["ppo"]
    assert ppo["iterations"] == 3 and ppo["accuracy"] == 0.5 and ppo["init_accuracy"] == 0.25
    assert ppo["train_first"]["true_reward"] == pytest.approx(0.3) and ppo["train_last"]["kl"] == pytest.approx(1.5)
    # the phases: medians of iterations 2-3 (iteration 1 is a warm-up), and their table
    assert ppo["phases"] == {"generate": 5.0, "score": 1.0, "update": 3.0}
    assert "| ppo | 5.00 s (56%) | 1.00 s (11%) | 3.00 s (33%) | 9.00 s |" in md

    # best-of-n of the ppo policy ranked by the reward model: nested groups make the picked RM
    # score and the oracle non-decreasing in n; n = 1 has nothing to pick from
    best = data["best_of_n"]
    assert best["policy"] == "ppo" and best["prompts"] == 8 and best["samples_per_prompt"] == 4
    rows = best["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert all(0.0 <= r["true_reward"] <= r["oracle_true_reward"] <= 1.0 for r in rows)
    assert rows[0]["true_reward"] == rows[0]["oracle_true_reward"]
    rm = [r["rm_score"] for r in rows]
    assert rm == sorted(rm) and rm[0] < rm[-1], "the reward model's pick must score higher with more to pick from"
    assert [r["oracle_true_reward"] for r in rows] == sorted(r["oracle_true_reward"] for r in rows)

    # the same held-out prompts answered by the SFT and PPO policies, scored by the checker
    assert len(data["samples"]) == 3
    for s in data["samples"]:
        for policy in ("sft", "ppo"):
            assert s[policy]["score"] == tasks.check(s["prompt"], s[policy]["response"])
    assert data["notes"] == []


def test_best_of_n_table_picks_by_reward_model():
    correct = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float)  # (P=2, N=4)
    agrees = correct + 0.01 * torch.arange(4)  # the RM ranks correct answers first
    rows = best_of_n_table(agrees, correct, [1, 2, 4])
    assert [r.true_reward for r in rows] == [0.25, 0.5, 1.0]
    assert [r.oracle_true_reward for r in rows] == [0.25, 0.5, 1.0]
    contrary = best_of_n_table(-correct, correct, [1, 2, 4])  # the RM ranks correct answers last
    assert [r.true_reward for r in contrary] == [0.25, 0.0, 0.0]
    assert contrary[-1].rm_score == 0.0
    assert powers_of_two(8) == [1, 2, 4, 8] and powers_of_two(6) == [1, 2, 4, 6] and powers_of_two(1) == [1]
    with pytest.raises(UserError, match="max_n"):
        powers_of_two(0)


def test_partial_run_reports_what_exists(tmp_path):
    run = tmp_path / "runs" / "early"
    _metrics(run / "pretrain", [{"step": 10, "split": "train", "loss": 6.0}, {"step": 20, "split": "train", "loss": 5.0},
                                {"step": 20, "split": "val", **PRETRAIN_VAL}])
    (run / "report").mkdir()
    (run / "report" / "best_of_n.png").write_bytes(PNG_SIGNATURE)  # left from an older report
    report = write_report(run, settings=SETTINGS)
    assert [p.name for p in report.plots] == ["pretrain.png"]
    assert not (run / "report" / "best_of_n.png").exists()
    assert_real_png(run / "report" / "pretrain.png")
    data = json.loads(report.json.read_text())
    assert data["stages"]["pretrain"]["val_loss"] == 4.5  # no checkpoint: the last val line stands in
    assert data["stages"]["pretrain"]["final_checkpoint"] is None
    assert data["best_of_n"] is None and data["samples"] == []
    assert any("no sft/ or RL (ppo/, grpo/, dpo/)" in note for note in data["notes"])


def test_user_mistakes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        find_stages(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no stage folder"):
        find_stages(tmp_path / "empty")
    _metrics(tmp_path / "bad" / "sft", [{"step": 1, "split": "train", "loss": 1.0}])
    with open(tmp_path / "bad" / "sft" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not valid JSON"):
        find_stages(tmp_path / "bad")
    with pytest.raises(UserError, match="best_of_n.max_n must be >= 1"):
        ReportSettings(max_n=0)


def test_stage_entry_point(tmp_path, capsys):
    from palmrl.runtime import run_stage
    from palmrl.stages.report import run as report_run

    run = make_run(tmp_path)
    cfg = compose("report", [f"run_dir={run}", "best_of_n.prompts=2", "best_of_n.max_n=2",
                             "best_of_n.max_new_tokens=4", "samples=1"])
    assert cfg.out_dir == f"{run}/report"
    md = run_stage("report", cfg, report_run)
    assert md == run / "report" / "report.md" and md.is_file()
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"report: {md}"
    assert "best-of-n" in out and "pairwise" in out and "unigram baseline" in out
    assert [r["n"] for r in json.loads((run / "report" / "report.json").read_text())["best_of_n"]["rows"]] == [1, 2]
