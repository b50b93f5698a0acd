"""The self-instruct prompt and the parser for what a generator writes after it.

As in self-instruct (Wang et al. 2022) and Alpaca, a prompt lists a few existing tasks (seeds and
earlier generations, shuffled) as numbered blocks and ends where the next task's instruction
starts; a completion model continues the list:

    Come up with new tasks for an AI assistant. ...

    Task 1
    Instruction: Give an antonym for the word.
    Input: generous

    Task 2
    Instruction: Name three renewable sources of energy.
    Input: <none>

    Task 3
    Instruction:▌

Responses are asked for separately, one chat turn per task (`palmrl.tasks.format_prompt`: the
instruction, then the input on the next line), so each answer is written by the generator as an
assistant and never sees the other tasks. Outputs of the examples are left out of the prompt: the
first step only invents tasks (self-instruct's instruction-generation step), which keeps prompts
short enough for a small model's context.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

HEADER = ("Come up with new tasks for an AI assistant. Each task has an instruction and, when the task "
          "needs one, an input. Make each new task different from the ones above it: vary the verbs, "
          "topics and kinds of answer.\n\n")
NO_INPUT = "<none>"
_NO_INPUT_SPELLINGS = {"<none>", "none", "<noinput>", "no input", "n/a", "na", "-", "(none)", "empty", ""}
_TASK_HEADING = re.compile(r"^[ \t]*(?:#+\s*)?Task\s+\d+\s*[:.]?[ \t]*$", re.IGNORECASE | re.MULTILINE)
_FIELD = re.compile(r"^[ \t]*(Instruction|Input|Output)\s*:[ \t]*", re.IGNORECASE | re.MULTILINE)


def format_task(number: int, instruction: str, input: str = "") -> str:
    return f"Task {number}\nInstruction: {instruction}\nInput: {input or NO_INPUT}\n\n"


def build_prompt(examples: Sequence[Mapping[str, str]]) -> str:
    """The header, the examples as Task 1..k, and an open `Task k+1 / Instruction:` for the generator."""
    body = "".join(format_task(i + 1, ex["instruction"], ex.get("input") or "") for i, ex in enumerate(examples))
    return f"{HEADER}{body}Task {len(examples) + 1}\nInstruction:"


def stop_after(examples: int, tasks_per_call: int) -> tuple[str, ...]:
    """Stop strings that end the completion once it starts the task after the last one wanted."""
    return (f"Task {examples + 1 + tasks_per_call}\n",)


class Parsed(NamedTuple):
    """New tasks read from one completion."""

    tasks: list[tuple[str, str]]  # (instruction, input) pairs, input "" when none
    unparsable: int  # blocks that are not `Instruction: ... [Input: ...]`
    truncated: int  # a last block cut off by the token limit (0 or 1)


def _clean_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower() in _NO_INPUT_SPELLINGS else text


def parse_block(block: str) -> tuple[str, str] | None:
    """`Instruction: ...` then optionally `Input: ...` (and an `Output: ...` we ignore)."""
    fields: dict[str, str] = {}
    matches = list(_FIELD.finditer(block))
    if not matches or block[:matches[0].start()].strip():
        return None
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = m.group(1).lower()
        if name in fields:  # a second Instruction: the model ran two tasks together
            return None
        fields[name] = block[m.end(): nxt.start() if nxt else len(block)]
    if "instruction" not in fields:
        return None
    instruction = " ".join(fields["instruction"].split())  # one line, as every seed instruction is
    return instruction, _clean_input(fields.get("input", ""))


def parse_tasks(continuation: str, *, cut_off: bool) -> Parsed:
    """Split `Instruction:` + the generator's continuation into task blocks and read each one.

    `cut_off` says the completion hit its token limit: its last block may be unfinished, so it is
    dropped (and counted as truncated) rather than kept half-written.
    """
    blocks = [b for b in _TASK_HEADING.split("Instruction:" + continuation)]
    blocks = [b for b in blocks if b.strip()]
    truncated = 0
    if cut_off and blocks:
        blocks, truncated = blocks[:-1], 1
    tasks, unparsable = [], 0
    for block in blocks:
        parsed = parse_block(block)
        if parsed is None:
            unparsable += 1
        else:
            tasks.append(parsed)
    return Parsed(tasks, unparsable, truncated)
