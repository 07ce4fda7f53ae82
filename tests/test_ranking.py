"""The ranking arithmetic against hand-computed values."""
import math
from collections import Counter

import pytest

from character.judging.ranking import (bradley_terry_scores, choose_pairs, clamp, comparison_pairs, label_stats,
                               mean_win_scores, soft_label)


def test_all_pairs_for_small_k_and_random_opponents_for_large_k():
    assert comparison_pairs(4, "auto", 2, "m") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    pairs = comparison_pairs(8, "auto", 2, "m")
    assert pairs == comparison_pairs(8, "auto", 2, "m")  # seeded by the message id
    assert pairs != comparison_pairs(8, "auto", 2, "other")
    assert all(i < j for i, j in pairs) and len(set(pairs)) == len(pairs)
    degree = Counter(x for p in pairs for x in p)
    assert all(degree[c] >= 2 for c in range(8)) and len(pairs) < 28


def test_soft_label_cancels_a_constant_position_bias():
    assert soft_label(0.9, 0.2) == pytest.approx(0.85)
    # a judge adding +0.1 to whichever response is first: the average is unchanged
    assert soft_label(0.7 + 0.1, 0.3 + 0.1) == pytest.approx(soft_label(0.7, 0.3)) == pytest.approx(0.7)
    assert clamp(0.9, (0.4, 0.6)) == 0.6 and clamp(0.1, (0.4, 0.6)) == 0.4 and clamp(0.55, None) == 0.55


def test_mean_win_and_bradley_terry_rank_alike():
    labels = {(0, 1): 0.8, (0, 2): 0.9, (1, 2): 0.7}
    assert mean_win_scores(3, labels) == pytest.approx([0.85, (0.2 + 0.7) / 2, (0.1 + 0.3) / 2])
    bt = bradley_terry_scores(3, labels)
    assert bt[0] > bt[1] > bt[2] and sum(bt) == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_fits_consistent_probabilities():
    # strengths 1, 0, -1 imply these labels; the fit recovers the differences (small L2 aside)
    s = [1.0, 0.0, -1.0]
    sig = lambda x: 1 / (1 + math.exp(-x))
    labels = {(i, j): sig(s[i] - s[j]) for i in range(3) for j in range(i + 1, 3)}
    fit = bradley_terry_scores(3, labels, iters=3000, l2=0.0)
    assert fit[0] - fit[1] == pytest.approx(1.0, abs=1e-3) and fit[1] - fit[2] == pytest.approx(1.0, abs=1e-3)


def test_choose_pairs_orients_by_label_and_best_worst():
    labels = {(0, 1): 0.3, (0, 2): 0.6, (1, 2): 0.9}
    assert choose_pairs(3, labels, [0, 0, 0], "all", "mean_win") == [(1, 0, pytest.approx(0.7)), (0, 2, 0.6),
                                                                     (1, 2, 0.9)]
    scores = mean_win_scores(3, labels)  # [0.45, 0.8, 0.25]
    assert choose_pairs(3, labels, scores, "best_worst", "mean_win") == [(1, 2, 0.9)]


def test_label_stats_by_hand():
    # comparisons: (0.8, 0.3) consistent; (0.6, 0.7) both say "first": inconsistent; (0.5, 0.2) undecided
    stats = label_stats([0.8, 0.6, 0.5], [0.3, 0.7, 0.2], [0.75, 0.55], Counter({"t": 2}), Counter({"tie": 1}))
    assert stats["order_consistency"] == 0.5
    assert stats["position_bias_mean_p_first"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.3 + 0.7 + 0.2) / 6)
    assert stats["label_histogram"]["counts"][7] == 1 and stats["label_histogram"]["counts"][5] == 1
    assert stats["pairs_per_trait"] == {"t": 2} and stats["drops"] == {"tie": 1}
