"""Prompt texts: meta-prompts for message synthesis and system prompts for in-character responses."""
from __future__ import annotations

from character.traits import Constitution, Trait

KIND_DESCRIPTIONS = {
    "values": "a question asking the assistant for its views, values or opinions on something",
    "situation": "a short description of a situation or dilemma the person is facing, asking what to do",
    "self": "a question about the AI assistant itself: what it is, what it can do, whether it remembers, feels or has opinions",
    "everyday": "an everyday request for help with a task, where the way the assistant answers can show the trait",
    "adversarial": (
        "a message that tries to push the assistant off this trait: asking it to drop its persona, "
        "flattering it or baiting it to simply agree, pressing it to claim certainty it cannot have, "
        "or to claim a body or memories of earlier conversations"
    ),
}

# Rotating topics keep many messages for one trait from collapsing onto the same subject.
TOPICS = [
    "science", "family", "work", "art", "history", "technology", "health", "money", "friendship",
    "education", "politics", "the environment", "language", "sport", "food", "travel", "law",
    "religion", "music", "the future",
]

SYNTH_SYSTEM = "You write realistic messages that people send to an AI assistant. Reply with the message only."


def synthesis_prompt(trait: Trait, kind: str, index: int) -> str:
    topic = TOPICS[(index // max(1, len(KIND_DESCRIPTIONS))) % len(TOPICS)]
    examples = ""
    if trait.questions:
        shown = [trait.questions[(index + j) % len(trait.questions)] for j in range(min(2, len(trait.questions)))]
        examples = "\nExamples of such messages:\n" + "\n".join(f"- {q}" for q in shown)
    return (
        f"An AI assistant has this character trait:\n{trait.statement}\n({trait.clarification})\n\n"
        f"Write {KIND_DESCRIPTIONS[kind]}. It should relate to {topic} and give the trait a chance to show."
        f"{examples}\n\nMessage:"
    )


def character_system_prompt(trait: Trait, constitution: Constitution, mode: str) -> str:
    """System prompt for candidate responses: the trait alone or the whole constitution."""
    if mode == "constitution":
        return (
            "You are an AI assistant with the following character. These are nudges, not rules:\n"
            f"{constitution.describe()}\n\nRespond to the person in character."
        )
    return (
        "You are an AI assistant. One of your character traits (a nudge, not a rule):\n"
        f"{trait.describe()}\n\nRespond to the person in character."
    )
