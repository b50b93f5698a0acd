"""`palmrl selfinstruct`: the whole loop against a real `palmrl serve` on 127.0.0.1 and against the
local backend, from the embedded seeds, with provenance; determinism with a seed; resume after an
interruption (earlier records kept byte for byte, no duplicates); prompt parsing; HTTP retries and
the unreachable-endpoint error. The generator is a random tiny model: assertions are about
plumbing, counts and provenance, not about the quality of its text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from test_serve import free_port, tiny_checkpoint

from palmrl.errors import UserError
from palmrl.selfinstruct.backends import GenParams, OpenAIBackend
from palmrl.selfinstruct.filters import RecordFilter, normalize
from palmrl.selfinstruct.pipeline import load_seeds, read_kept
from palmrl.selfinstruct.prompts import build_prompt, parse_tasks, stop_after

from conftest import CONFIG_DIR, run_stage

N = 12  # records each loop must produce
# a random model writes garbage: let short, unfinished texts through so the plumbing is what is tested
LOOSE = ["filters.min_instruction_words=1", "filters.drop_truncated=false", "instruction.max_tokens=24",
         "response.max_tokens=16", "prompts_per_round=8", "prompt.seed_examples=1", "prompt.generated_examples=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("si-ckpt"))


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_records(recs: list[dict], kind: str, n: int = N) -> None:
    seed_ids = {s["id"] for s in load_seeds(None)}
    assert len(recs) == n
    assert [r["id"] for r in recs] == [f"gen-{i:06d}" for i in range(n)]
    assert len({normalize(r["instruction"] + "\n" + r["input"]) for r in recs}) == n  # no duplicates
    for r in recs:
        prov = r["provenance"]
        assert prov["generator"]["kind"] == kind
        assert prov["examples"] and set(prov["examples"]) <= seed_ids | {x["id"] for x in recs}
        assert any(e in seed_ids for e in prov["examples"])
        assert prov["sampling"]["response"]["max_tokens"] == 16
        assert prov["sampling"]["instruction"]["stop"] == list(stop_after(len(prov["examples"]), 3))
        assert r["output"] and isinstance(r["input"], str)


# ---------------------------------------------------------------------------------------------
# seeds and prompts


@pytest.mark.unit
def test_embedded_seeds_are_many_distinct_and_clean():
    seeds = load_seeds(None)
    assert len(seeds) >= 100 and len({s["id"] for s in seeds}) == len(seeds)
    rf = RecordFilter()
    for i, s in enumerate(seeds):
        assert rf.offer({k: s[k] for k in ("instruction", "input", "output")}, i).reason is None, s


@pytest.mark.unit
def test_seed_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Name a colour", "output": "red"}\n{"instruction": ""}\n')
    with pytest.raises(UserError, match=r"seeds.jsonl:2: a seed needs"):
        load_seeds(bad)
    bad.write_text('{"instruction": "Name a colour"}\nnot json\n')
    with pytest.raises(UserError, match=r"seeds.jsonl:2: not valid JSON"):
        load_seeds(bad)
    with pytest.raises(UserError, match="seeds: no such file"):
        load_seeds(tmp_path / "missing.jsonl")


@pytest.mark.unit
def test_prompt_lists_examples_and_parser_reads_new_tasks():
    prompt = build_prompt([{"instruction": "Give an antonym.", "input": "hot"}, {"instruction": "Name a sea."}])
    assert prompt.endswith("Task 3\nInstruction:") and "Input: hot" in prompt and "Input: <none>" in prompt
    continuation = (" Write a riddle about rain.\nInput: <none>\nOutput: I fall but never break.\n\n"
                    "Task 4\nInstruction: Sort the numbers.\nInput: 3, 1, 2\n\n"
                    "Task 5\nsomething that is not a task\n\nTask 6\nInstruction: Explain how bridges")
    parsed = parse_tasks(continuation, cut_off=True)
    assert parsed.tasks == [("Write a riddle about rain.", ""), ("Sort the numbers.", "3, 1, 2")]
    assert parsed.unparsable == 1 and parsed.truncated == 1
    assert parse_tasks(" Explain how bridges stand.", cut_off=False).tasks == [("Explain how bridges stand.", "")]


# ---------------------------------------------------------------------------------------------
# the loop, local backend


@pytest.mark.unit
def test_local_loop_makes_records_with_provenance_deterministically(tmp_path, ckpt):
    outs = []
    for name, target in (("a", N), ("b", 5)):
        out_dir = tmp_path / name
        run_stage("selfinstruct", [f"generator.ckpt={ckpt}", f"target={target}", f"out_dir={out_dir}", "seed=3", *LOOSE])
        outs.append(out_dir / "instructions.jsonl")
    recs = records(outs[0])
    check_records(recs, "local")
    assert recs[0]["provenance"]["generator"]["checkpoint"]["sha256"]
    # same seed, same checkpoint: the same first round, so the same first records
    assert outs[1].read_text().splitlines() == outs[0].read_text().splitlines()[:5]
    report = json.loads((tmp_path / "a" / "instructions.report.json").read_text())
    assert report["kept"] == N and report["stopped"] == "target reached"
    assert set(report["rejected"]) >= {"unparsable", "near_duplicate", "empty"}
    assert report["calls"]["instruction"] >= 8


@pytest.mark.unit
def test_resume_keeps_earlier_records_and_adds_no_duplicates(tmp_path, ckpt):
    out = tmp_path / "instructions.jsonl"
    common = [f"generator.ckpt={ckpt}", f"out_dir={tmp_path}", *LOOSE]
    run_stage("selfinstruct", [*common, "target=4"])
    before = out.read_bytes()
    with open(out, "ab") as f:  # the crash: half a record written
        f.write(b'{"id": "gen-000004", "instruction": "half')
    run_stage("selfinstruct", [*common, "target=10"])
    after = out.read_bytes()
    assert after.startswith(before)  # never rewritten
    check_records(records(out), "local", 10)
    report = json.loads((tmp_path / "instructions.report.json").read_text())
    assert report["resumed_from"] == 4 and report["kept_this_run"] == 6
    run_stage("selfinstruct", [*common, "target=10"])  # already there: nothing to do
    assert out.read_bytes() == after
    run_stage("selfinstruct", [*common, "target=3", "overwrite=true"])
    assert len(read_kept(out)) == 3


@pytest.mark.unit
@pytest.mark.parametrize("text", ['[\n  {"instruction": "a", "output": "b"}\n]', 'my notes\nno newline at the end'])
def test_an_out_file_that_is_not_json_lines_is_refused_untouched(tmp_path, text):
    out = tmp_path / "tasks.json"  # the probe: a pretty-printed .json lost its closing "]"
    out.write_text(text)
    with pytest.raises(UserError, match=r"tasks.json:1: not valid JSON"):
        read_kept(out)
    assert out.read_text() == text


@pytest.mark.unit
def test_give_up_when_nothing_passes(tmp_path, ckpt):
    report_file = tmp_path / "instructions.report.json"
    run_stage("selfinstruct", [f"generator.ckpt={ckpt}", f"out_dir={tmp_path}", "target=5", "give_up_after=2",
                               "filters.min_instruction_words=500", "prompts_per_round=2", "instruction.max_tokens=8"])
    report = json.loads(report_file.read_text())
    assert report["kept"] == 0 and report["stopped"].startswith("gave up") and report["rounds"] == 2
    assert report["rejected"]["length"] + report["rejected"]["truncated"] + report["rejected"]["empty"] > 0


# ---------------------------------------------------------------------------------------------
# the loop against a real `palmrl serve` on 127.0.0.1


@pytest.fixture(scope="module")
def palmrl_serve(ckpt, tmp_path_factory):
    """The real `palmrl serve` command in a subprocess on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PALMRL_CONFIG_DIR"] = str(CONFIG_DIR)
    env["OMP_NUM_THREADS"] = "1"  # as one_thread: the tiny model decodes faster on one core
    proc = subprocess.Popen([sys.executable, "-m", "palmrl", "serve", f"ckpt={ckpt}", f"port={port}",
                             "model_name=tiny-sft"], cwd=tmp_path_factory.mktemp("serve-run"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "palmrl serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.integration
def test_loop_over_http_against_palmrl_serve(tmp_path, palmrl_serve):
    run_stage("selfinstruct", ["generator=openai", f"generator.base_url={palmrl_serve}/v1", "generator.concurrency=4",
                               f"target={N}", f"out_dir={tmp_path}", *LOOSE])
    recs = records(tmp_path / "instructions.jsonl")
    check_records(recs, "openai")
    assert recs[0]["provenance"]["generator"] == {"kind": "openai", "base_url": f"{palmrl_serve}/v1", "model": "tiny-sft"}
    health = httpx.get(f"{palmrl_serve}/health").json()
    assert health["rows_decoded"] > 0 and health["in_flight"] == 0


# ---------------------------------------------------------------------------------------------
# HTTP client: retries, errors


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (with Retry-After: 0) to the first `fails` POSTs, then a valid completion."""

    fails = 2
    seen = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen += 1
        if type(self).seen <= type(self).fails:
            body, code = b'{"error": {"message": "warming up"}}', 503
        else:
            body, code = json.dumps({"choices": [{"text": "ok", "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode(), 200
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("retry-after", "0")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.unit
def test_openai_backend_retries_transient_errors():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{httpd.server_port}/v1", model="m", max_retries=3, backoff_s=0.01,
                                concurrency=1)
        [completion] = backend.complete(["hi"], GenParams(max_tokens=4))
        backend.close()
        assert completion.text == "ok" and backend.retries == 2
        _Flaky.seen, _Flaky.fails = 0, 10
        backend = OpenAIBackend(f"http://127.0.0.1:{httpd.server_port}/v1", model="m", max_retries=1, backoff_s=0.01)
        with pytest.raises(UserError, match=r"failed after 2 tries: HTTP 503: warming up"):
            backend.chat([[{"role": "user", "content": "x"}]], GenParams())
        backend.close()
    finally:
        httpd.shutdown()
        _Flaky.seen, _Flaky.fails = 0, 2


@pytest.mark.unit
def test_unreachable_endpoint_is_one_clear_error():
    port = free_port()  # nothing listens here
    with pytest.raises(UserError, match=rf"cannot reach http://127.0.0.1:{port}/v1/models .* after 2 tries; is the server running"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01)
    with pytest.raises(UserError, match="generator.base_url must be an http"):
        OpenAIBackend("127.0.0.1:8000")
