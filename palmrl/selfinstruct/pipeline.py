"""The self-instruct loop: seeds -> new tasks -> responses -> filters -> an append-only JSONL.

Each round (Wang et al. 2022, https://arxiv.org/abs/2212.10560; Alpaca; Lamini):
1. build `prompts_per_round` prompts, each from `seed_examples` random seeds plus
   `generated_examples` random records kept so far, shuffled (`prompts.build_prompt`);
2. ask the generator to continue each, and parse up to `tasks_per_call` new tasks from it;
3. drop tasks that fail the instruction checks or repeat a pooled one (seeds are in the pool), and
   pool the rest at once, so two copies in one round cannot both pass;
4. ask the generator for each surviving task's response, as an assistant;
5. drop failed responses (empty, cut off, echoing, blocklisted), append the kept records, each with
   its provenance, and fsync: a crash loses at most the round in flight.

A rerun with the same `out` resumes: the records already there are read back into the pool and the
count, never rewritten (a half-written last line from a crash is cut off first). Each round's
draws come from (seed, records so far, round), and the local backend samples tokens from one
generator seeded once, so with it the same seed, config and file give the same next records.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from palmrl.errors import UserError
from palmrl.io import read_jsonl, write_atomic
from palmrl.selfinstruct.backends import Backend, GenParams
from palmrl.selfinstruct.filters import Fields, RecordFilter
from palmrl.selfinstruct.prompts import build_prompt, parse_tasks, stop_after
from palmrl.tasks import format_prompt

EMBEDDED_SEEDS = "seeds.jsonl"  # package data beside this module: 101 hand-written tasks


# ---------------------------------------------------------------------------------------------
# seeds and the output file


def load_seeds(path: str | os.PathLike | None) -> list[dict]:
    """Seed tasks `{id, instruction, input, output?}`: a JSONL file, or the embedded set when None."""
    if path is None:
        source = resources.files("palmrl.selfinstruct").joinpath(EMBEDDED_SEEDS)
        with resources.as_file(source) as file:
            rows, where = read_jsonl(Path(file), key="seeds"), "embedded seeds"
    else:
        rows, where = read_jsonl(Path(path), key="seeds"), str(path)
    seeds = []
    for number, obj in rows:
        instruction, input = obj.get("instruction"), obj.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"{where}:{number}: a seed needs a non-empty \"instruction\" string")
        if not isinstance(input, str) or not isinstance(obj.get("output", ""), str):
            raise UserError(f"{where}:{number}: \"input\" and \"output\" must be strings")
        seeds.append({"id": str(obj.get("id") or f"seed-{number:04d}"), "instruction": instruction.strip(),
                      "input": input.strip(), "output": obj.get("output", "")})
    if not seeds:
        raise UserError(f"seeds: {where} holds no seed tasks")
    return seeds


def read_kept(path: Path) -> list[dict]:
    """Records a previous run kept in `path`; a torn last line (crash mid-write) is cut off, but only
    once every line before it has been read as a record: a file that is not palmrl's JSON lines (a
    pretty-printed .json, someone's notes) is refused untouched."""
    if not path.is_file():
        return []
    kept = []
    for number, obj in read_jsonl(path, key="out", torn_tail="drop"):
        if not isinstance(obj.get("instruction"), str) or not isinstance(obj.get("output"), str):
            raise UserError(f"{path}:{number}: not a self-instruct record (no instruction/output); "
                            f"choose another out= or set overwrite=true")
        obj.setdefault("id", f"gen-{len(kept):06d}")  # in memory only: records from elsewhere may lack one
        kept.append(obj)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            with open(path, "ab") as f:  # a complete record missing only its newline
                f.write(b"\n")
        except ValueError:
            with open(path, "r+b") as f:
                f.truncate(cut)
            print(f"palmrl selfinstruct: cut a half-written last line off {path}", flush=True)
    return kept


def report_path(out: Path) -> Path:
    """`instructions.jsonl` -> `instructions.report.json`, beside it."""
    return out.with_name(f"{out.stem}.report.json")


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass(frozen=True)
class PromptConfig:
    """The `prompt:` config block."""

    seed_examples: int = 3  # seed tasks per prompt (Alpaca: 3)
    generated_examples: int = 2  # generated tasks per prompt once there are some (self-instruct: 2 of 8)
    tasks_per_call: int = 3  # new tasks asked per prompt (Alpaca asked a 175B model for 20; small ones drift)

    def __post_init__(self) -> None:
        for key in ("seed_examples", "tasks_per_call"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"prompt.{key} must be >= 1, got {getattr(self, key)}")
        if int(self.generated_examples) < 0:
            raise UserError(f"prompt.generated_examples must be >= 0, got {self.generated_examples}")


@dataclass
class SelfInstruct:
    """One run of the loop over a backend, writing to `out` (see the module docstring)."""

    backend: Backend
    seeds: list[dict]
    out: Path
    target: int
    record_filter: RecordFilter
    prompt: PromptConfig
    instruction: GenParams
    response: GenParams
    prompts_per_round: int = 16  # prompts per round: the local batch, or the HTTP requests in flight
    give_up_after: int = 25  # stop after this many rounds in a row that keep nothing
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target < 1:
            raise UserError(f"target must be >= 1, got {self.target}")
        if self.prompts_per_round < 1:
            raise UserError(f"prompts_per_round must be >= 1, got {self.prompts_per_round}")
        self.kept: list[dict] = read_kept(self.out)
        self.resumed_from = len(self.kept)
        # the pool: seeds under keys [0, S), kept records under S + their index in out
        for i, s in enumerate(self.seeds):
            self.record_filter.add(Fields(s["instruction"], s["input"], s["output"]), i)
        for i, rec in enumerate(self.kept):
            fields = Fields(rec["instruction"], rec.get("input") or "", rec["output"])
            self.record_filter.add(fields, len(self.seeds) + i)
        self.rounds = 0
        self._pending_key = 0
        self.calls = {"instruction": 0, "response": 0}
        self.stopped = ""

    # one round, in the order the module docstring gives

    def _prompts(self, rng: random.Random) -> list[tuple[str, list[str], int]]:
        """(prompt text, ids of the example tasks in it, how many examples) per prompt of a round."""
        out = []
        for _ in range(self.prompts_per_round):
            examples = rng.sample(self.seeds, min(self.prompt.seed_examples, len(self.seeds)))
            examples += rng.sample(self.kept, min(self.prompt.generated_examples, len(self.kept)))
            rng.shuffle(examples)
            out.append((build_prompt(examples), [e["id"] for e in examples], len(examples)))
        return out

    def _new_tasks(self, rng: random.Random) -> list[tuple[str, str, list[str]]]:
        """Steps 1-3: candidate tasks that passed the instruction checks and dedup, with their examples."""
        prompts = self._prompts(rng)
        # the examples count is the same for every prompt of a round, so one stop string serves all
        params = replace(self.instruction, stop=stop_after(prompts[0][2], self.prompt.tasks_per_call))
        self._instruction_used = params
        completions = self.backend.complete([p for p, _, _ in prompts], params)
        self.calls["instruction"] += len(prompts)
        rf, early_dedup = self.record_filter, self.record_filter.dedup.key != "all"
        tasks = []
        for (_, example_ids, _), completion in zip(prompts, completions):
            parsed = parse_tasks(completion.text, cut_off=completion.finish_reason == "length"
                                 and rf.filters.drop_truncated)
            for _ in range(parsed.unparsable):
                rf.reject("unparsable")
            for _ in range(parsed.truncated):
                rf.reject("truncated")
            for instruction, input in parsed.tasks[: self.prompt.tasks_per_call]:
                reason = rf.instruction_problem(instruction, input)
                fields = Fields(instruction, input, "")
                duplicate = rf.duplicate(fields) if reason is None and early_dedup else None
                if reason or duplicate:
                    rf.reject(reason or duplicate[0])
                    continue
                if early_dedup:
                    self._pending_key -= 1  # pooled now (negative keys: tasks not yet kept as records)
                    rf.add(fields, self._pending_key)
                tasks.append((instruction, input, example_ids))
        return tasks

    def _records(self, tasks: list[tuple[str, str, list[str]]]) -> list[dict]:
        """Steps 4-5: responses, their checks, and the records to append."""
        if not tasks:
            return []
        conversations = [[{"role": "user", "content": format_prompt(i, x)}] for i, x, _ in tasks]
        completions = self.backend.chat(conversations, self.response)
        self.calls["response"] += len(tasks)
        rf, records = self.record_filter, []
        for (instruction, input, example_ids), completion in zip(tasks, completions):
            fields = Fields(instruction, input, completion.text.strip())
            reason = rf.response_problem(fields, truncated=completion.finish_reason == "length")
            if reason is None and rf.dedup.key == "all":
                duplicate = rf.duplicate(fields)
                reason = duplicate[0] if duplicate else None
            if reason is not None:
                rf.reject(reason)
                continue
            index = len(self.kept) + len(records)
            if rf.dedup.key == "all":
                rf.add(fields, len(self.seeds) + index)
            rf.kept += 1
            records.append({
                "id": f"gen-{index:06d}", "instruction": instruction, "input": input, "output": fields.output,
                "provenance": {
                    "examples": example_ids,  # the seed and generated tasks shown in its prompt
                    "generator": self.backend.describe(),
                    "sampling": {"instruction": self._instruction_used.to_dict(), "response": self.response.to_dict()},
                    "round": self.rounds, "seed": self.seed,
                    "finish_reason": completion.finish_reason,
                },
            })
        return records

    def _append(self, records: list[dict]) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.kept += records

    def report(self, elapsed: float) -> dict:
        made = len(self.kept) - self.resumed_from
        return {
            "out": str(self.out), "target": self.target, "kept": len(self.kept), "kept_this_run": made,
            "resumed_from": self.resumed_from, "rejected": self.record_filter.counts(),
            "rounds": self.rounds, "calls": dict(self.calls), "elapsed_s": round(elapsed, 3),
            "records_per_s": round(made / elapsed, 3) if elapsed > 0 else None,
            "generator": self.backend.describe(), "seeds": len(self.seeds), "seed": self.seed,
            "stopped": self.stopped or "target reached",
        }

    def run(self, on_round: Callable[[SelfInstruct], None] | None = None) -> dict:
        """Rounds until `target` records are in `out`; returns the report (also written beside out)."""
        t0, idle = time.perf_counter(), 0
        while len(self.kept) < self.target:
            rng = random.Random(f"{self.seed}:{len(self.kept)}:{self.rounds}")
            records = self._records(self._new_tasks(rng))[: self.target - len(self.kept)]
            self._append(records)
            self.rounds += 1
            idle = 0 if records else idle + 1
            write_atomic(report_path(self.out), json.dumps(self.report(time.perf_counter() - t0), indent=2) + "\n")
            if on_round is not None:
                on_round(self)
            if idle >= self.give_up_after:
                self.stopped = (f"gave up: {idle} rounds in a row kept nothing (give_up_after); "
                                f"see the rejection counts")
                break
        report = self.report(time.perf_counter() - t0)
        write_atomic(report_path(self.out), json.dumps(report, indent=2) + "\n")
        return report
