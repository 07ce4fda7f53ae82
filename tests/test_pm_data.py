import math

import pytest

from character.models.loading import load_tokenizer
from character.data.pm_data import (encode_response, epoch_order, is_held_out, micro_batch_indices, pad_batch,
                               step_slice, steps_left, validate_pairs)
from character.training.pairs import pair_metrics as pm_metrics
from character.training.stepping import NonFiniteError, NonFiniteGuard


def test_held_out_split_is_by_message_and_stable():
    ids = [f"m{i}" for i in range(2000)]
    held = [is_held_out(m, 0.2, 0) for m in ids]
    assert 0.17 < sum(held) / len(ids) < 0.23
    assert held == [is_held_out(m, 0.2, 0) for m in ids]


def _consume(n, position, steps, world, micro, accum, seed=7):
    """Run `steps` steps of the schedule at one world size: the (epoch, example) pairs used, the new position."""
    seen = []
    for _ in range(steps):
        epoch, start, size = step_slice(n, position, world, micro, accum)
        order = epoch_order(n, epoch, seed)
        seen += [(epoch, i) for m in range(accum) for r in range(world)
                 for i in micro_batch_indices(order, start, size, m, r, world, micro)]
        position += size
    return seen, position


def test_every_example_once_per_epoch_the_remainder_included():
    n, world, micro, accum = 50, 2, 3, 2  # global batch 12: 4 full steps and a last step of 2
    assert steps_left(n, 0, n, world, micro, accum) == 5
    seen, position = _consume(n, 0, 10, world, micro, accum)
    assert position == 2 * n
    for epoch in (0, 1):
        assert sorted(i for e, i in seen if e == epoch) == list(range(n))
    assert list(epoch_order(n, 1, 7)) != list(epoch_order(n, 2, 7))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (4, 2)])
def test_a_resized_worker_group_neither_skips_nor_repeats(before, after):
    """Resume with another number of workers mid-epoch: the position counts examples, so the union of the
    examples of each epoch is exactly the training set (with a step-count position it was not)."""
    n, micro, accum = 37, 2, 2
    first, position = _consume(n, 0, 3, before, micro, accum)
    rest, position = _consume(n, position, steps_left(n, position, 2 * n, after, micro, accum), after, micro, accum)
    seen = first + rest
    assert position == 2 * n
    for epoch in (0, 1):
        assert sorted(i for e, i in seen if e == epoch) == list(range(n)), (before, after, epoch)


def test_bad_pairs_are_set_aside_with_a_reason():
    good, bad = validate_pairs([{"p_chosen": 0.7, "chosen": "a", "rejected": "b"},
                                {"p_chosen": math.nan, "chosen": "a", "rejected": "b"},
                                {"p_chosen": 0.9, "chosen": " ", "rejected": "b"}])
    assert len(good) == 1 and [b["reason"] for b in bad] == ["bad_p_chosen", "empty_response"]


def test_encoding_truncates_safely_and_ends_with_eos():
    tok = load_tokenizer("tiny-llama")
    short = encode_response(tok, "hi", "hello there", 64)
    assert short[-1] == tok.eos_token_id and tok.decode(short).startswith("<|im_start|>user\nhi")
    long = encode_response(tok, "why " * 200, "because " * 200, 64)
    assert len(long) == 64 and long[-1] == tok.eos_token_id
    assert "assistant" in tok.decode(long)  # the prompt keeps its end, next to the response
    ids, mask = pad_batch([short, long], tok.pad_token_id)
    assert ids.shape == (2, 64) and int(mask[0].sum()) == len(short) and int(ids[0, -1]) == tok.pad_token_id


def test_pm_metrics_by_hand():
    m = pm_metrics([2.0, 0.0, 1.0], [0.0, 1.0, 0.9], [1.0, 1.0, 0.6], ["a", "a", "b"], 0.0, bins=2)
    assert m["eval_accuracy"] == pytest.approx(2 / 3)
    assert m["per_trait_accuracy"] == {"a": 0.5, "b": 1.0}
    assert m["eval_mean_margin"] == pytest.approx((2.0 - 1.0 + 0.1) / 3)
    # confidences sigma(2)=0.88, sigma(1)=0.73 (wrong), sigma(0.1)=0.52 -> buckets [0.5,0.75), [0.75,1]
    assert [(b["n"], b["correct"]) for b in m["calibration"]] == [(2, 1), (1, 1)]


def test_guard_skips_and_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard(max_in_row=2)
    assert guard.update(False, 3, "loss") is False
    assert guard.update(True, 4, "loss") is True and guard.in_row == 0
    guard.update(False, 5, "loss")
    with pytest.raises(NonFiniteError, match="step 6: loss was not finite for 2 steps in a row"):
        guard.update(False, 6, "loss")


def test_pairs_per_message_trains_on_each_messages_clearest_pairs_and_validates_on_all(tmp_path):
    from collections import Counter

    from character.training.pairs import clearest_pairs, load_pairs
    from synthetic_run import synthetic_run

    rows = [{"pair_id": f"p{i}", "message_id": m, "p_chosen": p}
            for i, (m, p) in enumerate([("a", 0.6), ("a", 0.9), ("a", 0.9), ("b", 0.55), ("c", 0.7), ("c", 1.0)])]
    kept, excess = clearest_pairs(rows, 1)
    assert [r["pair_id"] for r in kept] == ["p1", "p3", "p5"]  # a: 0.9 twice, the lower pair_id wins
    assert [r["pair_id"] for r in excess] == ["p0", "p2", "p4"]
    assert [r["pair_id"] for r in clearest_pairs(rows, 2)[0]] == ["p1", "p2", "p3", "p4", "p5"]

    info = synthetic_run(str(tmp_path), traits=2, messages_per_trait=12, candidates=4)
    every_train, every_held, _ = load_pairs(str(tmp_path), 0.3)
    train, held, bad = load_pairs(str(tmp_path), 0.3, pairs_per_message=1)
    assert held == every_held  # validation keeps every pair of its messages
    per_message = Counter(r["message_id"] for r in train)
    assert set(per_message.values()) == {1} and set(per_message) == {r["message_id"] for r in every_train}
    assert len(train) + len(bad) == len(every_train) and {r["reason"] for r in bad} == {"pairs_per_message"}
    assert sum(len(v) for v in info["pairs"].values()) == len(every_train) + len(every_held)
