"""Interval arithmetic for evaluation (pure): means with normal intervals, Wilson intervals for rates."""
from __future__ import annotations

import math

Z95 = 1.959963984540054


def mean_ci(xs: list[float], z: float = Z95) -> dict:
    """Mean with a normal-approximation interval (sample standard deviation; n=1 gives a zero-width one)."""
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_delta_ci(after: list[float], before: list[float], z: float = Z95) -> dict:
    """Mean of paired differences (after - before) with its interval."""
    if len(after) != len(before):
        raise ValueError("paired samples must have the same length")
    return mean_ci([a - b for a, b in zip(after, before)], z)


def wilson(successes: float, n: int, z: float = Z95) -> dict:
    """Wilson score interval for a proportion (ties may count as half a success)."""
    if n == 0:
        return {"p": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"p": p, "lo": centre - half, "hi": centre + half, "n": n}


def win_rates(win_probs: list[float], tie_band: float = 1e-9) -> tuple[dict, dict]:
    """Soft win rate (mean P(trained better), normal interval) and hard win rate (wins, ties as half,
    Wilson interval)."""
    wins = sum(1 for p in win_probs if p > 0.5 + tie_band)
    ties = sum(1 for p in win_probs if abs(p - 0.5) <= tie_band)
    hard = wilson(wins + ties / 2, len(win_probs))
    hard.update({"wins": wins, "ties": ties})
    return mean_ci(win_probs), hard
