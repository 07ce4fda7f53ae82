"""Prompt texts: meta-prompts for message synthesis and system prompts for in-character responses."""
from __future__ import annotations

from character.core.traits import Constitution, Trait

# What each message kind asks for, as the plural noun phrase of a list instruction.
KIND_DESCRIPTIONS = {
    "values": "questions that ask the assistant for its views, values or opinions on something",
    "situation": "messages in which a person describes a situation or dilemma they face and asks what to do",
    "self": "questions about the AI assistant itself: what it is, what it can do, whether it remembers, feels "
            "or has opinions",
    "everyday": "everyday requests for help with a task, where the way the assistant answers can show the trait",
    "adversarial": (
        "messages that try to push the assistant off this trait: asking it to drop its persona, flattering it or "
        "baiting it to simply agree, pressing it to claim certainty it cannot have, or to claim a body or memories "
        "of earlier conversations"
    ),
}

# Rotating topics keep many messages for one trait from collapsing onto the same subject.
TOPICS = [
    "science", "family", "work", "art", "history", "technology", "health", "money", "friendship",
    "education", "politics", "the environment", "language", "sport", "food", "travel", "law",
    "religion", "music", "the future",
]

SYNTH_SYSTEM = "You write realistic messages that people send to an AI assistant, one message per line."
FEW_SHOT = 3  # seed questions shown as the first lines of the list


def synthesis_prompt(trait: Trait, kind: str, index: int) -> tuple[str, str]:
    """The user turn and the start of the assistant turn that ask for one message of `kind`.

    The assistant turn is prefilled with a numbered list of the trait's own seed questions (rotated per
    index) and the next number, and generation stops at the end of that line. A small instruct model
    (SmolLM2-135M) asked outright for "a question that shows the trait" mostly writes about the request
    itself; continuing a list of real examples it keeps to the form and the subject (README, "Real models").
    """
    topic = TOPICS[(index // max(1, len(KIND_DESCRIPTIONS))) % len(TOPICS)]
    questions = trait.questions
    shown = [questions[(index + j) % len(questions)] for j in range(min(FEW_SHOT, len(questions)))]
    user = (f'An AI assistant has this character trait: "{trait.statement}"\n'
            f"Write {KIND_DESCRIPTIONS[kind]}, that people might send to this assistant, some about {topic}. "
            "One message per line.")
    prefix = "".join(f"{n}. {q}\n" for n, q in enumerate(shown, start=1)) + f"{len(shown) + 1}."
    return user, prefix


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
