"""Stage `rank`: the model ranks its own candidates against the trait → soft-labelled preference pairs.

Per message: set aside empty and identical candidates; compare the rest pairwise (all pairs for K <= 4,
else random opponents), each pair in both orders; soft label = mean P(first better) over the orders;
aggregate into a ranking; emit pairs, setting aside ties. Each batch writes its pairs, comparisons and
set-aside rows under one key, then a commit record; a rerun prunes parts without a commit record and
skips committed messages.
"""
from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa

from character.core import schemas
from character.core.config import Config, RankConfig
from character.core.store import StageInputError, StageOutput, stable_id
from character.core.traits import Constitution
from character.data.prompts import character_system_prompt
from character.execution.registry import spec_of
from character.execution.runtime import (StageResult, batch_key, consume_counts, format_counts, upstream_cause,
                                         without_done)
from character.execution.stage_run import run_stage
from character.inference.engine import engine_sized_blocks, judge_pool_args
from character.judging.judge import Comparison, build_judge, judge_name
from character.judging.ranking import (bradley_terry_scores, choose_pairs, clamp, comparison_pairs, label_stats,
                                       mean_win_scores, soft_label)
from character.review.marks import ReviewMarks, active_constitution, load_marks

SPEC = spec_of(__name__)
WORK = "_work"


def _reject(rows: list, row_id: str, trait: str, reason: str, text: str, detail: str | None = None) -> None:
    rows.append({"row_id": row_id, "trait": trait, "reason": reason, "text": text, "detail": detail})


def rank_rows(rows: list[dict], judge, rank: RankConfig, trait_texts: dict[str, str], judge_label: str,
              systems: dict[str, str] | None = None, marks: ReviewMarks | None = None) -> dict:
    """Responses rows → {"pairs", "comparisons", "rejected"} row lists. Pure but for the judge call.
    `systems`: each trait's in-character system prompt (what a contrast judge conditions on). `marks`: a
    reviewer's; messages flagged off-trait (or of a trait marked drop) and flagged pairs are set aside."""
    systems, marks = systems or {}, marks or ReviewMarks()
    plans, comparisons = [], []
    out = {"pairs": [], "comparisons": [], "rejected": []}
    for row in rows:
        mid, trait = row["message_id"], row["trait"]
        if reason := marks.set_aside_reason(trait, mid):
            _reject(out["rejected"], mid, trait, reason, row["prompt"], marks.detail(trait, mid))
            continue
        kept, seen = [], set()
        for idx, text in enumerate(row["candidates"]):
            norm = text.strip()
            reason = "empty_candidate" if not norm else "identical_candidate" if norm in seen else None
            if reason:
                _reject(out["rejected"], stable_id(mid, "candidate", str(idx)), trait, reason, text)
                continue
            seen.add(norm)
            kept.append(idx)
        pairs = [(kept[a], kept[b]) for a, b in comparison_pairs(len(kept), rank.scheme, rank.opponents, mid)]
        plans.append((row, kept, pairs, len(comparisons)))
        for i, j in pairs:
            cand = row["candidates"]
            system = systems.get(trait, "")
            comparisons.append(Comparison(trait_texts[trait], row["prompt"], cand[i], cand[j], system))
            comparisons.append(Comparison(trait_texts[trait], row["prompt"], cand[j], cand[i], system))
    probs = judge.prob_first(comparisons) if comparisons else []

    for row, kept, pairs, start in plans:
        mid, trait, cand = row["message_id"], row["trait"], row["candidates"]
        labels, q = {}, {}
        for n, (i, j) in enumerate(pairs):
            q_ij, q_ji = probs[start + 2 * n], probs[start + 2 * n + 1]
            if q_ij is None or q_ji is None:
                _reject(out["rejected"], stable_id(mid, str(i), str(j)), trait, "judge_prompt_too_long", row["prompt"])
                continue
            q[(i, j)] = (q_ij, q_ji)
            labels[(i, j)] = soft_label(q_ij, q_ji)
            out["comparisons"].append({"message_id": mid, "trait": trait, "i": i, "j": j, "q_ij": q_ij,
                                       "q_ji": q_ji, "label": labels[(i, j)]})
        if not labels:
            continue
        # Rank over local indices so the score helpers see 0..k-1.
        local = {c: n for n, c in enumerate(kept)}
        local_labels = {(local[i], local[j]): p for (i, j), p in labels.items()}
        scorer = bradley_terry_scores if rank.aggregate == "bradley_terry" else mean_win_scores
        scores = scorer(len(kept), local_labels)
        for lc, lr, p in choose_pairs(len(kept), local_labels, scores, rank.pairs, rank.aggregate):
            c, r = kept[lc], kept[lr]
            q_cr = q.get((c, r))
            p_ab, p_ba = (q_cr if q_cr else tuple(reversed(q[(r, c)])) if (r, c) in q else (math.nan, math.nan))
            label = clamp(p, rank.clamp)
            if abs(label - 0.5) < rank.tie_margin:
                _reject(out["rejected"], stable_id(mid, str(c), str(r)), trait, "tie", row["prompt"],
                        f"p={label:.4f} p_ab={p_ab:.4f} p_ba={p_ba:.4f}")
                continue
            pair_id = stable_id(mid, cand[c], cand[r])
            if reason := marks.set_aside_reason(trait, mid, pair_id):
                _reject(out["rejected"], pair_id, trait, reason, row["prompt"], marks.detail(trait, mid, pair_id))
                continue
            out["pairs"].append({
                "pair_id": pair_id, "message_id": mid, "trait": trait,
                "prompt": row["prompt"], "chosen": cand[c], "rejected": cand[r], "p_chosen": label,
                "p_ab": p_ab, "p_ba": p_ba, "judge": judge_label,
                "chosen_score": scores[lc], "rejected_score": scores[lr],
            })
    return out


def sampled_logprobs(rows: list[dict], systems: dict[str, str]) -> dict:
    """(trait system prompt, message, candidate) -> (token ids, log p) as the respond stage sampled them, for
    candidates sampled under the trait's own system prompt (what a contrast judge conditions on)."""
    known = {}
    for row in rows:
        if row["system_prompt"] != "trait":
            continue
        for text, ids, logp in zip(row["candidates"], row["candidate_token_ids"], row["candidate_logprobs"]):
            known[(systems[row["trait"]], row["prompt"], text)] = (list(ids), float(logp))
    return known


class RankWorker:
    """Ray Data actor holding one judge; writes each batch's outputs itself and returns counts."""

    def __init__(self, config_json: str, constitution_json: str):
        self.config = Config.model_validate_json(config_json)
        constitution = Constitution.model_validate_json(constitution_json)
        self.trait_texts = {t.name: t.describe() for t in constitution.traits}
        self.systems = {t.name: character_system_prompt(t, constitution, "trait") for t in constitution.traits}
        self.judge = build_judge(self.config)
        self.judge_label = judge_name(self.config)
        self.marks = load_marks(self.config.run.output_dir)
        self.out = StageOutput(self.config.run.output_dir, SPEC.output)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if hasattr(self.judge, "remember"):
            self.judge.remember(sampled_logprobs(rows, self.systems))
        result = rank_rows(rows, self.judge, self.config.rank, self.trait_texts, self.judge_label, self.systems,
                           self.marks)
        key = batch_key([r["message_id"] for r in rows])
        for sub, schema, name in (("comparisons", schemas.COMPARISONS, "comparisons"),
                                  ("rejected", schemas.REJECTED, "rejected"), ("", schemas.PREFERENCES, "pairs")):
            if result[name]:
                self.out.write_part(pa.Table.from_pylist(result[name], schema=schema), *([sub] if sub else []), key=key)
        # The commit record goes last: parts under a key without one are pruned on resume.
        self.out.write_part(pa.table({"message_id": [r["message_id"] for r in rows]}, schema=schemas.DONE), WORK, key=key)
        drops = Counter(r["reason"] for r in result["rejected"])
        return pa.table({"rows_in": [len(rows)], "rows_out": [len(result["pairs"])],
                         "drops": [",".join(f"{k}:{v}" for k, v in drops.items())], "new_tokens": [0]})


def compute_stats(out: StageOutput) -> dict:
    comps = out.read("comparisons", schema=schemas.COMPARISONS, columns=["q_ij", "q_ji"])
    pairs = out.read(schema=schemas.PREFERENCES, columns=["trait", "p_chosen"])
    drops = Counter(out.read("rejected", schema=schemas.REJECTED, columns=["reason"]).column("reason").to_pylist())
    return label_stats(comps.column("q_ij").to_pylist(), comps.column("q_ji").to_pylist(),
                       pairs.column("p_chosen").to_pylist(), Counter(pairs.column("trait").to_pylist()), drops)


def run(config: Config, force: bool = False) -> StageResult:
    return run_stage(config, SPEC, force, lambda out, result, constitution: _rank(config, out, result, constitution),
                     inputs=lambda out: _constitution(config), stats=True, made=_ranked)


def _constitution(config: Config) -> Constitution:
    responses = StageOutput(config.run.output_dir, "responses")
    if not responses.part_files():
        raise StageInputError(f"rank: 0 responses to rank; {upstream_cause(responses)}")
    return active_constitution(config, "rank")


def _rank(config: Config, out: StageOutput, result: StageResult, constitution: Constitution) -> None:
    import ray.data

    responses = StageOutput(config.run.output_dir, "responses")
    committed = out.part_keys(WORK)
    for sub in ((), ("comparisons",), ("rejected",)):
        out.prune_parts(committed, *sub)
    done = sorted(out.ids("message_id", WORK))
    total = responses.success_info().get("rows_out")
    ds = (
        engine_sized_blocks(
            ray.data.read_parquet(responses.part_files(), schema=schemas.RESPONSES, filesystem=responses.filesystem)
            .map_batches(without_done, fn_kwargs=dict(column="message_id", done=done), batch_format="pyarrow"),
            config.engine)
        .map_batches(RankWorker, fn_constructor_kwargs=dict(config_json=config.model_dump_json(),
                                                            constitution_json=constitution.model_dump_json()),
                     **judge_pool_args(config))
    )
    consume_counts(ds, "rank", None if total is None else total - len(done))
    stats = compute_stats(out)
    result.rows_in = len(out.ids("message_id", WORK))
    result.rows_out = sum(stats["pairs_per_trait"].values())
    result.drops = Counter(stats["drops"])
    result.extra = {"judge": judge_name(config), **stats}
    print(format_stats(stats), flush=True)


def _ranked(out: StageOutput, result: StageResult, _) -> None:
    if not result.rows_out:
        drops = format_counts(result.drops, "no comparisons")
        raise StageInputError(f"rank: 0 preference pairs from {result.rows_in} answered messages ({drops}); see "
                              f"{out.path('rejected')}/ and rerun with --force after adjusting rank settings "
                              f"(e.g. rank.tie_margin) or respond.candidates")


def format_stats(stats: dict) -> str:
    oc, pb = stats["order_consistency"], stats["position_bias_mean_p_first"]
    hist = " ".join(str(c) for c in stats["label_histogram"]["counts"])
    return (f"[rank] comparisons {stats['comparisons']}, order consistency "
            f"{'n/a' if oc is None else f'{oc:.3f}'}, mean P(first) {'n/a' if pb is None else f'{pb:.3f}'}, "
            f"label histogram [{hist}], pairs per trait {stats['pairs_per_trait']}, drops {stats['drops']}")
