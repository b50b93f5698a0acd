"""palmrl.io: the one JSON-lines reader (torn tails, encodings, nesting) and atomic writes."""

from __future__ import annotations

import json

import pytest

from palmrl.errors import UserError
from palmrl.io import read_jsonl, sha256_file, sha256_files, write_atomic

pytestmark = pytest.mark.unit


def test_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_jsonl(path, key="in") == [(1, {"a": 1}), (3, {"b": 2})]


def test_a_torn_last_line_is_dropped_only_where_palmrl_wrote_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(path, key="metrics", torn_tail="drop") == [(1, {"step": 1})]
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_jsonl(path, key="metrics")
    # a complete last line without its newline is a row, not a tear
    path.write_text('{"step": 1}\n{"step": 2}')
    assert [row for _, row in read_jsonl(path, key="metrics", torn_tail="drop")] == [{"step": 1}, {"step": 2}]
    # a bad line that is not the last one is never a tear
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}')
    with pytest.raises(UserError, match=r":2: not valid JSON"):
        read_jsonl(path, key="metrics", torn_tail="drop")


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"b": "\xff\xfe"}\n', r"x\.jsonl:2: not UTF-8"),
    (b'{"a": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", r"x\.jsonl:2: JSON nested too deeply"),
    (b'[1, 2]\n', r"x\.jsonl:1: expected a JSON object, got list"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_jsonl(path, key="in")


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match="seeds: no such file"):
        read_jsonl(tmp_path / "nope.jsonl", key="seeds")


def test_write_atomic_and_hashes(tmp_path):
    target = tmp_path / "latest"
    write_atomic(target, "step-000010")
    write_atomic(target, "step-000020")
    assert target.read_text() == "step-000020" and [p.name for p in tmp_path.iterdir()] == ["latest"]
    other = tmp_path / "other"
    other.write_text("x")
    assert sha256_files([target]) == sha256_file(target) != sha256_files([target, other])


@pytest.mark.unit
def test_json_depth_guard_counts_only_real_nesting(tmp_path):
    from palmrl.io import check_json_depth

    brackets = tmp_path / "brackets.jsonl"  # brackets inside strings overcount in the scan; the parse clears them
    brackets.write_text(json.dumps({"text": "[" * 5000}) + "\n")
    check_json_depth(brackets)
    deep = tmp_path / "deep.json"  # one document: no line to name, the file is named
    deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(UserError, match=rf"^{deep}: JSON nested too deeply$"):
        check_json_depth(deep)
