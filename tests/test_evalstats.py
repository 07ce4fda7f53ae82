"""Win-rate and interval arithmetic against hand-computed values."""
import math

import pytest

from character.evalstats import Z95, mean_ci, paired_delta_ci, wilson, win_rates


def test_mean_ci_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)  # 1.2910
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert ci["hi"] - ci["mean"] == pytest.approx(Z95 * sd / 2)
    assert mean_ci([5.0]) == {"mean": 5.0, "lo": 5.0, "hi": 5.0, "n": 1}
    assert math.isnan(mean_ci([])["mean"])


def test_paired_delta():
    d = paired_delta_ci([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # differences 1, 2, 3
    assert d["mean"] == 2.0 and d["lo"] == pytest.approx(2.0 - Z95 * 1.0 / math.sqrt(3))
    with pytest.raises(ValueError):
        paired_delta_ci([1.0], [1.0, 2.0])


def test_wilson_by_hand():
    # 8 of 10 at z=1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674, half 0.22305 / 1.38416... (textbook values)
    w = wilson(8, 10)
    assert w["p"] == 0.8
    assert w["lo"] == pytest.approx(0.4902, abs=1e-4) and w["hi"] == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 5)["lo"] == pytest.approx(0.0, abs=1e-12)


def test_win_rates_count_ties_as_half():
    soft, hard = win_rates([0.9, 0.7, 0.5, 0.2])
    assert soft["mean"] == pytest.approx(0.575)
    assert hard["wins"] == 2 and hard["ties"] == 1 and hard["p"] == pytest.approx(2.5 / 4)


def test_summarise_pairs_samples_by_message_and_sample():
    from character.stages.evaluate import summarise

    def row(mid, model, sample, reward, words, win, split="held_out"):
        return {"message_id": mid, "trait": "t", "split": split, "model": model, "sample": sample,
                "reward": reward, "n_words": words, "win_prob": win}

    rows = [row("a", "base", 0, 1.0, 10, 0.2), row("a", "trained", 0, 2.0, 8, 0.8),
            row("b", "base", 0, 0.0, 4, 0.6), row("b", "trained", 0, 0.5, 6, 0.4),
            row("c", "base", 0, 3.0, 5, 0.5, "adversarial"), row("c", "trained", 0, 3.0, 5, 0.5, "adversarial")]
    s = summarise(rows)
    held = s["groups"]["t/held_out"]
    assert held["n_messages"] == 2 and held["n_samples"] == 2
    assert held["pm_delta"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert held["win_rate"]["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert held["hard_win_rate"]["wins"] == 1 and held["length_change"]["mean"] == pytest.approx(0.0)
    assert s["overall"]["adversarial"]["hard_win_rate"]["ties"] == 1
