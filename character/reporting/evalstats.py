"""Intervals for evaluation (pure functions).

Every evaluation number is a mean over (message, sample) rows, and the samples of one message are not
independent draws: they answer the same prompt, and a base/trained pair shares its sampling seed. Treating
them as independent (as a plain normal interval over rows does) makes intervals too narrow by up to
sqrt(samples per message). So intervals are clustered by message:

- means and paired differences (PM scores, score shift, soft win rate, lengths): OLS of the values on a
  constant with a cluster-robust (CR1) standard error clustered by message (statsmodels), and a t interval
  with G - 1 degrees of freedom (G = messages), which is the textbook small-sample choice for few clusters;
  with one sample per message it is the ordinary one-sample t interval, and K perfectly correlated samples
  per message give exactly the interval of one sample per message;
- the hard win rate (wins, ties as half): a Wilson interval over messages, each message counting its share
  of wins as a fractional success (n = G), which stays inside [0, 1] and is not degenerate at 0 or 1 wins.

With fewer than two messages there is no interval: lo and hi are NaN.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054
METHOD = ("clustered by message: means with a cluster-robust (CR1) standard error and a t interval on "
          "messages - 1 degrees of freedom (statsmodels OLS, cov_type='cluster'); hard win rate: Wilson interval "
          "over messages (each message's share of wins); 95%")


def clustered_mean(values: list[float], clusters: list, level: float = 0.95) -> dict:
    """Mean of `values` with a t interval whose standard error is clustered by `clusters` (one label per
    value, e.g. its message id). Returns mean, lo, hi, se, n (values) and clusters (distinct labels)."""
    import numpy as np

    n, groups = len(values), len(set(clusters))
    if len(clusters) != n:
        raise ValueError("one cluster label per value")
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan, "n": 0, "clusters": 0}
    y = np.asarray(values, dtype=np.float64)
    mean = float(y.mean())
    if groups < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "se": math.nan, "n": n, "clusters": groups}
    import statsmodels.api as sm

    labels = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)[1]
    fit = sm.OLS(y, np.ones((n, 1))).fit(cov_type="cluster", cov_kwds={"groups": labels}, use_t=True)
    lo, hi = fit.conf_int(alpha=1 - level)[0]
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "se": float(fit.bse[0]), "n": n, "clusters": groups}


def clustered_delta(after: list[float], before: list[float], clusters: list) -> dict:
    """Mean of paired differences (after - before) with its clustered interval."""
    if len(after) != len(before):
        raise ValueError("paired samples must have the same length")
    return clustered_mean([a - b for a, b in zip(after, before)], clusters)


def wilson(successes: float, n: int, z: float = Z95) -> dict:
    """Wilson score interval for a proportion (fractional successes allowed)."""
    if n == 0:
        return {"p": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"p": p, "lo": centre - half, "hi": centre + half, "n": n}


def win_rates(win_probs: list[float], clusters: list, tie_band: float = 1e-9) -> tuple[dict, dict]:
    """Soft win rate (mean P(trained better), clustered t interval) and hard win rate (wins, ties as half;
    Wilson interval over messages, each contributing its share of wins)."""
    outcomes = [1.0 if p > 0.5 + tie_band else 0.5 if abs(p - 0.5) <= tie_band else 0.0 for p in win_probs]
    per_message: dict = {}
    for c, o in zip(clusters, outcomes):
        per_message.setdefault(c, []).append(o)
    shares = [sum(v) / len(v) for v in per_message.values()]
    hard = wilson(sum(shares), len(shares))
    hard.update({"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "samples": len(outcomes),
                 "rate_over_samples": sum(outcomes) / len(outcomes) if outcomes else math.nan})
    return clustered_mean(win_probs, clusters), hard
