"""character.inference.gates without Ray: batch numbers claimed once each and without gaps, holds that hold until opened."""
import threading

import pytest

from character.inference import gates


def test_concurrent_claims_get_distinct_numbers_without_gaps(tmp_path):
    numbers: list[int] = []
    threads = [threading.Thread(target=lambda i=i: numbers.append(gates.claim_next(tmp_path, {"pid": i})))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 17))
    assert sorted(c["pid"] for c in gates.claims(tmp_path).values()) == list(range(16))
    assert not list(tmp_path.glob(".claim-*"))  # no temporary file left behind


def test_a_batch_past_a_hold_waits_until_it_is_opened(tmp_path, monkeypatch):
    monkeypatch.setenv(gates.GATES_ENV, str(tmp_path))
    gates.prepare(tmp_path, [1])
    started = []

    def batch():
        with gates.paced_batch():
            started.append(len(started) + 1)

    batch()  # batch 1: not past the hold
    assert started == [1] and gates.done(tmp_path) == {1}
    second = threading.Thread(target=batch)
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and started == [1] and set(gates.claims(tmp_path)) == {1, 2}  # claimed, held
    gates.open_hold(tmp_path, 1)
    second.join(timeout=10)
    assert not second.is_alive() and started == [1, 2] and gates.done(tmp_path) == {1, 2}


def test_ungated_batches_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(gates.GATES_ENV, raising=False)
    with gates.paced_batch():
        pass
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError), gates.paced_batch():  # the body's errors pass through
        raise ValueError
