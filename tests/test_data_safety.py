"""Nothing lost: the output-path policy, the run lock, stage ownership of a run folder and the
recovery of a missing `latest` pointer (the data-loss cases an adversarial probe found)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import clean_env, stage_args
from test_serve import tiny_checkpoint

from conftest import palmrl_cli, run_stage

# ---- the output-path policy (palmrl.io.check_output_file) -------------------------------------

@pytest.mark.unit
def test_output_policy_refuses_inputs_checkpoints_folders_and_missing_parents(tmp_path):
    from palmrl.errors import UserError
    from palmrl.io import check_output_file

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    ckpt = tiny_checkpoint(tmp_path / "run")
    cases = [(data, [data], "is also this command's input"),
             (ckpt / "model.safetensors", [], "inside the palmrl checkpoint folder"),
             (ckpt / "notes.txt", [], "inside the palmrl checkpoint folder"),
             (tmp_path, [], "is a folder"),
             (tmp_path / "missing" / "out.jsonl", [], "does not exist")]
    for path, inputs, message in cases:
        with pytest.raises(UserError, match=message):
            check_output_file(path, key="out", inputs=inputs)
    assert check_output_file(tmp_path / "fresh.jsonl", key="out", inputs=[data]) == tmp_path / "fresh.jsonl"


@pytest.mark.integration
def test_sample_never_writes_over_weights_or_empties_a_file_it_then_refuses(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run")
    weights = (ckpt / "model.safetensors").read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for args, needle in (([f"output={ckpt / 'model.safetensors'}"], "inside the palmrl checkpoint"),
                         (["format=xml", f"output={notes}"], "format must be text or jsonl"),
                         ([f"output={tmp_path / 'no' / 'such' / 'dir.txt'}"], "does not exist")):
        proc = palmrl_cli("sample", f"ckpt={ckpt}", "prompt=hi", "max_new_tokens=2", *args, cwd=tmp_path)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
        assert needle in proc.stderr
    assert (ckpt / "model.safetensors").read_bytes() == weights and notes.read_text() == "my notes\n"


@pytest.mark.integration
def test_dedup_never_truncates_its_own_input(tmp_path):
    src = tmp_path / "x.removed.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"task {i}", "output": "ok"}) + "\n" for i in range(5)))
    before = src.read_text()
    for out in (tmp_path / "x.jsonl", src):  # x.jsonl's removed-records file is x.removed.jsonl: the input
        proc = palmrl_cli("dedup", f"in={src}", f"out={out}", cwd=tmp_path)
        assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr[-2000:]
    assert src.read_text() == before


@pytest.mark.unit
def test_export_overwrite_only_replaces_an_earlier_export(tmp_path, monkeypatch):
    from palmrl.errors import UserError
    from palmrl.stages.export import EXPORT_MARKER, check_export_target

    source = tiny_checkpoint(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    for out, message in ((Path("."), "folder export did not make"), (source.parent, "folder export did not make"),
                         (mine, "not a folder palmrl export wrote")):
        with pytest.raises(UserError, match=message):
            check_export_target(out, source, overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / EXPORT_MARKER).write_text("{}")
    check_export_target(earlier, source, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


# ---- one process per run folder ----------------------------------------------------------------

@pytest.mark.unit
def test_a_second_process_on_a_locked_folder_is_refused_with_the_holders_pid(tmp_path):
    from palmrl.errors import UserError
    from palmrl.io import FolderLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from palmrl.io import FolderLock; "
                               f"FolderLock({str(tmp_path)!r}, what='pretrain run'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by palmrl pretrain run \(pid {holder.pid}\)"):
            FolderLock(tmp_path, what="pretrain run")
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path, what="pretrain run").release()  # the kernel dropped the dead holder's lock


@pytest.mark.integration
def test_two_runs_on_one_folder_the_second_is_refused(tiny_chain, tmp_path):
    out = tmp_path / "run"
    args = [*stage_args("pretrain", tiny_chain), "train.max_steps=400", f"out_dir={out}"]
    first = subprocess.Popen([sys.executable, "-m", "palmrl", "pretrain", *args], cwd=tmp_path, env=clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").is_file():  # written after the lock is taken
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = palmrl_cli("pretrain", *args, "resume=auto", cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by palmrl pretrain run (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.integration
def test_resume_refuses_a_folder_holding_another_stages_run(tiny_chain, tmp_path, dist_env):
    from palmrl.errors import UserError

    foreign = tmp_path / "pretrain-copy"
    shutil.copytree(tiny_chain / "pretrain", foreign)
    before = (foreign / "final" / "manifest.json").read_text()
    with pytest.raises(UserError, match="holds a pretrain run: a sft run neither resumes nor replaces it"):
        run_stage("sft", [*stage_args("sft", tiny_chain), f"out_dir={foreign}", "resume=auto"])
    assert (foreign / "final" / "manifest.json").read_text() == before


@pytest.mark.integration
def test_a_missing_latest_pointer_resumes_from_the_newest_complete_step(tiny_chain, tmp_path, dist_env):
    out = tmp_path / "run"
    common = [*stage_args("pretrain", tiny_chain), "train.max_steps=6", f"out_dir={out}"]
    run_stage("pretrain", [*common, "train.stop_after=4"])
    (out / "deepspeed" / "latest").unlink()
    state = out / "deepspeed" / "step-000004"
    inode = state.stat().st_ino  # kept and resumed from, not deleted and made again
    run_stage("pretrain", [*common, "resume=auto"])
    assert state.is_dir() and state.stat().st_ino == inode
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"split": "train"' in line]
    assert steps == sorted(set(steps)) and max(steps) == 6



@pytest.mark.unit
@pytest.mark.parametrize(("name", "content", "message"), [
    ("prompts.txt", b"fine\n\xff\xfe not utf-8\n", "prompts.txt:2: not UTF-8 text"),
    ("prompts.jsonl", b'{"prompt": "a"}\n{"prompt": 3}\n', 'prompts.jsonl:2: expected a JSON object with a "prompt"'),
    ("prompts.jsonl", b'{"prompt": "a"}\n' + b"[" * 100_000 + b"\n", "prompts.jsonl:2"),
    ("prompts.jsonl", b'{"prompt": "a"}\n\xff\n', "prompts.jsonl:2"),
])
def test_sample_prompt_files_fail_with_file_and_line(tmp_path, name, content, message):
    """The probe's non-UTF-8 prompt_file and pathological JSON: one line naming file:line, no traceback."""
    from omegaconf import OmegaConf

    from palmrl.errors import UserError
    from palmrl.stages.sample import read_prompts

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_prompts(OmegaConf.create({"prompt": None, "prompt_file": str(path)}))


@pytest.mark.integration
def test_a_full_disk_inside_the_safetensors_write_is_one_line(tiny_chain, tmp_path, dist_env, monkeypatch):
    """ENOSPC while safetensors writes the consolidated weights surfaces as SafetensorError (not
    OSError): it must end as the one-line checkpoint error naming the step, not a traceback."""
    from safetensors import SafetensorError

    from palmrl import checkpoint
    from palmrl.errors import UserError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(UserError, match="could not write step 2 .*StorageFull.*no checkpoint was written yet"):
        run_stage("pretrain", [*stage_args("pretrain", tiny_chain), f"out_dir={tmp_path / 'full'}"])
