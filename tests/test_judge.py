"""Judges: the rule judge, position-bias cancellation, and log-probability scoring vs Hugging Face."""
import gc
import math

import pytest
import torch

from character.core.config import EngineConfig, RankConfig, RuleConfig
from character.judging.judge import (ANSWER_PREFIX, Comparison, ModelJudge, RuleJudge, comparison_prompt, contrast_prob,
                             option_token_ids, sequence_logprob)
from character.stages.rank import rank_rows

TRAIT = {"honesty": "I tell the truth.\n(Even when it is not welcome.)"}


def _rows():
    return [
        {"message_id": "m1", "trait": "honesty", "prompt": "Is my plan good?",
         "candidates": ["truth truth truth", "truth maybe", "truth is hard", "truth truth"]},
        {"message_id": "m2", "trait": "honesty", "prompt": "Be honest?",
         "candidates": ["no", "truth", "", "no"]},
    ]


class PositionBiased:
    """Adds a constant to P(first better): a judge that favours position (A)."""

    def __init__(self, inner, bias):
        self.inner, self.bias, self.name = inner, bias, "biased"

    def prob_first(self, comparisons):
        return [p + self.bias for p in self.inner.prob_first(comparisons)]


def test_rule_judge_scores_keywords_and_length():
    kw = RuleJudge(RuleConfig(type="keywords", words=["truth"], temperature=1.0))
    p = kw.prob_first([Comparison("t", "m", "truth truth", "truth"), Comparison("t", "m", "truth", "truth truth")])
    assert p[0] == pytest.approx(1 / (1 + math.exp(-1))) and p[0] + p[1] == pytest.approx(1.0)
    capped = RuleJudge(RuleConfig(type="keywords", words=["AI"], max_count=1))
    assert [capped.score(t) for t in ("As an AI, an AI", "I am AI.", "a body")] == [1.0, 1.0, 0.0]
    length = RuleJudge(RuleConfig(type="length", target_words=3, temperature=1.0))
    assert length.prob_first([Comparison("t", "m", "a b c", "a")])[0] == pytest.approx(1 / (1 + math.exp(-2)))


def test_rank_rows_follows_the_rule_and_sets_aside_bad_candidates():
    judge = RuleJudge(RuleConfig(type="keywords", words=["truth"], temperature=0.5))
    out = rank_rows(_rows(), judge, RankConfig(tie_margin=0.01), TRAIT, "rule:keywords")
    reasons = sorted(r["reason"] for r in out["rejected"])
    assert reasons == ["empty_candidate", "identical_candidate", "tie"]  # m1: one 1-1 tie; m2: "" and "no" twice
    for pair in out["pairs"]:
        assert pair["chosen"].count("truth") > pair["rejected"].count("truth")
        diff = pair["chosen"].count("truth") - pair["rejected"].count("truth")
        assert pair["p_chosen"] == pytest.approx(1 / (1 + math.exp(-diff / 0.5)))
        assert pair["p_chosen"] == pytest.approx((pair["p_ab"] + 1 - pair["p_ba"]) / 2)
    assert len(out["pairs"]) == 5 + 1  # m1: 6 pairs less one tie; m2: no-vs-truth only


def test_averaging_both_orders_removes_an_injected_position_bias():
    rule = RuleJudge(RuleConfig(type="keywords", words=["truth"], temperature=4.0))  # P in (0.3, 0.7)
    rank = RankConfig(tie_margin=0.0)
    clean = rank_rows(_rows(), rule, rank, TRAIT, "j")
    biased = rank_rows(_rows(), PositionBiased(rule, 0.2), rank, TRAIT, "j")
    assert [p["p_chosen"] for p in biased["pairs"]] == pytest.approx([p["p_chosen"] for p in clean["pairs"]], abs=1e-12)
    assert [(p["chosen"], p["rejected"]) for p in biased["pairs"]] == [(p["chosen"], p["rejected"]) for p in clean["pairs"]]
    # one order alone would be off by the bias, and the stats see it
    assert all(b["p_ab"] == pytest.approx(c["p_ab"] + 0.2) for b, c in zip(biased["pairs"], clean["pairs"]))
    mean_first = sum(c["q_ij"] + c["q_ji"] for c in biased["comparisons"]) / (2 * len(biased["comparisons"]))
    assert mean_first == pytest.approx(0.5 + 0.2)


@pytest.fixture(scope="module")
def model_judge():
    engine = EngineConfig(max_model_len=512, kv_cache_gib=1, num_cpus_per_actor=2)
    judge = ModelJudge("tiny-llama", "float32", engine, RankConfig(), seed=0)
    yield judge
    del judge.llm
    gc.collect()


def test_logprob_path_matches_a_hugging_face_forward_pass(model_judge):
    from character.models.loading import load_causal_lm

    comparisons = [Comparison(TRAIT["honesty"], "Is my poem good?", "It has strong images.", "It is the best ever."),
                   Comparison(TRAIT["honesty"], "Is my poem good?", "It is the best ever.", "It has strong images.")]
    vllm_p = model_judge.prob_first(comparisons)
    tok = model_judge.tokenizer
    options = option_token_ids(tok)
    assert all(len(v) == 2 for v in options.values())  # "A" and " A" are both single tokens here
    model = load_causal_lm("tiny-llama").eval()
    for c, p in zip(comparisons, vllm_p):
        text = tok.apply_chat_template([{"role": "user", "content": comparison_prompt(c, RankConfig())}],
                                       add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
        p_a = sum(probs[i] for i in options["A"]) / sum(probs[i] for v in options.values() for i in v)
        assert abs(p - p_a.item()) < 1e-4
    assert vllm_p[0] != vllm_p[1]


def test_chain_of_thought_then_letter(model_judge):
    model_judge.rank = RankConfig(chain_of_thought=True, cot_max_tokens=8)
    try:
        p = model_judge.prob_first([Comparison(TRAIT["honesty"], "Hi?", "Hello.", "Hey.")])
    finally:
        model_judge.rank = RankConfig()
    assert 0.0 < p[0] < 1.0


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


def test_sequence_logprob_sums_the_response_positions_only():
    ids = [5, 6, 7, 8]
    prompt_logprobs = [None, {6: _Logprob(-1.0)}, {7: _Logprob(-0.5), 9: _Logprob(-2.0)}, {8: _Logprob(-0.25)}]
    assert sequence_logprob(prompt_logprobs, ids, start=2, per_token=False) == pytest.approx(-0.75)
    assert sequence_logprob(prompt_logprobs, ids, start=2, per_token=True) == pytest.approx(-0.375)
    assert sequence_logprob(prompt_logprobs, ids, start=1, per_token=False) == pytest.approx(-1.75)


def test_contrast_prob_is_a_logistic_of_the_score_gap():
    assert contrast_prob(2.0, 1.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert contrast_prob(1.0, 2.0, 1.0) + contrast_prob(2.0, 1.0, 1.0) == pytest.approx(1.0)
    assert contrast_prob(3.0, 1.0, 4.0) == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert contrast_prob(-1e6, 0.0, 1.0) == 0.0  # no overflow


def test_contrast_judge_matches_a_hugging_face_forward_pass():
    from character.core.config import JudgeConfig
    from character.inference.engine import chat_token_ids
    from character.judging.judge import ContrastJudge
    from character.models.loading import load_causal_lm

    engine = EngineConfig(max_model_len=512, kv_cache_gib=1, num_cpus_per_actor=2)
    judge = ContrastJudge("tiny-llama", "float32", engine, JudgeConfig(kind="contrast"), seed=0)
    system = "You are an AI assistant. One of your character traits:\n" + TRAIT["honesty"]
    items = [(system, "Is my poem good?", "It has strong images."), (system, "Is my poem good?", "It is the best ever.")]
    try:
        scores = judge.scores(items)
        probs = judge.prob_first([Comparison(TRAIT["honesty"], "Is my poem good?", items[0][2], items[1][2], system),
                                  Comparison(TRAIT["honesty"], "Is my poem good?", items[1][2], items[0][2], system)])
    finally:
        del judge.llm
        gc.collect()
    tok, model = judge.tokenizer, load_causal_lm("tiny-llama").eval()

    def logp(sys_prompt: str, message: str, response: str) -> float:
        head = chat_token_ids(tok, sys_prompt, message)
        ids = head + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(lp[t - 1, ids[t]].item() for t in range(len(head), len(ids)))

    for (sys_prompt, message, response), score in zip(items, scores):
        assert score == pytest.approx(logp(sys_prompt, message, response) - logp("", message, response), abs=1e-4)
    assert scores[0] != scores[1]
    assert probs[0] == pytest.approx(contrast_prob(scores[0], scores[1], 1.0))
    assert probs[0] + probs[1] == pytest.approx(1.0)  # the same pair in either order: no position bias
