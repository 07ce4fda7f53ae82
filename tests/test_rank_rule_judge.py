"""The rank stage end to end with the rule judge (chosen from config alone), and its resume."""
import math

import pyarrow as pa
import pytest

from character.core import schemas
from character.stages import rank
from character.core.store import StageOutput

pytestmark = pytest.mark.slow

CANDIDATES = [
    ["I am curious about that", "ok", "so curious, really curious", "no idea"],
    ["curious", "", "curious curious curious", "curious"],
]


def _responses(tmp_path, n_messages=8):
    rows = []
    for m in range(n_messages):
        rows.append({"message_id": f"m{m:03d}", "trait": "curiosity", "kind": "values", "prompt": f"message {m}",
                     "candidates": CANDIDATES[m % 2], "finish_reasons": ["stop"] * 4, "system_prompt": "trait",
                     "temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": m})
    out = StageOutput(str(tmp_path), "responses")
    out.write_part(pa.Table.from_pylist(rows, schema=schemas.RESPONSES), key="hand")
    out.mark_success({"rows_out": n_messages})


def test_rule_judge_pairs_follow_the_rule_end_to_end(tmp_path, make_config, ray_local):
    _responses(tmp_path)
    config = make_config(tmp_path, "judge.kind=rule", "judge.rule.type=keywords", "judge.rule.words=[curious]",
                         "judge.rule.temperature=1.0", "rank.tie_margin=0.01", "engine.batch_size=3")
    result = rank.run(config)
    out = StageOutput(str(tmp_path), "preferences")
    pairs = out.read().to_pylist()
    count = lambda s: s.split().count("curious") + s.split().count("curious,")
    for p in pairs:
        diff = count(p["chosen"]) - count(p["rejected"])
        assert diff > 0 and p["p_chosen"] == pytest.approx(1 / (1 + math.exp(-diff)))
        assert p["judge"] == "rule:keywords"
    # per even message: 6 pairs, one tie (ok vs no idea); per odd: "" and the repeated "curious" set aside,
    # 1 pair left ("curious" vs "curious curious curious")
    assert len(pairs) == 4 * 5 + 4 * 1 == result.rows_out
    assert result.drops == {"tie": 4, "empty_candidate": 4, "identical_candidate": 4}

    # A crash after a batch wrote its parts but before its commit record: the rerun prunes and redoes it.
    work = sorted(out.part_files("_work"))
    (tmp_path / "preferences" / "_SUCCESS").unlink()
    import os
    os.remove(work[0])
    rank.run(config)
    again = out.read().to_pylist()
    assert sorted(p["pair_id"] for p in again) == sorted(p["pair_id"] for p in pairs)
    assert len({p["pair_id"] for p in again}) == len(again)


def test_a_truncated_committed_part_is_quarantined_and_its_rows_made_again(tmp_path, make_config, ray_local):
    """A part cut short after its commit (disk full, a bad copy): the rerun moves it and the other parts of its
    batch to preferences/_quarantine/, ranks those messages again, and ends with every pair exactly once."""
    _responses(tmp_path)
    config = make_config(tmp_path, "judge.kind=rule", "judge.rule.type=keywords", "judge.rule.words=[curious]",
                         "rank.tie_margin=0.01", "engine.batch_size=3")
    rank.run(config)
    out = StageOutput(str(tmp_path), "preferences")
    pairs = sorted(p["pair_id"] for p in out.read().to_pylist())
    (tmp_path / "preferences" / "_SUCCESS").unlink()
    victim = out.part_files()[0]
    with open(victim, "r+b") as f:
        f.truncate(64)
    rank.run(config)
    assert out.complete()
    again = sorted(p["pair_id"] for p in out.read().to_pylist())
    assert again == pairs  # every pair exactly once
    quarantined = tmp_path / "preferences" / "_quarantine"
    name = victim.rsplit("/", 1)[1]
    assert (quarantined / name).is_file() and (quarantined / "_work" / name).is_file()  # with its commit record
    assert name in out.read_text("_quarantine/log.jsonl")


def test_rank_with_no_decided_pair_fails_and_keeps_what_it_set_aside(tmp_path, make_config, ray_local):
    from character.core.store import StageInputError

    rows = [{"message_id": f"m{m}", "trait": "curiosity", "kind": "values", "prompt": f"message {m}",
             "candidates": ["same", "same", "", "same"], "finish_reasons": ["stop"] * 4, "system_prompt": "trait",
             "temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": m} for m in range(3)]
    out = StageOutput(str(tmp_path), "responses")
    out.write_part(pa.Table.from_pylist(rows, schema=schemas.RESPONSES), key="hand")
    out.mark_success({"rows_out": 3})
    config = make_config(tmp_path, "judge.kind=rule", "judge.rule.type=keywords", "judge.rule.words=[curious]")
    with pytest.raises(StageInputError, match=r"rank: 0 preference pairs from 3 answered messages "
                                              r"\(empty_candidate=3, identical_candidate=6\)"):
        rank.run(config)
    prefs = StageOutput(str(tmp_path), "preferences")
    assert not prefs.complete() and prefs.read("rejected", schema=schemas.REJECTED).num_rows == 9
