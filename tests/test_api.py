"""palmrl from Python (palmrl/api.py): docs/api.md's example runs as written; generate, logprobs and
score agree with what the stages compute; errors name the problem."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_serve import tiny_checkpoint

import palmrl
from palmrl.errors import UserError

from conftest import CONFIG_DIR

DOC = Path(__file__).parents[1] / "docs" / "api.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.integration
def test_the_documented_example_runs_as_written(tiny_chain, tmp_path):
    runs = tmp_path / "runs" / "default"
    for stage in ("tokenizer", "pretrain", "sft", "reward"):
        shutil.copytree(tiny_chain / stage, runs / stage)
    blocks = doc_blocks()
    assert len(blocks) == 2
    env = {k: v for k, v in os.environ.items()  # a fresh process: none of this one's torch.distributed settings
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**env, "PALMRL_CONFIG_DIR": str(CONFIG_DIR), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("palmrl.LLM(") and "stage='sft'" in lines[0]
    assert any(line.endswith("runs/notebook/sft/final") for line in lines), lines
    assert "sft 10" in lines
    assert (tmp_path / "runs" / "notebook" / "sft" / "final" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return {stage: palmrl.load(tiny_checkpoint(root / stage, stage=stage, max_seq_len=64))
            for stage in ("sft", "pretrain")}


@pytest.mark.unit
@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_logprobs_equal_a_token_by_token_computation(policies, stage):
    """Independent of the batched path: feed each prefix, read the next token's log-softmax."""
    llm = policies[stage]
    prompts, responses = ["What is 2 + 2?", "Name a colour."], ["4", "blue, I think"]
    got = llm.logprobs(prompts, responses)
    per_token = llm.logprobs(prompts, responses, per_token=True)
    tok = llm.tokenizer
    for prompt, response, total, pieces in zip(prompts, responses, got, per_token):
        if llm.chat:
            head = llm._prompt_ids(prompt)
            tail = tok.encode(response) + [tok.eos_id]  # the reply and the eos that closes it
        else:
            head, tail = [tok.bos_id, *tok.encode(prompt)], tok.encode(response)
        expected = []
        with torch.no_grad():
            for i, token in enumerate(tail):
                logits = llm.model(torch.tensor([head + tail[:i]]))[0, -1]
                expected.append(torch.log_softmax(logits.float(), -1)[token].item())
        assert pieces == pytest.approx(expected, abs=1e-4)
        assert total == pytest.approx(sum(expected), abs=1e-4)


@pytest.mark.unit
def test_generate_shapes_seeds_and_greedy(policies):
    llm = policies["sft"]
    one = llm.generate("hello", max_new_tokens=6, seed=3)
    assert isinstance(one, str) and one == llm.generate("hello", max_new_tokens=6, seed=3)
    many = llm.generate(["a", "b", "c"], max_new_tokens=4, num_samples=2, seed=0)
    assert len(many) == 3 and all(isinstance(g, list) and len(g) == 2 for g in many)
    greedy = llm.generate(["hello", "hello"], max_new_tokens=6, temperature=0)
    assert greedy[0] == greedy[1]
    assert llm.generate("hello", max_new_tokens=6, seed=4) != one or llm.generate("hi", max_new_tokens=6, seed=3) != one
    fast = palmrl.LLM(llm.checkpoint, device="cpu", decode_weights="fp16")  # fp16 weight copies while decoding
    assert isinstance(fast.generate("hello", max_new_tokens=6, seed=3), str)
    with pytest.raises(UserError, match="decode_weights must be one of fp32, fp16, got 'bf16'"):
        palmrl.LLM(llm.checkpoint, device="cpu", decode_weights="bf16")
    with pytest.raises(UserError, match="reward checkpoint"):
        palmrl.LLM.generate(type("R", (), {"is_reward": True, "checkpoint": llm.checkpoint,
                                           "_policy": palmrl.LLM._policy})(), "x")


@pytest.mark.unit
def test_wrong_use_is_a_user_error(policies):
    with pytest.raises(UserError, match="is a sft checkpoint; score\\(\\) needs a reward checkpoint"):
        policies["sft"].score(["p"], ["r"])
    with pytest.raises(UserError, match="2 prompts but 1 responses"):
        policies["sft"].logprobs(["p", "q"], ["r"])
    with pytest.raises(UserError, match="unknown stage 'serve' for palmrl.run"):
        palmrl.run("serve")
    with pytest.raises(UserError, match="train.nope"):
        palmrl.run("pretrain", ["train.nope=1"])


@pytest.mark.unit
def test_import_palmrl_stays_light():
    code = "import sys, palmrl; print('torch' in sys.modules); print(palmrl.PaLM.__name__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "PaLM", "True"]
