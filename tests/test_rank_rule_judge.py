"""The rank stage end to end with the rule judge (chosen from config alone), and its resume."""
import math

import pyarrow as pa
import pytest

from character import schemas
from character.stages import rank
from character.store import StageOutput

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
