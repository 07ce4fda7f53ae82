"""The supervised targets of train-sft (pure functions, no Ray, no model): which answer each training message
teaches, what the training prompt shows, and which tokens the loss reads.

Every candidate of respond/ was sampled with the trait as system prompt. Training on it with the message alone
(sft.system_prompt none) is context distillation (Askell et al. 2021): the model learns to answer without the
prompt as it answered with it. `best` keeps each message's best candidate by rank's own ranking (best-of-K),
`all` every distinct candidate, `revised` the model's revision of the best one (Constitutional AI's supervised
phase; character/judging/revision.py makes them).
"""
from __future__ import annotations

from character.core.store import stable_id
from character.core.traits import Constitution
from character.data.pm_data import encode_prompt_and_response
from character.data.prompts import character_system_prompt
from character.data.splits import pm_validation

STOPPED = "stop"  # vLLM's finish reason of an answer that ended by itself (eos or a stop string)


def example(row: dict, response: str, finish_reason: str, origin: str) -> dict:
    """One SFT target: the message (without any system prompt: the stage adds sft.system_prompt's) and the answer;
    `complete` is False for an answer cut off at its max_tokens (trained on without eos)."""
    return {"example_id": stable_id(row["message_id"], origin, response), "message_id": row["message_id"],
            "trait": row["trait"], "message": row["prompt"], "response": response,
            "complete": finish_reason == STOPPED, "origin": origin}


def _set_aside(row: dict, reason: str, text: str, detail: str | None = None, row_id: str | None = None) -> dict:
    return {"row_id": row_id or row["message_id"], "trait": row["trait"], "reason": reason, "text": text,
            "detail": detail}


def candidate_examples(responses: list[dict], source: str, best: dict[str, int], marks) -> tuple[list, list]:
    """(targets, set-aside rows) from respond's rows: with source `best` (and `revised`, which revises it) each
    message's best candidate, with `all` each distinct non-empty one. Left out, with a reason: messages and traits
    a reviewer set aside (marks), messages rank could not rank (`unranked`), empty and repeated candidates."""
    targets, set_aside = [], []
    for row in sorted(responses, key=lambda r: r["message_id"]):
        mid = row["message_id"]
        if reason := marks.set_aside_reason(row["trait"], mid):
            set_aside.append(_set_aside(row, reason, row["prompt"], marks.detail(row["trait"], mid)))
            continue
        if source != "all":
            if mid not in best:
                set_aside.append(_set_aside(row, "unranked", row["prompt"],
                                            "rank made no comparison of its candidates"))
                continue
            k = best[mid]
            targets.append(example(row, row["candidates"][k], row["finish_reasons"][k], f"best:{k}"))
            continue
        seen = set()
        for k, (text, finish) in enumerate(zip(row["candidates"], row["finish_reasons"])):
            norm = text.strip()
            reason = "empty_candidate" if not norm else "identical_candidate" if norm in seen else None
            if reason:
                set_aside.append(_set_aside(row, reason, text, row_id=stable_id(mid, "candidate", str(k))))
                continue
            seen.add(norm)
            targets.append(example(row, text, finish, f"candidate:{k}"))
    return targets, set_aside


def split_examples(targets: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(training, held-out) targets, divided by message with the preference model's carve-out
    (splits.pm_validation): at equal fractions the PM validates on messages SFT never trained on."""
    held = [t for t in targets if pm_validation(t["message_id"], eval_fraction)]
    return [t for t in targets if not pm_validation(t["message_id"], eval_fraction)], held


def encode_target(tokenizer, target: dict, system: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of one target: the chat-templated `system` turn (if any) and message, then
    the answer with eos when it ended by itself. The loss reads the answer's tokens only (TRL's completion-only
    loss): training.ppo.rollouts.build_rollouts flags exactly those."""
    return encode_prompt_and_response(tokenizer, target["message"], target["response"], max_length, system,
                                      eos=target["complete"])


def revised_examples(revisions: list[dict], marks) -> tuple[list[dict], list[dict]]:
    """(targets, set-aside rows) from the kept revisions (character/judging/revision.py): each message's last
    revision, less what a reviewer set aside since."""
    targets, set_aside = [], []
    for row in sorted(revisions, key=lambda r: r["message_id"]):
        if reason := marks.set_aside_reason(row["trait"], row["message_id"]):
            set_aside.append(_set_aside(row, reason, row["prompt"], marks.detail(row["trait"], row["message_id"])))
            continue
        targets.append(example(row, row["revision"], STOPPED, f"revised:{len(row['revisions'])}"))
    return targets, set_aside


def system_prompts(constitution: Constitution, mode: str) -> dict[str, str]:
    """trait -> what a training prompt shows before the message (sft.system_prompt): nothing, the trait's
    system prompt or the constitution's, as respond showed them."""
    return {t.name: "" if mode == "none" else character_system_prompt(t, constitution, mode)
            for t in constitution.traits}
