"""From pairwise judgements to soft-labelled preference pairs (pure functions, no Ray, no model).

Conventions: for candidates i and j, `q_ij` is the judge's P(first better) with i shown first as (A),
`q_ji` the same with j first. The soft label that i is better is the mean over both orders,
P(i > j) = (q_ij + 1 - q_ji) / 2, which cancels a judge's constant preference for either position.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from itertools import combinations


def comparison_pairs(k: int, scheme: str, opponents: int, seed_key: str) -> list[tuple[int, int]]:
    """Unordered candidate pairs (i < j) to compare among k candidates."""
    if scheme == "auto":
        scheme = "all_pairs" if k <= 4 else "random_opponents"
    if scheme == "all_pairs" or opponents >= k - 1:
        return list(combinations(range(k), 2))
    rng = random.Random(seed_key)
    chosen: set[tuple[int, int]] = set()
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for j in rng.sample(others, opponents):
            chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def soft_label(q_first: float, q_second: float) -> float:
    """P(i better) from P(first better) with i first and P(first better) with j first."""
    return (q_first + 1.0 - q_second) / 2.0


def clamp(p: float, band: tuple[float, float] | None) -> float:
    if band is None:
        return p
    return min(max(p, band[0]), band[1])


def mean_win_scores(k: int, labels: dict[tuple[int, int], float]) -> list[float]:
    """Each candidate's mean probability of beating the candidates it was compared with."""
    wins = [0.0] * k
    games = [0] * k
    for (i, j), p in labels.items():
        wins[i] += p
        wins[j] += 1.0 - p
        games[i] += 1
        games[j] += 1
    return [w / g if g else 0.5 for w, g in zip(wins, games)]


def bradley_terry_scores(k: int, labels: dict[tuple[int, int], float], iters: int = 200,
                         l2: float = 0.01) -> list[float]:
    """Bradley-Terry strengths from soft outcomes by gradient ascent (L2 keeps them finite)."""
    s = [0.0] * k
    for _ in range(iters):
        grad = [-l2 * x for x in s]
        for (i, j), p in labels.items():
            pred = 1.0 / (1.0 + math.exp(-(s[i] - s[j])))
            grad[i] += p - pred
            grad[j] -= p - pred
        s = [x + 0.5 * g for x, g in zip(s, grad)]
        mean = sum(s) / k
        s = [x - mean for x in s]
    return s


def choose_pairs(k: int, labels: dict[tuple[int, int], float], scores: list[float], mode: str,
                 aggregate: str) -> list[tuple[int, int, float]]:
    """(chosen, rejected, p_chosen) pairs. `all`: every compared pair oriented by its own label;
    `best_worst`: the top against the bottom of the ranking."""
    if mode == "all":
        return [(i, j, p) if p >= 0.5 else (j, i, 1.0 - p) for (i, j), p in labels.items()]
    order = sorted(range(k), key=lambda c: (-scores[c], c))
    best, worst = order[0], order[-1]
    if best == worst:
        return []
    key = (min(best, worst), max(best, worst))
    if key in labels:
        p = labels[key] if key[0] == best else 1.0 - labels[key]
    elif aggregate == "bradley_terry":
        p = 1.0 / (1.0 + math.exp(-(scores[best] - scores[worst])))
    else:
        p = 0.5 + (scores[best] - scores[worst]) / 2.0
    return [(best, worst, p)]


def label_stats(q_firsts: list[float], q_seconds: list[float], labels: list[float], pairs_per_trait: Counter,
                drops: Counter, bins: int = 10) -> dict:
    """Label quality: order consistency, position bias, histogram of soft labels."""
    n = len(q_firsts)
    consistent = sum((a > 0.5) != (b > 0.5) for a, b in zip(q_firsts, q_seconds) if a != 0.5 and b != 0.5)
    decided = sum(1 for a, b in zip(q_firsts, q_seconds) if a != 0.5 and b != 0.5)
    hist = [0] * bins
    for p in labels:
        hist[min(int(p * bins), bins - 1)] += 1
    return {
        "comparisons": n,
        "order_consistency": consistent / decided if decided else None,
        "position_bias_mean_p_first": (sum(q_firsts) + sum(q_seconds)) / (2 * n) if n else None,
        "label_histogram": {"edges": [i / bins for i in range(bins + 1)], "counts": hist},
        "pairs_per_trait": dict(pairs_per_trait),
        "drops": dict(drops),
    }


def best_candidates(comparisons: list[dict], aggregate: str) -> dict[str, int]:
    """message_id -> the index of its best candidate, by the scores rank aggregates its comparisons into
    (rank.aggregate: mean_win or bradley_terry), ties to the lower index as rank's choose_pairs breaks them.
    A message without comparisons (rank set all but one candidate aside, or the judge's prompt did not fit)
    has no ranking and no entry."""
    labels: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
    for c in comparisons:
        labels[c["message_id"]][(int(c["i"]), int(c["j"]))] = float(c["label"])
    scorer = bradley_terry_scores if aggregate == "bradley_terry" else mean_win_scores
    best = {}
    for message_id, pairs in labels.items():
        compared = sorted({i for pair in pairs for i in pair})
        local = {c: n for n, c in enumerate(compared)}
        scores = scorer(len(compared), {(local[i], local[j]): p for (i, j), p in pairs.items()})
        best[message_id] = compared[min(range(len(compared)), key=lambda n: (-scores[n], compared[n]))]
    return best
