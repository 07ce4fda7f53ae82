"""Constitutional AI's supervised phase for train-sft (sft.source revised): the model critiques an answer against
its trait and rewrites it in the light of the critique, `sft.revision.rounds` times, each round revising the last
revision (Bai et al. 2022). The rounds of a batch of messages run in one Ray Data actor holding one vLLM engine
(the critiques of every message of the batch in one generate call, then their revisions), which writes what it
made itself: sft/revisions/ and, set aside with a reason, sft/revisions/rejected/.

A revision is set aside when it cannot be a training target: a prompt that did not fit the engine
(prompt_too_long), an empty critique or revision (empty_critique, empty_revision), a revision cut off at its
max_tokens (truncated_revision: it did not end where the model would end it), or a last revision that says
what the original said (identical_revision: nothing was revised).
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa

from character.core import schemas
from character.core.config import Config, SamplingConfig
from character.core.store import StageOutput, seed_from_id, stable_id
from character.core.traits import Constitution
from character.data.prompts import critique_prompt, revision_prompt
from character.inference.engine import PerThreadTokenizer, create_llm, generate_chat
from character.inference.gates import paced_batch
from character.inference.shared_engine import SharedEngine

REVISIONS = "revisions"  # the folder under the stage's output
SET_ASIDE = ("prompt_too_long", "empty_critique", "empty_revision", "truncated_revision", "identical_revision")


def revision_problem(original: str, revised: str, finish_reason: str, last: bool) -> str | None:
    """Why a revision cannot be kept (None: it can). `last`: the final round's, which must differ from the original."""
    if not revised.strip():
        return "empty_revision"
    if finish_reason != "stop":
        return "truncated_revision"
    if last and revised.strip() == original.strip():
        return "identical_revision"
    return None


def revise_rows(rows: list[dict], generate, constitution: Constitution, rounds: int, critique: SamplingConfig,
                revision: SamplingConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Rows (message_id, trait, prompt: the message, original: the answer) -> (SFT_REVISIONS rows, REJECTED rows).
    `generate(systems, users, seeds, sampling) -> [{outputs, finish_reasons, reject_reason, detail}]` (one
    sample each). Every row ends in exactly one of the two lists."""
    traits = constitution.by_name()
    live = [{**r, "critiques": [], "revisions": [], "current": r["original"]} for r in rows]
    rejected: list[dict] = []

    def set_aside(state: dict, reason: str, text: str, detail: str) -> None:
        rejected.append({"row_id": state["message_id"], "trait": state["trait"], "reason": reason, "text": text,
                         "detail": detail})

    for round_ in range(1, rounds + 1):
        for step in ("critique", "revision"):
            if not live:
                break
            if step == "critique":
                prompts = [critique_prompt(traits[s["trait"]], s["prompt"], s["current"]) for s in live]
            else:
                prompts = [revision_prompt(traits[s["trait"]], constitution, s["prompt"], s["current"],
                                           s["critiques"][-1]) for s in live]
            seeds = [seed_from_id(stable_id(s["message_id"], step, str(round_)), seed) for s in live]
            outputs = generate([p[0] for p in prompts], [p[1] for p in prompts], seeds,
                               critique if step == "critique" else revision)
            kept = []
            for state, out in zip(live, outputs):
                where = f"{step}, round {round_} of {rounds}"
                if out["reject_reason"] is not None:
                    set_aside(state, out["reject_reason"], state["current"], f"{where}: {out.get('detail') or ''}")
                    continue
                text, finish = out["outputs"][0].strip(), out["finish_reasons"][0]
                if step == "critique":
                    if not text:
                        set_aside(state, "empty_critique", state["current"], where)
                        continue
                    state["critiques"].append(text)
                else:
                    if (why := revision_problem(state["original"], text, finish, round_ == rounds)) is not None:
                        set_aside(state, why, text, f"{where}; critique: {state['critiques'][-1]}")
                        continue
                    state["revisions"].append(text)
                    state["current"] = text
                kept.append(state)
            live = kept
    made = [{"message_id": s["message_id"], "trait": s["trait"], "prompt": s["prompt"], "original": s["original"],
             "critiques": s["critiques"], "revisions": s["revisions"], "revision": s["current"]} for s in live]
    return made, rejected


class Reviser:
    """Ray Data actor: rows of answers to revise in, their revisions written under `<sft>/revisions/` (kept and
    set aside, keyed by the batch: a retried batch overwrites its own parts), a one-row count table out."""

    def __init__(self, config_json: str, constitution_json: str, out: StageOutput):
        self.config = Config.model_validate_json(config_json)
        self.constitution = Constitution.model_validate_json(constitution_json)
        self.out = out
        model = self.config.sft.revision.model or self.config.model.name
        self.llm = SharedEngine(create_llm(model, self.config.model.dtype, self.config.engine, self.config.run.seed))
        self.tokenizers = PerThreadTokenizer(model)

    def generate(self, systems, users, seeds, sampling: SamplingConfig) -> list[dict]:
        return generate_chat(self.llm, self.tokenizers.get(), systems, users, seeds,
                             sampling.model_copy(update={"n": 1}), self.config.engine.max_model_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with paced_batch():  # a no-op outside tests (character.inference.gates)
            rows = batch.to_pylist()
            rev = self.config.sft.revision
            made, rejected = revise_rows(rows, self.generate, self.constitution, rev.rounds, rev.critique_sampling,
                                         rev.revision_sampling, self.config.run.seed)
            key = stable_id(*sorted(r["message_id"] for r in rows))
            if made:
                self.out.write_part(pa.Table.from_pylist(made, schema=schemas.SFT_REVISIONS), REVISIONS, key=key)
            if rejected:
                self.out.write_part(pa.Table.from_pylist(rejected, schema=schemas.REJECTED), REVISIONS, "rejected",
                                    key=key)
            drops = Counter(r["reason"] for r in rejected)
            return pa.table({"rows_in": [len(rows)], "rows_out": [len(made)],
                             "drops": [",".join(f"{k}:{v}" for k, v in drops.items())], "new_tokens": [0]})
