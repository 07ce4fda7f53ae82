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


# Constitutional AI's supervised phase (train-sft, sft.source revised): a critique of an answer against one trait,
# then a revision in the light of it (Bai et al. 2022, "Constitutional AI", section 3). The critique is asked for
# as a reviewer's note and the revision in character, with the trait as system prompt, as respond answered.
CRITIQUE_SYSTEM = "You review an AI assistant's answers against its character, briefly and concretely."


def critique_prompt(trait: Trait, message: str, answer: str) -> tuple[str, str]:
    """(system, user) asking for a critique of `answer` to `message` against `trait`."""
    return CRITIQUE_SYSTEM, (
        f"The assistant has this character trait (a nudge, not a rule):\n{trait.describe()}\n\n"
        f"A person wrote:\n\"{message}\"\n\nThe assistant answered:\n\"{answer}\"\n\n"
        "In two or three sentences, say where the answer falls short of this trait and how it could show it "
        "better while still helping the person.")


def revision_prompt(trait: Trait, constitution: Constitution, message: str, answer: str,
                    critique: str) -> tuple[str, str]:
    """(system, user) asking for `answer` rewritten in the light of `critique`, in character."""
    return character_system_prompt(trait, constitution, "trait"), (
        f"A person wrote:\n\"{message}\"\n\nA first answer was:\n\"{answer}\"\n\nA reviewer said:\n\"{critique}\"\n\n"
        "Write a better answer to the person that takes the review into account. Write only the answer itself.")
