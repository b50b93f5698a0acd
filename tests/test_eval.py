"""`palmrl eval`: the embedded checker tasks, a prompt/answer JSONL by exact match or a reward_fn,
perplexity on a text file; results JSON + markdown in the run folder, shown by `palmrl report`."""

from __future__ import annotations

import json

import pytest

import palmrl
from palmrl.report import eval_rows, read_evaluations
from palmrl.stages.eval import normalise_answer

from conftest import run_stage


@pytest.mark.unit
def test_exact_match_ignores_case_spaces_and_a_final_period():
    assert normalise_answer("  Paris. ") == normalise_answer("paris") == "paris"
    assert normalise_answer("New   York") == "new york"
    assert normalise_answer("Paris. Hope this helps!") != "paris"


@pytest.mark.integration
def test_eval_scores_checker_qa_and_perplexity_and_report_reads_them(tiny_chain, tmp_path, dist_env):
    sft = palmrl.load(tiny_chain / "sft")
    prompts = [f"What is the first letter of the word {w}?" for w in ("apple", "banana", "cherry", "dates")]
    replies = sft.generate(prompts, max_new_tokens=16, temperature=0)
    qa = tmp_path / "qa.jsonl"  # two answers are the model's own greedy replies, two cannot be
    qa.write_text("".join(json.dumps({"prompt": p, "answer": r if i % 2 == 0 else r + " not this"}) + "\n"
                          for i, (p, r) in enumerate(zip(prompts, replies))))
    text = tmp_path / "text.txt"
    text.write_text("hello there, how are you today? I am fine, thanks.")
    out = tmp_path / "eval"
    result = run_stage("eval", [f"ckpt={tiny_chain / 'sft'}", "tasks=[checker,qa,perplexity]", f"qa.path={qa}",
                                "qa.max_new_tokens=16", f"perplexity.path={text}", "checker.examples=16",
                                f"out_dir={out}"])
    data = json.loads(result.read_text())
    name = f"{tiny_chain.name}-sft"  # <run>-<stage>
    assert result.name == f"{name}.json" and (out / f"{name}.md").is_file()
    assert data["checkpoint"]["stage"] == "sft" and data["checkpoint"]["sha256"]
    checker = data["tasks"]["checker"]
    assert checker["examples"] == 16 and 0 <= checker["accuracy"] <= 1 and checker["per_task"]
    assert data["tasks"]["qa"]["exact_match"] == 0.5
    ppl = data["tasks"]["perplexity"]
    pre = palmrl.load(tiny_chain / "sft", chat=False)  # perplexity reads raw text: the same as logprobs of it
    assert ppl["nll"] * ppl["tokens"] == pytest.approx(-pre.logprobs([""], [text.read_text()])[0], rel=1e-4)

    by_fn = run_stage("eval", [f"ckpt={tiny_chain / 'sft'}", "tasks=[qa]", f"qa.path={qa}", "qa.max_new_tokens=16",
                               "qa.reward_fn=palmrl.tasks.checker", f"out_dir={tmp_path / 'fn'}"])
    assert json.loads(by_fn.read_text())["tasks"]["qa"]["metric"] == "reward"

    shown = eval_rows(read_evaluations(tmp_path))  # <run>/eval/*.json, as `palmrl report` reads them
    assert (name, "qa (4)", "exact_match", "0.5") in shown
