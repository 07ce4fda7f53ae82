"""Evaluation intervals against hand-computed values (pure, no Ray): clustered by message."""
import math

import pytest

from character.reporting.evalstats import clustered_delta, clustered_mean, wilson, win_rates

T_975_3 = 3.182446305284263  # t quantile, 3 degrees of freedom (tables)


def test_clustered_mean_with_one_sample_per_message_is_the_t_interval_by_hand():
    ci = clustered_mean([1.0, 2.0, 3.0, 4.0], ["a", "b", "c", "d"])
    # mean 2.5, sample sd sqrt(5/3) = 1.290994, se = sd / 2 = 0.645497, half = t(0.975, 3) * se = 2.054260
    assert ci["mean"] == pytest.approx(2.5)
    assert ci["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert ci["lo"] == pytest.approx(2.5 - T_975_3 * 0.6454972) and ci["hi"] == pytest.approx(2.5 + T_975_3 * 0.6454972)
    assert (ci["n"], ci["clusters"]) == (4, 4)


def test_perfectly_correlated_samples_within_a_message_give_the_one_sample_per_message_interval():
    """Three identical samples per message carry no more information than one: the interval must not
    shrink (an interval over rows would be sqrt(3) times narrower, and on 11 df instead of 3)."""
    one = clustered_mean([1.0, 2.0, 3.0, 4.0], ["a", "b", "c", "d"])
    three = clustered_mean([v for v in (1.0, 2.0, 3.0, 4.0) for _ in range(3)], [m for m in "abcd" for _ in range(3)])
    assert (three["lo"], three["hi"], three["se"]) == pytest.approx((one["lo"], one["hi"], one["se"]), abs=1e-12)
    assert three["n"] == 12 and three["clusters"] == 4
    rows_as_independent = 1.959963984540054 * math.sqrt(sum((v - 2.5) ** 2 for v in [1, 2, 3, 4] * 3) / 11 / 12)
    assert three["hi"] - three["mean"] > 2.5 * rows_as_independent  # the old interval was this much too narrow


def test_clustered_delta_and_degenerate_cases():
    d = clustered_delta([2.0, 3.0, 5.0, 6.0], [1.0, 1.0, 2.0, 2.0], ["m1", "m2", "m3", "m4"])  # 1, 2, 3, 4
    assert d["mean"] == pytest.approx(2.5) and d["lo"] == pytest.approx(2.5 - T_975_3 * 0.6454972)
    with pytest.raises(ValueError):
        clustered_delta([1.0], [1.0, 2.0], ["a"])
    single = clustered_mean([5.0, 7.0], ["only", "only"])  # one message: no interval
    assert single["mean"] == 6.0 and math.isnan(single["lo"]) and math.isnan(single["hi"])
    assert math.isnan(clustered_mean([], [])["mean"])
    flat = clustered_mean([1.0, 1.0, 1.0], ["a", "b", "c"])
    assert (flat["lo"], flat["hi"]) == (1.0, 1.0)


def test_wilson_by_hand():
    # 8 of 10 at z=1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674, half 0.22305 / 1.38416... (textbook values)
    w = wilson(8, 10)
    assert w["p"] == 0.8
    assert w["lo"] == pytest.approx(0.4902, abs=1e-4) and w["hi"] == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 5)["lo"] == pytest.approx(0.0, abs=1e-12)


def test_win_rates_count_ties_as_half_and_cluster_by_message():
    soft, hard = win_rates([0.9, 0.7, 0.5, 0.2], ["a", "b", "c", "d"])
    assert soft["mean"] == pytest.approx(0.575)
    assert hard["wins"] == 2 and hard["ties"] == 1 and hard["p"] == pytest.approx(2.5 / 4)
    assert (hard["lo"], hard["hi"]) == pytest.approx((wilson(2.5, 4)["lo"], wilson(2.5, 4)["hi"]))
    # The same four outcomes, each repeated by three perfectly correlated samples: the same intervals.
    soft3, hard3 = win_rates([p for p in (0.9, 0.7, 0.5, 0.2) for _ in range(3)], [m for m in "abcd" for _ in range(3)])
    assert (soft3["lo"], soft3["hi"]) == pytest.approx((soft["lo"], soft["hi"]))
    assert (hard3["p"], hard3["lo"], hard3["hi"], hard3["n"]) == pytest.approx((hard["p"], hard["lo"], hard["hi"], 4))
    assert hard3["wins"] == 6 and hard3["samples"] == 12


def test_summarise_pairs_samples_by_message_and_sample():
    from character.reporting.eval_summary import summarise

    def row(mid, model, sample, reward, words, win, split="held_out"):
        return {"message_id": mid, "trait": "t", "split": split, "model": model, "sample": sample,
                "reward": reward, "n_words": words, "win_prob": win, "response": f"{model} {mid}"}

    rows = [row("a", "base", 0, 1.0, 10, 0.2), row("a", "trained", 0, 2.0, 8, 0.8),
            row("a", "base", 1, 1.0, 10, 0.2), row("a", "trained", 1, 2.0, 8, 0.8),
            row("b", "base", 0, 0.0, 4, 0.6), row("b", "trained", 0, 0.5, 6, 0.4),
            row("b", "base", 1, 0.0, 4, 0.6), row("b", "trained", 1, 0.5, 6, 0.4),
            row("c", "base", 0, 3.0, 5, 0.5, "adversarial"), row("c", "trained", 0, 3.0, 5, 0.5, "adversarial")]
    s = summarise(rows)
    held = s["groups"]["t/held_out"]
    assert held["n_messages"] == 2 and held["n_samples"] == 4
    assert held["pm_delta"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    # Two messages, two identical samples each: the interval of two values (1.0, 0.5) on 1 df.
    assert held["pm_delta"]["hi"] - held["pm_delta"]["mean"] == pytest.approx(12.7062047 * 0.25, rel=1e-6)
    assert held["win_rate"]["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert held["hard_win_rate"]["wins"] == 2 and held["length_change"]["mean"] == pytest.approx(0.0)
    assert s["overall"]["adversarial"]["hard_win_rate"]["ties"] == 1
    assert "clustered by message" in s["interval"]
