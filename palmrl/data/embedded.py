"""The default corpus that ships with the package: human chit-chat conversations, no network.

Why chitchat (the `chitchat-dataset` package, Chit Chat Challenge, MIT licence):
- it is real human English written by people talking to each other, conversational like the
  assistant we end up with, not synthetic or templated text;
- it installs from PyPI as an ~8 MB wheel holding 12.5 MB of text (7,168 conversations), enough to
  pretrain a tiny model and a 2k-8k SentencePiece vocabulary in seconds on a laptop, offline;
- 5,988 conversations carry human ratings (interesting, upbeat, witty; 1-10) and share ~35 starter
  prompts, so the reward stage gets preference data from the same package: two conversations on
  one prompt with different ratings make a (chosen, rejected) pair.

Facts measured on chitchat-dataset 0.9.0: speakers strictly alternate between turns (a turn is one
or more consecutive messages of one person); 3,150 conversations are a single turn (one person
only); 239 have no starter prompt; no message holds a newline; 33 messages are blank.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from palmrl.errors import UserError

EMBEDDED_CORPORA = ("chitchat",)
RENDER_VERSION = 1  # bump when `render_conversation` changes, so token caches are rebuilt
SPEAKERS = ("A", "B")  # the first speaker of a conversation is A, the other B


@dataclass(frozen=True)
class ChitchatConversation:
    """One conversation of the Chit Chat Challenge."""

    id: str  # the dataset's UUID key
    turns: tuple[str, ...]  # turn i is spoken by SPEAKERS[i % 2]; a turn's messages joined by a space
    prompt: str | None  # the starter question shown to both people (None on 239 conversations)
    ratings: Mapping[str, int] | None  # {"interesting", "upbeat", "witty"} -> 1..10, None if unrated
    start: str  # ISO-8601 start time


@functools.lru_cache(maxsize=1)
def chitchat_conversations() -> tuple[ChitchatConversation, ...]:
    """All 7,168 conversations, in the file's order (deterministic for a package version)."""
    import chitchat_dataset  # the package only holds the JSON; import it when asked for

    with open(chitchat_dataset._PATH, encoding="utf-8") as f:
        raw = json.load(f)
    conversations = []
    for conversation_id, record in raw.items():
        turns = tuple(
            " ".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in record["messages"]
        )
        ratings = record.get("ratings")
        conversations.append(
            ChitchatConversation(
                id=conversation_id,
                turns=turns,
                prompt=record.get("prompt"),
                ratings=MappingProxyType(dict(ratings)) if ratings else None,
                start=record["start"],
            )
        )
    return tuple(conversations)


def render_conversation(conversation: ChitchatConversation) -> str:
    """One document: a line per turn, "A: ..." and "B: ..." alternating."""
    return "\n".join(f"{SPEAKERS[i % 2]}: {turn}" for i, turn in enumerate(conversation.turns))


def embedded_records(name: str = "chitchat") -> Iterator[dict]:
    """Records {"id", "text"} of an embedded corpus, one per document, in a fixed order."""
    _check_name(name)
    for conversation in chitchat_conversations():
        yield {"id": conversation.id, "text": render_conversation(conversation)}


def embedded_texts(name: str = "chitchat") -> Iterator[str]:
    """Documents of an embedded corpus, in a fixed order."""
    for record in embedded_records(name):
        yield record["text"]


def embedded_version(name: str = "chitchat") -> str:
    """Identifies the content of an embedded corpus: package version and rendering version."""
    _check_name(name)
    return f"chitchat-dataset=={importlib.metadata.version('chitchat-dataset')};render={RENDER_VERSION}"


def _check_name(name: str) -> None:
    if name not in EMBEDDED_CORPORA:
        raise UserError(f"data.name={name!r} is not an embedded corpus; choose one of {', '.join(EMBEDDED_CORPORA)}")
