"""The bad-input corpus (docs/reliability.md): malformed configs, data files, checkpoints and CLI
usage. Each case goes through the real CLI entry point (`palmrl.cli.main`, in this process for
speed; a few also as a subprocess) and must end with exactly one `palmrl: error:` line naming
the culprit, exit code 2, no traceback, and the output folder untouched."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import free_port

from palmrl.errors import UserError

from conftest import CONFIG_DIR, palmrl_cli

TINY = ["model=palm_tiny", "train.max_steps=2", "train.micro_batch_size=8", "train.seq_len=64"]


LATIN1 = '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")  # not UTF-8


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def copy_ckpt(run: Path, stage: str, dst: Path) -> Path:
    shutil.copytree(run / stage / "final", dst)
    return dst


def tamper(folder: Path, edit) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def truncated(run: Path, tmp: Path) -> Path:
    """model.safetensors cut in half, its hash updated: the file itself must be refused."""
    from palmrl.io import sha256_file

    folder = copy_ckpt(run, "sft", tmp / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return tamper(folder, lambda m: m["files"].update({"model.safetensors": sha256_file(folder / "model.safetensors")}))


def flipped(run: Path, tmp: Path) -> Path:
    folder = copy_ckpt(run, "sft", tmp / "flip")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


# Each case: id, (tmp, run) -> argv, the text the one error line must contain.
CASES = [
    # ---- configs
    ("unknown key", lambda t, r: ["pretrain", "train.nokey=1"], "train.nokey"),
    ("unknown group option", lambda t, r: ["pretrain", "zero=stage9"], "zero/stage9"),
    ("unknown model", lambda t, r: ["pretrain", "model=palm_nope"], "model/palm_nope"),
    ("wrong type int", lambda t, r: ["pretrain", "train.max_steps=abc"], "train.max_steps"),
    ("wrong type float", lambda t, r: ["sft", f"init_from={r / 'pretrain'}", "optim.lr=fast"], "optim.lr"),
    ("wrong type bool", lambda t, r: ["pretrain", "model.qk_norm=maybe"], "model.qk_norm"),
    ("fraction for int", lambda t, r: ["pretrain", "train.micro_batch_size=2.5"], "train.micro_batch_size"),
    ("negative steps", lambda t, r: ["pretrain", *TINY, "train.max_steps=-5", f"tokenizer.path={r / 'tokenizer'}"],
     "train.max_steps"),
    ("zero batch", lambda t, r: ["pretrain", *TINY, "train.micro_batch_size=0", f"tokenizer.path={r / 'tokenizer'}"],
     "train.micro_batch_size"),
    ("negative width", lambda t, r: ["pretrain", *TINY, "model.dim=-64", f"tokenizer.path={r / 'tokenizer'}"], "model.dim"),
    ("kv heads not dividing heads", lambda t, r: ["pretrain", *TINY, "model.kv_heads=3", f"tokenizer.path={r / 'tokenizer'}"],
     "model.kv_heads"),
    ("odd head width", lambda t, r: ["pretrain", *TINY, "model.dim_head=15", f"tokenizer.path={r / 'tokenizer'}"],
     "model.dim_head"),
    ("seq longer than model", lambda t, r: ["pretrain", *TINY, "train.seq_len=4096", f"tokenizer.path={r / 'tokenizer'}"],
     "train.seq_len"),
    ("fp16 on cpu", lambda t, r: ["pretrain", *TINY, "precision=fp16", f"tokenizer.path={r / 'tokenizer'}"], "precision"),
    ("rollout not divisible by minibatch", lambda t, r: ["ppo", f"policy={r / 'sft'}", f"reward={r / 'reward'}",
                                                         "ppo.rollout_batch=20", "ppo.minibatch=8"], "ppo.minibatch"),
    ("samples per prompt not dividing rollout", lambda t, r: ["ppo", f"policy={r / 'sft'}", f"reward={r / 'reward'}",
                                                              "ppo.rollout_batch=18", "ppo.minibatch=6", "ppo.samples_per_prompt=4"],
     "ppo.samples_per_prompt"),
    ("unknown advantage estimator", lambda t, r: ["ppo", f"policy={r / 'sft'}", f"reward={r / 'reward'}", "ppo.advantage=vtrace"],
     "ppo.advantage"),
    ("rloo with one sample per prompt", lambda t, r: ["ppo", f"policy={r / 'sft'}", f"reward={r / 'reward'}", "ppo.advantage=rloo",
                                                      "ppo.samples_per_prompt=1"], "ppo.advantage=rloo"),
    ("bad nonfinite policy", lambda t, r: ["pretrain", *TINY, "train.on_nonfinite=ignore", f"tokenizer.path={r / 'tokenizer'}"],
     "train.on_nonfinite"),
    ("missing required key", lambda t, r: ["sample", "prompt=x"], "ckpt"),
    ("unknown decode weights", lambda t, r: ["sample", f"ckpt={r / 'sft'}", "prompt=x", "decode_weights=int8"],
     "decode_weights must be one of fp32, fp16, got 'int8'"),
    ("bad interpolation", lambda t, r: ["pretrain", "run_name=${nope}"], "nope"),
    ("serve off loopback without a token", lambda t, r: ["serve", f"ckpt={r / 'sft'}", "host=0.0.0.0", "auth_token=null"],
     "auth_token: serving on 0.0.0.0"),
    ("serve compare not a list", lambda t, r: ["serve", f"ckpt={r / 'sft'}", f"compare={r / 'ppo'}", f"port={free_port()}"],
     "compare must be a list"),
    ("serve queue file missing", lambda t, r: ["serve", f"ckpt={r / 'sft'}", "prompts=/no/such/prompts.txt", f"port={free_port()}"],
     "prompts: /no/such/prompts.txt"),
    ("serve feedback_dir is a file", lambda t, r: ["serve", f"ckpt={r / 'sft'}", f"ckpt_b={r / 'ppo'}", f"port={free_port()}",
                                                   f"feedback_dir={write(t / 'afile', 'x')}"], "feedback_dir"),
    ("eval unknown task", lambda t, r: ["eval", f"ckpt={r / 'sft'}", "tasks=[checker,nope]"], "tasks: unknown task 'nope'"),
    ("eval qa without a file", lambda t, r: ["eval", f"ckpt={r / 'sft'}", "tasks=[qa]"], "qa.path"),
    ("eval qa record without answer", lambda t, r: ["eval", f"ckpt={r / 'sft'}", "tasks=[qa]",
                                                    f"qa.path={write(t / 'qa.jsonl', jsonl([{'prompt': 'p'}]))}"],
     "qa.jsonl:1"),
    ("eval a reward model", lambda t, r: ["eval", f"ckpt={r / 'reward'}"], "is a reward checkpoint"),
    # ---- data files
    ("no such data file", lambda t, r: ["pretrain", "data=local", "data.path=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    ("empty corpus", lambda t, r: ["pretrain", *TINY, "data=local", f"data.path={write(t / 'empty.txt', '')}",
                                   f"tokenizer.path={r / 'tokenizer'}"], "empty"),
    ("malformed jsonl line", lambda t, r: ["sft", f"init_from={r / 'pretrain'}", "data=my_instructions",
                                           f"data.path={write(t / 'bad.jsonl', jsonl([{'instruction': 'a', 'output': 'b'}, '{oops']))}"],
     "bad.jsonl:2"),
    ("missing field", lambda t, r: ["sft", f"init_from={r / 'pretrain'}", "data=my_instructions",
                                    f"data.path={write(t / 'nofield.jsonl', jsonl([{'instruction': 'a'}]))}"], "nofield.jsonl:1"),
    ("wrong field type", lambda t, r: ["reward", f"init_from={r / 'sft'}", "data=my_prefs",
                                       f"data.path={write(t / 'types.jsonl', jsonl([{'prompt': 'p', 'chosen': 3, 'rejected': 'x'}]))}"],
     "types.jsonl:1"),
    ("binary garbage", lambda t, r: ["sft", f"init_from={r / 'pretrain'}", "data=my_instructions",
                                     f"data.path={write(t / 'garbage.jsonl', bytes(range(256)) * 8)}"], "garbage.jsonl"),
    ("wrong encoding", lambda t, r: ["reward", f"init_from={r / 'sft'}", "data=my_prefs",
                                     f"data.path={write(t / 'latin1.jsonl', LATIN1)}"],
     "latin1.jsonl"),
    ("json array of strings", lambda t, r: ["ppo", f"policy={r / 'sft'}", f"reward={r / 'reward'}", "data=my_prompts",
                                            f"data.path={write(t / 'arr.json', json.dumps(['a', 'b']))}"], "arr.json"),
    ("rating out of range", lambda t, r: ["reward", f"init_from={r / 'sft'}", "data=my_ratings", "reward.objective=binned",
                                          f"data.path={write(t / 'r.jsonl', jsonl([{'prompt': 'p', 'response': 'r', 'rating': 9}]))}"],
     "rating"),
    # ---- checkpoints
    ("no such checkpoint", lambda t, r: ["sample", "ckpt=/no/such/ckpt", "prompt=x"], "/no/such/ckpt"),
    ("missing manifest", lambda t, r: ["sample", f"ckpt={write_dir(t / 'nomani', 'model.safetensors')}", "prompt=x"],
     "not a palmrl checkpoint"),
    ("manifest not json", lambda t, r: ["sample", f"ckpt={broken_manifest(r, t)}", "prompt=x"], "not valid JSON"),
    ("wrong stage", lambda t, r: ["reward", f"init_from={r / 'ppo'}"], "is a ppo checkpoint"),
    ("policy is a reward model", lambda t, r: ["ppo", f"policy={r / 'reward'}", f"reward={r / 'reward'}"], "policy"),
    ("tampered weights", lambda t, r: ["sample", f"ckpt={flipped(r, t)}", "prompt=x"], "sha256"),
    ("truncated safetensors", lambda t, r: ["sample", f"ckpt={truncated(r, t)}", "prompt=x"], "unreadable model.safetensors"),
    ("tampered tokenizer", lambda t, r: ["sample", f"ckpt={tamper(copy_ckpt(r, 'sft', t / 'tok'), lambda m: m.update(tokenizer_sha256='0' * 64))}",
                                         "prompt=x"], "tokenizer"),
    ("vocab mismatch", lambda t, r: ["pretrain", *TINY, "model.vocab_size=4096", f"tokenizer.path={r / 'tokenizer'}"], "vocab_size"),
    ("missing model.yaml", lambda t, r: ["sample", f"ckpt={no_model_yaml(r, t)}", "prompt=x"], "model.yaml"),
    # ---- CLI usage
    ("unknown stage", lambda t, r: ["nosuchstage"], "nosuchstage"),
    ("override without value", lambda t, r: ["pretrain", "train.max_steps"], "train.max_steps"),
    ("report of a missing run", lambda t, r: ["report", str(t / "nothing")], "nothing"),
    ("resume from a missing step", lambda t, r: ["pretrain", *TINY, "resume=runs/x/pretrain/step-000009",
                                                 f"tokenizer.path={r / 'tokenizer'}"], "step-000009"),
    ("resume that is not a step folder", lambda t, r: ["pretrain", *TINY, "resume=..",
                                                       f"tokenizer.path={t / 'new-tokenizer'}"], "resume: .."),
]


def write_dir(folder: Path, name: str) -> Path:
    folder.mkdir()
    (folder / name).write_bytes(b"x")
    return folder


def broken_manifest(run: Path, tmp: Path) -> Path:
    folder = copy_ckpt(run, "sft", tmp / "mani")
    (folder / "manifest.json").write_text("{not json")
    return folder


def no_model_yaml(run: Path, tmp: Path) -> Path:
    folder = copy_ckpt(run, "sft", tmp / "noyaml")
    (folder / "model.yaml").unlink()
    return folder


def run_cli(argv: list[str]) -> tuple[int, str]:
    from hydra.core.hydra_config import HydraConfig

    from palmrl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            HydraConfig.instance().cfg = None  # the job is over: later in-process stages must not see it
    return code, err.getvalue()


@pytest.mark.unit
def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.integration
@pytest.mark.parametrize("build,culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(build, culprit, tiny_chain, tmp_path, monkeypatch, dist_env):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')  # earlier work
    argv = build(tmp_path, tiny_chain)
    if argv[0] in ("pretrain", "sft", "reward", "ppo"):
        argv = [*argv, f"out_dir={out}"]
    code, stderr = run_cli(argv)
    errors = [line for line in stderr.splitlines() if line.startswith("palmrl: error:")]
    assert code == 2, (code, stderr[-2000:])
    assert len(errors) == 1 and culprit in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "split": "train", "loss": 1.0}\n'


@pytest.mark.integration
@pytest.mark.parametrize("argv,culprit", [
    (["pretrain", "train.max_steps=abc"], "train.max_steps"),
    (["sample", "ckpt=/no/such/ckpt", "prompt=x"], "/no/such/ckpt"),
    (["nosuchstage"], "nosuchstage"),
    (["pretrain", "zero=null"], "Config group override"),  # Hydra's bare ValueError (the probe's case)
    (["sft", "model=palm_x"], "model= takes one of: hf, palm_125m, palm_1b"),  # Hydra's choices, one line
])
def test_bad_input_through_the_real_command(argv, culprit, tmp_path):
    proc = palmrl_cli(*argv, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("palmrl: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and culprit in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize("argv", [["pretrain", "train.max_steps=abc"], ["pretrain", "resume=/no/such/step"],
                                  ["sft", "optim.lr=-1"], ["pretrain", "zero=null"]])
def test_a_bad_value_fails_before_torch_loads(argv):
    """The CLI checks the composed config before it imports torch or the stage's module, so a bad
    value ends in about a second; it took ~7 s once DeepSpeed had loaded for the stage."""
    code = ("import sys\nfrom palmrl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
            "    print(stop.code, [name for name in ('torch', 'deepspeed') if name in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**env, "PALMRL_CONFIG_DIR": str(CONFIG_DIR)})
    assert proc.stdout.split() == ["2", "[]"], (proc.stdout, proc.stderr[-2000:])
    assert len([line for line in proc.stderr.splitlines() if line.startswith("palmrl: error:")]) == 1


# ---- property-based: the data readers never fail with anything but a UserError ----------------

@pytest.mark.unit
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40),
                          st.dictionaries(st.sampled_from(["instruction", "input", "output", "prompt", "x"]),
                                          st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=4)
                          .map(lambda d: json.dumps(d).encode())), max_size=6))
def test_instruction_reader_fails_only_with_a_user_error(tmp_path_factory, lines):
    from palmrl.data.instructions import load_instruction_records

    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    try:
        records = load_instruction_records({"source": "local", "path": str(path), "val_fraction": 0.0}, "train")
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)
    else:
        assert all(isinstance(m["content"], str) for r in records for m in r["messages"])


@pytest.mark.unit
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=40),
                          st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "y"]),
                                          st.one_of(st.text(max_size=8), st.integers(), st.lists(st.text(max_size=3))),
                                          max_size=4).map(lambda d: json.dumps(d).encode())), max_size=6))
def test_preference_reader_fails_only_with_a_user_error(tmp_path_factory, lines):
    from palmrl.data.preferences import load_preference_pairs

    path = tmp_path_factory.mktemp("fuzz") / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        pairs, _ = load_preference_pairs({"source": "local", "path": str(path), "val_fraction": 0.0}, "train")
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)
    else:
        assert all(isinstance(p.chosen, str) and isinstance(p.rejected, str) for p in pairs)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["instructions", "preferences"])
def test_json_nested_too_deeply_names_its_line(tmp_path, kind):
    from palmrl.data.instructions import load_instruction_records
    from palmrl.data.preferences import load_preference_pairs

    path = tmp_path / "data.jsonl"
    good = {"instructions": '{"instruction": "a", "output": "b"}', "preferences": '{"prompt": "a", "chosen": "b", "rejected": "c"}'}
    path.write_text(good[kind] + '\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    load = load_instruction_records if kind == "instructions" else load_preference_pairs
    with pytest.raises(UserError, match=rf"^{path}:2: JSON nested too deeply$"):
        load({"source": "local", "path": str(path), "val_fraction": 0.0}, "train")
