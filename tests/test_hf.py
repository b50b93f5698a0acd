"""model=hf: tiny random Hugging Face models (GPT-2 and Llama configs, built and saved here with
save_pretrained; no hub access) through sft → reward → ppo → sample → export, with the quality
gates used for PaLM at toy scale, and the bad-input cases of a wrong model folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from palmrl.errors import UserError

from conftest import palmrl_cli, run_stage

TASKS = "data.tasks=[count_words,first_letter,last_letter,larger,color]"  # learnable from scratch in minutes
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus() -> list[str]:
    from palmrl import tasks

    examples = tasks.make_examples("train", 4000, seed=0)
    return [f"{ex.prompt}\n{ex.output}" for ex in examples]


def build_tokenizer(folder: Path, *, chat: bool):
    """A byte-level BPE tokenizer trained on the task texts (GPT-2 style), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chat else ["<|endoftext|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
             "additional_special_tokens": ["<|im_start|>"]} if chat else \
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **extra)
    if chat:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, family: str) -> Path:
    import transformers

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder, chat=family == "llama")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                         **ids)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, **ids)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny random model of each family, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf-sources")
    return {family: build_model(root / family, family) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_run(request, sources, tmp_path_factory):
    """(family, source model folder, a folder for this family's runs)."""
    return request.param, sources[request.param], tmp_path_factory.mktemp(request.param)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "final" / "manifest.json").read_text())


# The quality gates train one family (Llama: RoPE, GQA, RMSNorm, SwiGLU, the common layout); GPT-2
# (Conv1D weights, learned positions, a biased head) runs the same chain at a few steps each for the
# mechanics: its export must still give exactly the policy's logits.
QUALITY = {"llama": True, "gpt2": False}


@pytest.mark.integration
def test_sft_reward_ppo_sample_export_on_an_hf_model(hf_run, dist_env):
    family, source, root = hf_run
    full = QUALITY[family]
    run_stage("sft", ["model=hf", f"model.path={source}", "lora=none", TASKS, "data.train_size=8000",
                      f"train.max_steps={600 if full else 8}", "train.micro_batch_size=32", "train.eval_every=0",
                      f"train.eval_examples={64 if full else 8}", "optim.lr=3e-3", "train.log_every=50",
                      "train.save_every=0", f"out_dir={root / 'sft'}"])
    sft = manifest(root / "sft")
    assert sft["hf_source"]["path"] == str(source) and sft["hf_source"]["sha256"]
    if full:
        assert sft["metrics"]["accuracy"] >= sft["init_accuracy"] + 0.15, (sft["init_accuracy"],
                                                                           sft["metrics"]["accuracy"])
        assert sft["metrics"]["format_rate"] >= 0.8

    run_stage("reward", [f"init_from={root / 'sft'}", TASKS, "lora=none", f"train.max_steps={400 if full else 6}",
                         "train.eval_every=0", "data.train_size=4096", "data.val_size=256", "train.micro_batch_size=32",
                         "train.save_every=0", "optim.lr=1e-3", f"out_dir={root / 'reward'}"])
    if full:  # measured 0.68 (at 3e-3 on 2048 pairs it overfitted: 0.58, held-out loss above log 2)
        assert manifest(root / "reward")["metrics"]["accuracy"] >= 0.6  # chance is 0.5

    out = run_stage("ppo", [f"policy={root / 'sft'}", f"reward={root / 'reward'}", "reward_fn=palmrl.tasks.checker",
                            TASKS, "data.train_size=64", f"train.max_steps={16 if full else 2}", "train.eval_every=0",
                            f"train.eval_examples={64 if full else 8}", "optim.lr=2e-3", "ppo.rollout_batch=64",
                            "ppo.minibatch=16", "ppo.max_new_tokens=8", "train.save_every=0", f"out_dir={root / 'ppo'}"])
    ppo = manifest(root / "ppo")
    kls = [json.loads(line)["kl"] for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()
           if '"split": "train"' in line]
    assert max(kls) < 5.0
    if full:
        assert ppo["metrics"]["train_sampled_reward"] >= ppo["init_train_sampled_reward"] + 0.05, ppo["metrics"]

    # the learned reward model drives PPO too (a separate frozen RM next to the LoRA actor/critic)
    rm_run = run_stage("ppo", [f"policy={root / 'sft'}", f"reward={root / 'reward'}", TASKS, "data.train_size=32",
                               "train.max_steps=2", "train.eval_every=0", "train.eval_examples=8", "ppo.rollout_batch=16",
                               "ppo.minibatch=8", "ppo.max_new_tokens=8", "train.save_every=0", f"out_dir={root / 'ppo-rm'}"])
    frozen = json.loads((rm_run / "manifest.json").read_text())["ppo"]["frozen_sha256"]
    assert frozen["before"] == frozen["after"]

    proc = palmrl_cli("sample", f"ckpt={out}", "prompt=What color is the sky?", "max_new_tokens=8",
                      "num_samples=2", "format=jsonl", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2

    exported = root / "export"
    run_stage("export", [f"ckpt={out}", f"out={exported}"])
    assert_export_matches(out, exported)


def assert_export_matches(ckpt_dir: Path, exported: Path) -> None:
    """transformers loads the exported folder and gives the palmrl policy's logits exactly."""
    import transformers

    from palmrl import checkpoint
    from palmrl.checkpoint import policy_from_checkpoint

    policy, _ = policy_from_checkpoint(checkpoint.load(ckpt_dir))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tokenizer.encode("What is the capital of France?")])
    with torch.no_grad():
        ours, theirs = policy.eval()(ids), reloaded.eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # the exported chat template renders prompts exactly as the policy was trained on them
    from palmrl.data.chat import render_prompt

    ckpt_tokenizer = checkpoint.load(ckpt_dir).tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}]
    ours_text = ckpt_tokenizer.decode(render_prompt(ckpt_tokenizer, messages), skip_special=False)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours_text
    mask = os.umask(0)
    os.umask(mask)
    assert (exported / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.integration
def test_lora_on_an_hf_model_trains_adapters_only(hf_run, dist_env):
    from palmrl import checkpoint

    family, source, root = hf_run
    out = run_stage("sft", ["model=hf", f"model.path={source}", "lora=r8", TASKS, "data.train_size=256",
                            "train.max_steps=3", "train.eval_every=0", "train.eval_examples=8", "train.save_every=0",
                            f"out_dir={root / 'lora'}"])
    ckpt = checkpoint.load(out)
    targets = ckpt.manifest["lora"]["scopes"]["sft"]["targets"]
    assert targets == (["c_attn", "c_fc", "c_proj"] if family == "gpt2" else
                       ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    adapters = ckpt.adapters()
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)

    # the adapter in PEFT's layout: peft puts it on the exported base and gives the policy's logits
    import peft
    import transformers

    from palmrl.checkpoint import model_from_checkpoint

    exported = root / "peft"
    run_stage("export", [f"ckpt={out}", f"out={exported}", "format=peft"])
    assert json.loads((exported / "adapter_config.json").read_text())["target_modules"] == targets
    base = transformers.AutoModelForCausalLM.from_pretrained(exported / "base")
    reloaded = peft.PeftModel.from_pretrained(base, exported).eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    with torch.no_grad():
        ours, theirs = model_from_checkpoint(ckpt).eval()(ids), reloaded(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with reloaded.disable_adapter(), torch.no_grad():  # the base alone differs: the adapter is what matched
        assert not torch.allclose(reloaded(ids).logits, ours, atol=1e-4)


@pytest.mark.integration
def test_hf_bad_input(tmp_path, dist_env):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        run_stage("sft", ["model=hf", f"model.path={not_a_model}", f"out_dir={tmp_path / 'a'}"])

    import transformers

    encoder = tmp_path / "vit"  # an image encoder: AutoModelForCausalLM has no class for it
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, image_size=32, patch_size=16)).save_pretrained(encoder)
    with pytest.raises(UserError, match="not a causal LM"):
        run_stage("sft", ["model=hf", f"model.path={encoder}", f"out_dir={tmp_path / 'b'}"])

    mismatch = build_model(tmp_path / "mismatch", "gpt2")
    small = tmp_path / "small"
    shutil.copytree(mismatch, small)
    cfg = json.loads((small / "config.json").read_text())
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, "vocab_size": 100})).save_pretrained(small)
    with pytest.raises(UserError, match="tokenizer and model do not match"):
        run_stage("sft", ["model=hf", f"model.path={small}", f"out_dir={tmp_path / 'c'}"])

    with pytest.raises(UserError, match="model.path"):
        run_stage("sft", ["model=hf", f"out_dir={tmp_path / 'd'}"])

    from safetensors.torch import load_file

    from palmrl.checkpoint import load_source

    no_tokenizer = tmp_path / "no-tokenizer"  # transformers would build an empty tokenizer and carry on
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).save_pretrained(no_tokenizer)
    with pytest.raises(UserError, match=r"has no tokenizer \(tokenizer.json"):
        load_source({"path": str(no_tokenizer)})

    pickled = tmp_path / "bin-only"  # an older save: pytorch_model.bin, read by torch's weights-only unpickler
    shutil.copytree(mismatch, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    model, _ = load_source({"path": str(pickled)})
    assert torch.equal(model.hf.transformer.wte.weight, state["transformer.wte.weight"])

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Planted()}, f)
    with pytest.raises(UserError, match="pytorch_model.bin holds more than tensors"):
        load_source({"path": str(pickled)})
    assert not (tmp_path / "ran").exists()


@pytest.mark.multiproc
def test_two_ranks_zero3_and_resume_on_an_hf_model(sources, tmp_path):
    """torchrun, ZeRO-3 (parameters partitioned across ranks), stop after 2 steps, resume=auto to 4;
    the consolidated checkpoint loads in one process and exports. (GPT-2 only: its tied output
    head and Conv1D conversion are the harder case; Llama shares every other code path.)"""
    import os
    import subprocess
    import sys

    from conftest import CONFIG_DIR

    source = sources["gpt2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PALMRL_CONFIG_DIR=str(CONFIG_DIR))
    out = tmp_path / "z3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "palmrl", "sft",
           "model=hf", f"model.path={source}", "zero=stage3", TASKS, "data.train_size=256", "train.max_steps=4",
           "train.micro_batch_size=8", "train.eval_every=0", "train.eval_examples=8", "train.save_every=2",
           f"out_dir={out}"]
    for extra in (["train.stop_after=2"], ["resume=auto"]):
        proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "final" / "manifest.json").read_text())["step"] == 4
    run_stage("export", [f"ckpt={out}", f"out={tmp_path / 'export'}"])
    assert_export_matches(out, tmp_path / "export")



@pytest.mark.unit
def test_kv_cache_generation_matches_full_forward(hf_run):
    """Left-padded ragged prompts through the model's own cache give the tokens and logits of
    recomputing everything at each step, also where rows repeat a prompt (prefilled once, then
    handed to each of its rows by HFCache.select)."""
    from unittest.mock import patch

    from palmrl.checkpoint import load_source
    from palmrl.data.chat import prompt_tokens
    from palmrl.generate import generate
    from palmrl.model.hf import HFCache

    family, source, root = hf_run
    model, tokenizer = load_source({"path": str(source)})
    prompts = [prompt_tokens(tokenizer, p) for p in ("Hi", "What is the colour of grass today?", "Pick one.\n3 or 4")]
    runs = [generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=None, pad_id=tokenizer.pad_id,
                     use_cache=cache) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    repeated = [prompts[i] for i in (1, 0, 1, 2, 0, 1)]
    selected = []
    real_select = HFCache.select
    with patch.object(HFCache, "select", lambda self, index: selected.append(index.tolist()) or real_select(self, index)):
        shared, whole = [generate(model, repeated, max_new_tokens=6, eos_id=None, pad_id=tokenizer.pad_id,
                                  generator=torch.Generator().manual_seed(5), use_cache=cache) for cache in (True, False)]
    assert len(selected) == 1 and len(selected[0]) == 6  # the 3 distinct prompts' cache handed to 6 rows
    assert torch.equal(shared.sequences, whole.sequences)
    with torch.no_grad():
        full = model(runs[0].sequences, attention_mask=runs[0].attention_mask)
        alone = model(torch.tensor([prompts[0]]))
    # the shortest (most padded) prompt's last-token logits equal those of the prompt run alone
    torch.testing.assert_close(full[0, runs[0].prompt_length - 1], alone[0, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="decode_weights=fp16 applies to palmrl's PaLM models"):
        generate(model, prompts, max_new_tokens=2, decode_weights="fp16")


@pytest.mark.unit
def test_chat_template_renderings_are_kept_and_equal_fresh_ones(sources):
    """The Jinja template runs once per distinct conversation (the halves of a preference pair share
    their prompt, epochs repeat it), and a kept rendering equals a fresh one, however it is used."""
    from palmrl.data.chat import render_chat, render_prompt
    from palmrl.tokenizer import HFTokenizer

    system = {"role": "system", "content": "Be brief."}
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q in ("What color is grass?", "Larger: 3 or 4?") for a in ("green", "4", "Hope this helps!")]
    conversations += [[system, *c, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "ok"}]
                      for c in conversations[:2]]
    load = lambda: HFTokenizer.load(sources["llama"])  # noqa: E731
    fresh = [render_chat(load(), c) for c in conversations]  # a new tokenizer for each: nothing kept
    tokenizer = load()
    real, calls = tokenizer.tk.apply_chat_template, []
    tokenizer.tk.apply_chat_template = lambda *a, **k: calls.append(1) or real(*a, **k)
    for _epoch in range(2):
        for conversation, expected in zip(conversations, fresh):
            rendered = render_chat(tokenizer, conversation)
            assert rendered == expected
            rendered.tokens.append(-1)  # a caller's change never reaches the kept copy
    # per conversation: the prompt before each reply, the conversation through it, and the whole
    # (the last reply's "through"): each distinct one rendered once over both epochs
    distinct = set()
    for c in conversations:
        for i, message in enumerate(c):
            if message["role"] == "assistant":
                distinct |= {(True, repr(c[:i])), (False, repr(c[: i + 1]))}
        distinct.add((False, repr(c)))
    assert len(calls) == len(distinct) < 3 * len(conversations)
    prompt = conversations[0][:1]
    assert render_prompt(tokenizer, prompt) == render_prompt(load(), prompt) and len(calls) == len(distinct)

    bounded = load()
    bounded.RENDERINGS = 3  # the oldest renderings go, and renderings stay right
    for conversation, expected in [*zip(conversations, fresh)] * 2:
        assert render_chat(bounded, conversation) == expected and len(bounded._rendered) <= 3
    assert len(bounded._rendered) == 3


@pytest.mark.integration
def test_remote_code_is_never_run_without_consent(tmp_path, dist_env):
    """A model folder that ships its own Python (auto_map) is refused unless trust_remote_code=true,
    and its code does not run."""
    folder, marker = tmp_path / "custom", tmp_path / "ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "palmrl_custom", "architectures": ["CustomLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_custom.py").write_text(payload + "from transformers import PretrainedConfig\n"
                                                    "class CustomConfig(PretrainedConfig):\n    model_type = 'palmrl_custom'\n")
    (folder / "modeling_custom.py").write_text(payload)
    with pytest.raises(UserError, match="trust_remote_code=true"):
        run_stage("sft", ["model=hf", f"model.path={folder}", f"out_dir={tmp_path / 'out'}"])
    assert not marker.exists()


@pytest.mark.integration
def test_eval_runs_an_lm_evaluation_harness_task_on_the_exported_model(sources, tmp_path, dist_env):
    """`palmrl eval harness=<task>`: lm-eval scores the checkpoint exported to HF; the task is a local
    YAML over a local JSONL (nothing to download)."""
    pytest.importorskip("lm_eval")
    out = run_stage("sft", ["model=hf", f"model.path={sources['llama']}", "lora=r8", TASKS, "data.train_size=64",
                            "train.max_steps=2", "train.eval_every=0", "train.eval_examples=4", "train.save_every=0",
                            f"out_dir={tmp_path / 'sft'}"])
    docs = [{"question": f"Which colour is the {thing}?", "choices": ["blue", "green", "red"], "label": label}
            for thing, label in (("sky", 0), ("grass", 1), ("fire truck", 2), ("sea", 0), ("leaf", 1))]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "palmrl_colours.yaml").write_text(
        "task: palmrl_colours\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")
    result = run_stage("eval", [f"ckpt={out}", "tasks=[]", "harness=[palmrl_colours]",
                                f"harness_options.include_path={tasks}", f"out_dir={tmp_path / 'eval'}"])
    metrics = json.loads(result.read_text())["tasks"]["harness:palmrl_colours"]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["acc"] * 5 == pytest.approx(round(metrics["acc"] * 5))
