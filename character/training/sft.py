"""train-sft's side of the library: its targets read from the run (the driver and every Ray Train worker read the
same ones), the log-probabilities the completion-only loss reads, and the held-out NLL per trait.
"""
from __future__ import annotations

from collections import defaultdict

from character.core import schemas
from character.core.config import Config
from character.core.store import StageOutput
from character.data.sft_data import candidate_examples, encode_target, revised_examples, split_examples
from character.judging.ranking import best_candidates
from character.judging.revision import REVISIONS
from character.review.marks import load_marks
from character.training.pairs import gather_pair_scores
from character.training.scoring import answer_token_logprobs


def candidates_to_train(config: Config, marks) -> tuple[list[dict], list[dict]]:
    """(targets, set-aside rows) from respond's candidates and rank's ranking, by sft.source (`revised` revises
    the `best` ones)."""
    out = config.run.output_dir
    responses = StageOutput(out, "responses").read(
        schema=schemas.RESPONSES, columns=["message_id", "trait", "prompt", "candidates", "finish_reasons"]).to_pylist()
    best = {}
    if config.sft.source != "all":
        comparisons = StageOutput(out, "preferences").read("comparisons", schema=schemas.COMPARISONS).to_pylist()
        best = best_candidates(comparisons, config.rank.aggregate)
    return candidate_examples(responses, "all" if config.sft.source == "all" else "best", best, marks)


def load_targets(config: Config, marks=None) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, held-out, set-aside) targets of sft.source. `marks`: the review marks the driver read (the workers
    train on what the driver checked, even if a reviewer marks more meanwhile)."""
    marks = load_marks(config.run.output_dir) if marks is None else marks
    if config.sft.source == "revised":
        sft = StageOutput(config.run.output_dir, "sft")
        targets, set_aside = revised_examples(sft.read(REVISIONS, schema=schemas.SFT_REVISIONS).to_pylist(), marks)
        if sft.part_files(REVISIONS, "rejected"):
            set_aside += sft.read(REVISIONS, "rejected", schema=schemas.REJECTED).to_pylist()
        # Messages never revised (set aside before: a reviewer's mark, unranked), each counted once.
        seen = {(r["row_id"], r["reason"]) for r in set_aside}
        set_aside += [r for r in candidates_to_train(config, marks)[1] if (r["row_id"], r["reason"]) not in seen]
    else:
        targets, set_aside = candidates_to_train(config, marks)
    train, held = split_examples(targets, config.sft.eval_fraction)
    return train, held, set_aside


def target_logprobs(model, tokenizer, rows: list[dict], systems: dict[str, str], max_length: int):
    """Per-token log-probs of each target's answer [B, T] and the mask of the answer's tokens [B, T]: what
    losses.completion_nll and the held-out NLL read (scoring.answer_token_logprobs: one forward of all rows)."""
    parts = [encode_target(tokenizer, r, systems.get(r["trait"], ""), max_length) for r in rows]
    return answer_token_logprobs(model, parts, tokenizer.pad_token_id)


def held_out_nll(model, tokenizer, held: list[dict], systems: dict[str, str], max_length: int, batch: int,
                 rank: int, world: int) -> dict:
    """Mean NLL per answer token of the held-out targets, overall and per trait, and their counts (a collective:
    every rank scores its shard, under ZeRO-3 the forwards are collectives)."""
    import torch

    def score(rows):
        logp, mask = target_logprobs(model, tokenizer, rows, systems, max_length)
        return (-(logp * mask).sum(-1)).tolist(), mask.sum(-1).tolist()

    with torch.no_grad():
        sums, tokens = gather_pair_scores(held, rank, world, batch, score)
    per_trait: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row, s, n in zip(held, sums, tokens):
        per_trait[row["trait"]][0] += s
        per_trait[row["trait"]][1] += n
    total = sum(tokens)
    return {"eval_nll": sum(sums) / total if total else float("nan"), "eval_examples": len(held),
            "eval_tokens": int(total), "per_trait_nll": {t: s / n for t, (s, n) in sorted(per_trait.items()) if n}}
