"""Interval widths of a finished run's evaluation: rows treated as independent (normal z over samples,
Wilson over samples: what evaluate reported before) vs clustered by message (what it reports now).

    .venv/bin/python benchmarks/intervals.py RUN_DIR

Reads `<run>/eval/part-*.parquet` and prints, per split and quantity, both widths and their ratio. With K
samples per message that agree, the independent-rows interval is up to sqrt(K) times too narrow.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict

from character.reporting.evalstats import Z95, clustered_mean, wilson, win_rates
from character.reporting.eval_summary import paired_samples
from character.core.store import StageOutput


def rows_as_independent(values: list[float]) -> float:
    """Width of a normal-z interval over rows (sample sd), the old method."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return 2 * Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def widths(rows: list[dict]) -> dict[str, tuple[float, float]]:
    both = paired_samples(rows)
    ids = [p["base"]["message_id"] for p in both]
    delta = [p["trained"]["reward"] - p["base"]["reward"] for p in both]
    words = [p["trained"]["n_words"] - p["base"]["n_words"] for p in both]
    win = [p["trained"]["win_prob"] for p in both]
    soft, hard = win_rates(win, ids)
    wins = sum(1.0 if p > 0.5 + 1e-9 else 0.5 if abs(p - 0.5) <= 1e-9 else 0.0 for p in win)
    old_hard = wilson(wins, len(win))
    span = lambda ci: ci["hi"] - ci["lo"]  # noqa: E731
    return {
        "pm_delta": (rows_as_independent(delta), span(clustered_mean(delta, ids))),
        "length_change": (rows_as_independent(words), span(clustered_mean(words, ids))),
        "win_rate": (rows_as_independent(win), span(soft)),
        "hard_win_rate": (old_hard["hi"] - old_hard["lo"], span(hard)),
    }


def main(run_dir: str) -> None:
    rows = StageOutput(run_dir, "eval").read().to_pylist()
    by_split = defaultdict(list)
    for r in rows:
        by_split[r["split"]].append(r)
    print(f"{'split':<12} {'quantity':<14} {'messages':>8} {'samples':>7} {'rows indep.':>12} {'clustered':>10} {'ratio':>6}")
    for split, subset in sorted(by_split.items()):
        n_messages = len({r["message_id"] for r in subset})
        n_samples = len({(r["message_id"], r["sample"]) for r in subset})
        for name, (old, new) in widths(subset).items():
            ratio = new / old if old else math.nan
            print(f"{split:<12} {name:<14} {n_messages:>8} {n_samples:>7} {old:>12.4f} {new:>10.4f} {ratio:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder (reads its eval/)")
    main(parser.parse_args().run_dir)
