"""eval/summary.json from evaluate's rows (pure functions): per trait and split, and overall per split, one model
against another on the same (message, sample) — the final model or the SFT model against the base, or the final
model against the SFT model — with intervals clustered by message (evalstats.py).

The measures, each chosen to see a small model change:
- trait score: the frozen base model's per-token contrast of an answer, (log p(answer | trait system prompt,
  message) - log p(answer | message)) / answer tokens — one ruler for every model's answers;
- probes: the share of answers showing a checkable behaviour of the trait (the constitution's `probes:`, which no
  training stage reads);
- how much changed: the share of answers byte-identical to the other model's answer of the same sample (same
  seed), distinct-2 of each model's answers, and a Monte Carlo KL of the model against the base on its own
  samples (mean over samples of log p_model(y | x) - log p_base(y | x), k1, PPO's estimator);
- the PM's (or DPO's implicit) score, the judge's win rate and lengths, as before.
`interference` is the trait-score shift of every trait of the run measured on every trait's held-out messages:
its diagonal is each trait's own trait_score_delta.
"""
from __future__ import annotations

import math
from collections import defaultdict

from character.reporting.evalstats import METHOD, clustered_delta, clustered_mean, win_rates, wilson

VERDICTS = ("moved", "moved the wrong way", "not shown")


def paired_samples(rows: list[dict], model: str = "trained", against: str = "base") -> list[dict]:
    """{against: row, model: row} per (message, sample) that both models answered."""
    pairs = defaultdict(dict)
    for r in rows:
        pairs[(r["message_id"], r["sample"])][r["model"]] = r
    return [p for p in pairs.values() if against in p and model in p]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams of words over all n-grams in `texts` (Li et al. 2016): 1.0 when no n-gram repeats."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.casefold().split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def identical_share(pairs: list[dict], model: str = "trained", against: str = "base") -> dict:
    """Share of samples whose `model` answer is byte-identical to the `against` answer of the same sample."""
    same = sum(p[model]["response"] == p[against]["response"] for p in pairs)
    return {"share": same / len(pairs) if pairs else math.nan, "identical": same, "n": len(pairs)}


def verdict(stat: dict | None, null: float = 0.0) -> str:
    """"moved" when the interval lies above `null`, "moved the wrong way" when below, else "not shown"."""
    lo, hi = (stat or {}).get("lo", math.nan), (stat or {}).get("hi", math.nan)
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "not shown"
    return "moved" if lo > null else "moved the wrong way" if hi < null else "not shown"


def _paired_measure(pairs: list[dict], value, model: str, against: str, name: str) -> dict:
    """`name`_against, `name`_model and `name`_delta over the pairs where `value(row)` is known for both."""
    kept = [p for p in pairs if value(p[model]) is not None and value(p[against]) is not None]
    ids = [p[against]["message_id"] for p in kept]
    after, before = [float(value(p[model])) for p in kept], [float(value(p[against])) for p in kept]
    return {f"{name}_{against}": clustered_mean(before, ids), f"{name}_{model}": clustered_mean(after, ids),
            f"{name}_delta": clustered_delta(after, before, ids)}


def _probe_hit(row: dict, probe: str | None = None) -> float | None:
    """1.0 when the answer hits `probe` (None: any probe of its trait), 0.0 when not, None without probes."""
    probes = row.get("probes") or []
    if probe is None:
        return float(any(x["hit"] for x in probes)) if probes else None
    return next((float(x["hit"]) for x in probes if x["probe"] == probe), None)


def _probes(pairs: list[dict], model: str, against: str) -> dict:
    """Per probe of the group's trait: its rates and their shift."""
    names = sorted({x["probe"] for p in pairs for x in (p[against].get("probes") or [])})
    return {n: _paired_measure(pairs, lambda r, n=n: _probe_hit(r, n), model, against, "probe") for n in names}


def _kl(pairs: list[dict], model: str) -> dict:
    kept = [p[model] for p in pairs if p[model].get("logprob") is not None and p[model].get("logprob_base") is not None]
    return clustered_mean([r["logprob"] - r["logprob_base"] for r in kept], [r["message_id"] for r in kept])


def compare_block(subset: list[dict], model: str = "trained", against: str = "base") -> dict:
    """Every measure of `model` against `against` on the samples of `subset` both answered."""
    both = paired_samples(subset, model, against)
    ids = [p[against]["message_id"] for p in both]
    block = {"n_messages": len(set(ids)), "n_samples": len(both),
             **_paired_measure(both, lambda r: r.get("trait_score"), model, against, "trait_score"),
             **_paired_measure(both, _probe_hit, model, against, "probe"),
             "probes": _probes(both, model, against),
             **_paired_measure(both, lambda r: r["reward"], model, against, "pm"),
             **_paired_measure(both, lambda r: r["n_words"], model, against, "length"),
             "identical_share": identical_share(both, model, against),
             f"distinct2_{against}": distinct_n([p[against]["response"] for p in both]),
             f"distinct2_{model}": distinct_n([p[model]["response"] for p in both])}
    block["length_change"] = block.pop("length_delta")
    if against == "base":  # win_prob is P(answer beats the base's same sample); KL is against the base
        block["win_rate"], block["hard_win_rate"] = win_rates([p[model]["win_prob"] for p in both], ids)
        block["kl"] = _kl(both, model)
    return block


def interference(rows: list[dict], model: str = "trained", against: str = "base", split: str = "held_out") -> dict:
    """{trait measured: {trait of the messages: trait-score shift}} on `split`: each answer's contrast under every
    trait's system prompt (its `trait_scores`), `model` minus `against` on the same sample."""
    by_trait = defaultdict(list)
    for p in paired_samples([r for r in rows if r["split"] == split], model, against):
        by_trait[p[against]["trait"]].append(p)
    measured = sorted({s["trait"] for p in (x for v in by_trait.values() for x in v)
                       for s in (p[against].get("trait_scores") or [])})
    matrix: dict[str, dict] = {}
    for i in measured:
        matrix[i] = {}
        for j, pairs in sorted(by_trait.items()):
            def score(r, i=i):
                return next((s["score"] for s in r.get("trait_scores") or [] if s["trait"] == i), None)
            kept = [p for p in pairs if score(p[model]) is not None and score(p[against]) is not None]
            matrix[i][j] = clustered_delta([score(p[model]) for p in kept], [score(p[against]) for p in kept],
                                           [p[against]["message_id"] for p in kept])
    return matrix


def summarise(rows: list[dict], model: str = "trained", against: str = "base") -> dict:
    """Per trait/split and overall per split: `model` against `against` (compare_block)."""
    groups, splits = defaultdict(list), defaultdict(list)
    for r in rows:
        groups[(r["trait"], r["split"])].append(r)
        splits[r["split"]].append(r)
    return {
        "interval": METHOD, "model": model, "against": against,
        "groups": {f"{t}/{s}": {"trait": t, "split": s, **compare_block(g, model, against)}
                   for (t, s), g in sorted(groups.items())},
        "overall": {s: {"split": s, **compare_block(g, model, against)} for s, g in sorted(splits.items())},
        "interference": interference(rows, model, against),
    }


def capability_block(accuracies: dict[str, dict]) -> dict:
    """evaluate's `capability`: per model its accuracy [Wilson interval], and whether each compared model stays
    at or above the base's lower bound."""
    base = accuracies.get("base")
    return {**accuracies, "kept": {m: (a["accuracy"] >= base["lo"]) for m, a in accuracies.items()
                                   if base is not None and m != "base" and not math.isnan(a["accuracy"])}}


__all__ = ["VERDICTS", "capability_block", "compare_block", "distinct_n", "identical_share", "interference",
           "paired_samples", "summarise", "verdict", "wilson"]
