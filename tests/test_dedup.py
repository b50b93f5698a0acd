"""Dedup and filters: planted exact and near duplicates are removed and distinct records kept
(precision/recall on a crafted set, for minhash and rouge), each filter fires on its own case,
and `palmrl dedup in=… out=…` parses, writes kept/removed/report files and refuses to overwrite."""

from __future__ import annotations

import json

import pytest
import yaml

from palmrl.errors import UserError
from palmrl.selfinstruct.filters import DedupConfig, FilterConfig, RecordFilter, normalize, record_fields

from conftest import CONFIG_DIR, compose, palmrl_cli, run_stage

DISTINCT = [
    "Give three tips for staying healthy during the winter months",
    "Explain how a refrigerator keeps food cold",
    "Write a short poem about a lighthouse keeper",
    "List five vegetables that grow well in containers",
    "Describe the rules of chess for a complete beginner",
    "Translate the greeting into Spanish and Italian",
    "Summarize the causes of the French Revolution briefly",
    "Suggest a weekend itinerary for a trip to Lisbon",
    "Compare electric cars with petrol cars on running costs",
    "Write a Python function that checks whether a number is prime",
    "Name the largest ocean on Earth and its deepest point",
    "Recommend a board game for a family with young children",
    "Explain the difference between a loan and a grant",
    "Create a grocery budget for a student living alone",
    "Write an opening paragraph for a science fiction story",
    "Identify the verbs in the following sentence",
    "Propose a team name for a company football league",
    "Describe how tides are caused by the moon",
    "Give an example of a metaphor used in everyday speech",
    "Outline the steps to change a flat bicycle tyre",
    "Convert the recipe quantities from cups to grams",
    "Explain why leaves change colour in autumn",
    "Draft a polite complaint about a late delivery",
    "Classify the following animals by habitat",
    "Estimate the number of piano tuners in a large city",
    "Write a haiku about the first snowfall of the year",
    "Suggest names for a bakery that specialises in sourdough",
    "Explain how compound interest grows savings over time",
    "List the planets of the solar system in order",
    "Describe a healthy morning routine for a busy parent",
]


def exact_copy(text: str) -> str:  # same words, different case and punctuation
    return text.upper() + "!!"


def near_copy(text: str, i: int) -> str:  # one word added or swapped: still the same task
    words = text.split()
    if i % 2:
        return " ".join(words[:2] + ["please"] + words[2:])
    return " ".join(words[:-1] + ["briefly" if words[-1] != "briefly" else "quickly"])


def crafted() -> tuple[list[str], set[int], set[int]]:
    """JSONL lines, the line numbers of planted exact and near duplicates (1-based)."""
    lines, exact, near = [], set(), set()

    def add(instruction: str, bucket: set | None = None) -> None:
        lines.append(json.dumps({"instruction": instruction, "input": "", "output": f"An answer to: {instruction}"}))
        if bucket is not None:
            bucket.add(len(lines))

    for i, text in enumerate(DISTINCT):
        add(text)
        if i % 3 == 0:
            add(exact_copy(text), exact)
        if i % 3 == 1:
            add(near_copy(text, i), near)
    return lines, exact, near


@pytest.mark.unit
@pytest.mark.parametrize("method", ["minhash", "rouge"])
def test_planted_duplicates_precision_recall(method):
    lines, exact, near = crafted()
    rf = RecordFilter(FilterConfig(), DedupConfig(method=method, threshold=0.7))
    removed = {n: rf.offer(json.loads(line), n).reason for n, line in enumerate(lines, 1)}
    removed = {n: r for n, r in removed.items() if r}
    planted = exact | near
    precision = len(planted & set(removed)) / max(len(removed), 1)
    recall = len(planted & set(removed)) / len(planted)
    assert precision == 1.0 and recall == 1.0, (method, precision, recall, removed)
    assert {removed[n] for n in exact} == {"exact_duplicate"}
    assert {removed[n] for n in near} == {"near_duplicate"}
    assert rf.kept == len(DISTINCT)


@pytest.mark.unit
def test_exact_method_keeps_near_duplicates():
    lines, exact, near = crafted()
    rf = RecordFilter(FilterConfig(), DedupConfig(method="exact"))
    removed = {n for n, line in enumerate(lines, 1) if rf.offer(json.loads(line), n).reason}
    assert removed == exact


@pytest.mark.unit
def test_each_filter_fires_on_its_case():
    rf = RecordFilter()
    ok = {"instruction": "Explain how a kettle boils water", "input": "", "output": "It heats an element."}
    cases = {
        "unparsable": {"text": "no known fields"},
        "empty": {**ok, "instruction": "Write a list of three colours", "output": "   "},
        "length": {**ok, "instruction": "Hi there"},
        "blocklist": {**ok, "instruction": "Draw a picture of a horse"},
        "echo": {**ok, "instruction": "Repeat after me: sunny skies", "output": "Repeat after me, sunny skies."},
    }
    assert rf.offer(ok, 0).reason is None
    for key, (reason, record) in enumerate(cases.items(), 1):
        assert rf.offer(record, key).reason == reason
    assert rf.offer({**ok, "output": "x"}, 9, truncated=True).reason == "truncated"
    assert rf.offer({**ok, "output": "As an AI language model, I cannot boil."}, 10).reason == "blocklist"
    assert rf.counts()["unparsable"] == 1 and rf.kept == 1


@pytest.mark.unit
def test_record_shapes_and_normalisation():
    assert record_fields({"prompt": "a", "completion": "b"}).output == "b"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    assert record_fields(chat) == ("q", "", "r")
    assert record_fields({"instruction": 3, "output": "x"}) is None
    assert normalize("  Héllo,   WORLD!! ") == "héllo world"


@pytest.mark.unit
def test_config_blocks_match_the_code_defaults():
    """dedup.yaml and selfinstruct.yaml carry the same filter/dedup blocks, equal to the dataclass defaults."""
    for stage in ("dedup", "selfinstruct"):
        cfg = compose(stage)
        assert FilterConfig.from_cfg(cfg.filters) == FilterConfig()
        assert DedupConfig.from_cfg(cfg.dedup) == DedupConfig()
    with pytest.raises(UserError, match="dedup.metod"):
        DedupConfig.from_cfg({"metod": "exact"})
    with pytest.raises(UserError, match="dedup.method"):
        DedupConfig(method="fuzzy")
    assert yaml.safe_load((CONFIG_DIR / "dedup.yaml").read_text())["in"] == "???"


@pytest.mark.unit
def test_dedup_stage_writes_kept_removed_and_report(tmp_path):
    lines, exact, near = crafted()
    src = tmp_path / "gen.jsonl"
    src.write_text("\n".join(lines + ["{torn", ""]) + "\n")
    out = tmp_path / "clean.jsonl"
    run_stage("dedup", [f"in={src}", f"out={out}", f"out_dir={tmp_path}"])
    kept = out.read_text().splitlines()
    assert len(kept) == len(DISTINCT) and set(kept) <= set(lines)  # byte-for-byte, in order
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["records"] == len(lines) + 1 and report["kept"] == len(DISTINCT)
    assert report["removed"]["unparsable"] == 1
    assert report["removed"]["exact_duplicate"] == len(exact) and report["removed"]["near_duplicate"] == len(near)
    removed = [json.loads(x) for x in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert {r["line"] for r in removed if r["reason"] == "exact_duplicate"} == exact
    assert all(r["duplicate_of_line"] is not None for r in removed if r["reason"].endswith("duplicate"))

    with pytest.raises(UserError, match="overwrite=true"):
        run_stage("dedup", [f"in={src}", f"out={out}", f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match="is also this command's input"):
        run_stage("dedup", [f"in={src}", f"out={src}", f"out_dir={tmp_path}", "overwrite=true"])


@pytest.mark.integration
def test_cli_parses_in_and_out(tmp_path):
    """`in` is a Python keyword but a fine config key: the real command line takes it."""
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(crafted()[0]) + "\n")
    proc = palmrl_cli("dedup", f"in={src}", f"out={tmp_path / 'b.jsonl'}", "dedup.method=exact", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b.report.json").is_file()
    with pytest.raises(UserError, match="in: no such file"):
        run_stage("dedup", [f"in={tmp_path / 'nope.jsonl'}", f"out={tmp_path / 'c.jsonl'}", f"out_dir={tmp_path}"])


@pytest.mark.integration
def test_a_line_nested_too_deeply_is_an_unparsable_record_not_a_crash(tmp_path):
    src = tmp_path / "in.jsonl"
    good = {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."}
    src.write_text(json.dumps(good) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    proc = palmrl_cli("dedup", f"in={src}", f"out={tmp_path / 'out.jsonl'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    removed = [json.loads(line) for line in (tmp_path / "out.removed.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in removed] == [(2, "unparsable")]
    assert json.loads((tmp_path / "out.jsonl").read_text()) == good
