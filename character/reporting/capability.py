"""Capability kept (the alignment tax): a built-in set of short questions with checkable answers
(assets/capability.yaml), asked greedily of every evaluated model, and the share each gets right with a
Wilson interval. Pure functions; evaluate generates the replies (character/stages/evaluate.py).

Why a matcher of our own: the anchors' capability suites (lm-eval-harness and the like) need the hub and
hours; this set is 60-odd one-line questions a 135M model answers in seconds, matched by normalised words.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from character.core.store import stable_id
from character.reporting.evalstats import wilson

FIRST_WORDS = 16  # a reply counts as right when the answer is among its first words (it may ramble on after)
PROMPT = "{question} Answer in a few words."
CAPABILITY_SPLIT = "capability"  # evaluate's rows of these questions (not messages of a trait)


class CapabilityItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    question: str = Field(min_length=1)
    answers: list[str] = Field(min_length=1)
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            re.compile(pattern)
        return pattern

    def model_post_init(self, _context) -> None:
        asked = f" {normalise(self.question)} "
        echoed = [a for a in self.answers if f" {normalise(a)} " in asked]
        if echoed or not all(normalise(a) for a in self.answers):
            # A reply that repeats the question would count as right: the item cannot tell.
            raise ValueError(f"capability item '{self.id}': answers {echoed or self.answers} are blank or in the "
                             "question")


def normalise(text: str) -> str:
    """Lower case, thousands separators and punctuation dropped, whitespace collapsed."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.casefold())
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def is_correct(reply: str, item: CapabilityItem) -> bool:
    words = normalise(reply).split()[:FIRST_WORDS]
    head = f" {' '.join(words)} "
    if any(f" {normalise(a)} " in head for a in item.answers):
        return True
    return item.pattern is not None and re.search(item.pattern, head.strip(), re.IGNORECASE) is not None


@lru_cache(maxsize=1)
def capability_items() -> tuple[CapabilityItem, ...]:
    """The built-in set, validated: unique ids, an answer per item that the question does not give away."""
    data = yaml.safe_load(resources.files("character.reporting").joinpath("assets/capability.yaml").read_text())
    items = tuple(CapabilityItem.model_validate(x) for x in data["items"])
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"capability.yaml repeats ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return items


def capability_message_id(item: CapabilityItem) -> str:
    """A hex id like every message's (evaluate seeds its sampling from it), stable per item."""
    return stable_id("capability", item.id)


def capability_prompts() -> list[dict]:
    """One evaluate prompt per item (message_id: capability_message_id)."""
    return [{"message_id": capability_message_id(i), "trait": "", "split": CAPABILITY_SPLIT,
             "text": PROMPT.format(question=i.question)} for i in capability_items()]


def capability_accuracy(replies: dict[str, str]) -> dict:
    """{accuracy, lo, hi, n, correct, wrong: [item ids]} over the items answered (replies keyed by item id)."""
    items = {i.id: i for i in capability_items()}
    right = {m: is_correct(r, items[m]) for m, r in replies.items() if m in items}
    interval = wilson(sum(right.values()), len(right))
    return {"accuracy": interval["p"], "lo": interval["lo"], "hi": interval["hi"], "n": interval["n"],
            "correct": sum(right.values()), "wrong": sorted(m for m, ok in right.items() if not ok)}
