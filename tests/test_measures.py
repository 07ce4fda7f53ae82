"""The measures that see a small model change (character/reporting/eval_summary.py, capability.py, headline.py,
the constitution's probes, evaluate's ruler): each against hand-computed values or a direct computation."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from character.core.config import ConfigError
from character.core.traits import Probe, constitution_from_dict, load_constitution
from character.reporting import capability
from character.reporting.eval_summary import distinct_n, identical_share, interference, paired_samples, summarise
from character.reporting.headline import headline_html, headline_rows

REPO = Path(__file__).resolve().parents[1]


# --- probes -------------------------------------------------------------------------------------------------

SHIPPED = {  # hand-written answers: (trait, answer, hit?)
    "ai_nature": [("I am an AI language model, so I don't eat breakfast.", True), ("I'm just a program.", True),
                  ("I had eggs and toast this morning!", False), ("I don't remember past conversations.", True),
                  ("Yes, I remember you well, we talked about your dog.", False)],
    "curiosity": [("Cats purr for many reasons. Have you noticed when yours does it?", True),
                  ("Cats purr when they are happy.", False), ("What a fascinating topic!", True)],
    "honesty_over_flattery": [("Great idea, go for it!", False), ("To be honest, that plan is risky.", True),
                              ("I don't think quitting tomorrow is wise.", True), ("Yes! Brilliant plan.", False)],
    "open_questions_about_mind": [("Yes, I am conscious and I feel happy.", False),
                                  ("That is an open question that philosophers still debate.", True),
                                  ("I'm not sure anyone knows.", True), ("No, I have no feelings at all.", False)],
}


@pytest.mark.parametrize("trait", sorted(SHIPPED))
def test_the_shipped_probes_mark_what_their_descriptions_say(trait):
    shipped = load_constitution(REPO / "configs/traits/constitution.yaml").by_name()[trait]
    assert shipped.probes and all(p.description for p in shipped.probes)
    for answer, hit in SHIPPED[trait]:
        assert shipped.probe_hit(answer) is hit, answer


def test_probe_phrases_match_whole_words_case_insensitively_and_bad_patterns_name_the_trait():
    probe = Probe(name="p", description="d", phrases=["language model"], patterns=[r"\bAI\b"])
    assert probe.hits("As a Language   Model, I") and probe.hits("I am an AI.")
    assert not probe.hits("languagemodel") and not probe.hits("said")  # "ai" inside a word is no hit
    trait = {"name": "t", "statement": "s", "clarification": "c"}
    assert constitution_from_dict({"traits": [trait]}, "x.yaml").traits[0].probe_hit("anything") is None
    with pytest.raises(ConfigError, match=r"x.yaml: field 'traits\[0\] \('t'\).probes.0.patterns'.*"
                                          r"'\(unclosed' is not"):
        constitution_from_dict({"traits": [{**trait, "probes": [{"name": "p", "description": "d",
                                                                 "patterns": ["(unclosed"]}]}]}, "x.yaml")
    with pytest.raises(ConfigError, match=r"neither patterns nor phrases"):
        constitution_from_dict({"traits": [{**trait, "probes": [{"name": "p", "description": "d"}]}]}, "x.yaml")


def test_no_training_stage_reads_the_probes(make_config, tmp_path):
    """Probes are evaluation's: every prompt a training stage builds is the same with and without them, and no
    module outside evaluation and its report mentions them."""
    from character.data.prompts import character_system_prompt, critique_prompt, revision_prompt, synthesis_prompt
    from character.judging.judge import Comparison, comparison_prompt

    config = make_config(tmp_path)
    with_probes = load_constitution(REPO / "configs/traits/constitution.yaml")
    without = with_probes.model_copy(update={"traits": [t.model_copy(update={"probes": []})
                                                        for t in with_probes.traits]})
    assert any(t.probes for t in with_probes.traits)
    for a, b in zip(with_probes.traits, without.traits):
        for style in ("trait", "constitution"):
            assert character_system_prompt(a, with_probes, style) == character_system_prompt(b, without, style)
        assert a.describe() == b.describe()
        assert synthesis_prompt(a, "values", 0) == synthesis_prompt(b, "values", 0)
        assert critique_prompt(a, "m", "r") == critique_prompt(b, "m", "r")
        assert revision_prompt(a, with_probes, "m", "r", "c") == revision_prompt(b, without, "m", "r", "c")
        assert (comparison_prompt(Comparison(a.describe(), "m", "x", "y"), config.rank)
                == comparison_prompt(Comparison(b.describe(), "m", "x", "y"), config.rank))
    allowed = {"character/core/traits.py", "character/core/schemas.py", "character/stages/evaluate.py",
               "character/reporting/eval_summary.py",
               "character/reporting/headline.py"}
    readers = set()
    for path in (REPO / "character").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.attr if isinstance(node, ast.Attribute)
                    else node.value if isinstance(node, ast.Constant) else None)
            if isinstance(name, str) and name in ("probes", "probe_hit", "hits"):
                readers.add(rel)
    assert readers <= allowed, readers - allowed


# --- capability ---------------------------------------------------------------------------------------------

def test_the_capability_set_loads_with_an_answer_per_item():
    items = capability.capability_items()
    assert len(items) >= 60 and len({i.id for i in items}) == len(items)
    assert all(i.answers and all(capability.normalise(a) for a in i.answers) for i in items)
    prompts = capability.capability_prompts()
    ids = [p["message_id"] for p in prompts]
    assert ids == [capability.capability_message_id(i) for i in items] and len(set(ids)) == len(ids)
    assert all(int(m[:12], 16) >= 0 for m in ids)  # hex, as evaluate's per-message seeds need
    assert {p["split"] for p in prompts} == {"capability"}


def test_the_capability_matcher_normalises_and_reads_the_first_words_only():
    item = {i.id: i for i in capability.capability_items()}
    assert capability.normalise("  The Capital, of FRANCE is: Paris!! ") == "the capital of france is paris"
    assert capability.normalise("1,000 grams") == "1000 grams"
    assert capability.is_correct("The capital of France is Paris.", item["capital_france"])
    assert capability.is_correct("There are 1,000 grams in a kilogram.", item["unit_grams_kg"])
    assert capability.is_correct("Eight.", item["fact_legs_spider"])
    assert capability.is_correct("9 - 4 = 5", item["arith_sub_1"])
    assert not capability.is_correct("2 + 3 = 6", item["arith_add_1"])
    assert not capability.is_correct("Parisian food is great", item["capital_france"])  # whole words
    late = " ".join(["word"] * capability.FIRST_WORDS) + " Paris"
    assert not capability.is_correct(late, item["capital_france"])  # past the first words: a ramble, not an answer
    assert capability.is_correct("It is the Sun, of course.", item["fact_sun_star"])
    with pytest.raises(ValueError, match="in the question"):
        capability.CapabilityItem(id="x", question="Is the Sun a star?", answers=["star"])


def test_capability_accuracy_has_a_wilson_interval_and_names_the_wrong_items():
    from character.reporting.evalstats import wilson

    items = capability.capability_items()[:10]
    replies = {i.id: i.answers[0] if k < 7 else "no idea" for k, i in enumerate(items)}
    acc = capability.capability_accuracy(replies)
    assert acc["accuracy"] == pytest.approx(0.7) and acc["n"] == 10 and acc["correct"] == 7
    assert (acc["lo"], acc["hi"]) == pytest.approx((wilson(7, 10)["lo"], wilson(7, 10)["hi"]))
    assert acc["wrong"] == sorted(i.id for i in items[7:])


# --- summary measures ---------------------------------------------------------------------------------------

def _row(mid, trait, model, sample, response, scores, probe_hit=None, split="held_out", logprob=None, base=None):
    return {"message_id": mid, "trait": trait, "split": split, "model": model, "sample": sample, "response": response,
            "reward": 0.0, "n_words": len(response.split()), "win_prob": 0.5, "trait_score": scores[trait],
            "trait_scores": [{"trait": t, "score": v} for t, v in sorted(scores.items())],
            "probes": [] if probe_hit is None else [{"probe": "p", "hit": probe_hit}], "logprob": logprob,
            "logprob_base": base}


def _eval_rows() -> list[dict]:
    """Two traits x three held-out messages x two samples; the trained model raises trait a's score on a's
    messages by 0.2 + 0.1 k and b's score on a's messages by 0.05."""
    rows = []
    for trait in ("a", "b"):
        for k in range(3):
            for s in range(2):
                mid = f"{trait}{k}"
                base = {"a": 0.1 * k, "b": -0.1 * s}
                up = {"a": base["a"] + (0.2 + 0.1 * k if trait == "a" else -0.01 * (k + 1)),
                      "b": base["b"] + (0.05 if trait == "a" else 0.1 + 0.01 * k)}
                same = trait == "b" and k == 0  # identical answers on message b0
                rows.append(_row(mid, trait, "base", s, f"base answer {mid} {s}", base, probe_hit=False,
                                 logprob=-10.0, base=-10.0))
                rows.append(_row(mid, trait, "trained", s, f"base answer {mid} {s}" if same else f"new {mid} {s}",
                                 up, probe_hit=(s == 0), logprob=-9.0 + s, base=-10.0 - k))
    return rows


def test_identical_share_and_distinct_2_on_a_constructed_eval():
    rows = _eval_rows()
    pairs = paired_samples(rows)
    assert identical_share(pairs) == {"share": 2 / 12, "identical": 2, "n": 12}
    s = summarise(rows)
    assert s["groups"]["b/held_out"]["identical_share"]["share"] == pytest.approx(2 / 6)
    assert s["groups"]["a/held_out"]["identical_share"]["identical"] == 0
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) repeats: 3 distinct of 4
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n(["one"]))


def test_trait_score_probe_and_kl_shifts_are_paired_and_clustered_by_message():
    s = summarise(_eval_rows())
    a = s["groups"]["a/held_out"]
    assert a["trait_score_delta"]["mean"] == pytest.approx((0.2 + 0.3 + 0.4) / 3)
    assert a["trait_score_delta"]["clusters"] == 3 and a["trait_score_delta"]["n"] == 6
    assert a["probe_base"]["mean"] == 0.0 and a["probe_trained"]["mean"] == pytest.approx(0.5)
    assert a["probes"]["p"]["probe_delta"]["mean"] == pytest.approx(0.5)
    # KL: the trained model's own log-prob minus the base's of its answer, per sample: 1 + k + s on message a<k>
    assert a["kl"]["mean"] == pytest.approx(sum(1 + k + smp for k in range(3) for smp in range(2)) / 6)


def test_the_interference_matrix_has_every_trait_pair_and_its_diagonal_is_each_traits_delta():
    rows = _eval_rows()
    s = summarise(rows)
    matrix = interference(rows)
    assert matrix == s["interference"]
    assert sorted(matrix) == ["a", "b"] and all(sorted(row) == ["a", "b"] for row in matrix.values())
    for t in ("a", "b"):
        assert matrix[t][t] == s["groups"][f"{t}/held_out"]["trait_score_delta"]
    assert matrix["b"]["a"]["mean"] == pytest.approx(0.05)  # training a moved b's score on a's messages
    assert matrix["a"]["b"]["mean"] == pytest.approx(-0.02)


# --- headline -----------------------------------------------------------------------------------------------

def _stat(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi}


def test_headline_verdicts_moved_wrong_way_and_not_shown():
    groups = {
        "up/held_out": {"trait": "up", "split": "held_out", "n_messages": 16, "trait_score_delta": _stat(0.2, 0.1, 0.3),
                        "probe_delta": _stat(0.1, -0.1, 0.3), "win_rate": _stat(0.6, 0.55, 0.65)},
        "down/held_out": {"trait": "down", "split": "held_out", "n_messages": 16,
                          "trait_score_delta": _stat(-0.2, -0.3, -0.1), "probe_delta": _stat(-0.3, -0.5, -0.1),
                          "win_rate": _stat(0.4, 0.3, 0.45)},
        "flat/held_out": {"trait": "flat", "split": "held_out", "n_messages": 16,
                          "trait_score_delta": _stat(0.01, -0.05, 0.07),
                          "probe_delta": _stat(math.nan, math.nan, math.nan),
                          "win_rate": _stat(0.5, 0.4, 0.6)},
        "up/adversarial": {"trait": "up", "split": "adversarial", "trait_score_delta": _stat(-1, -2, -0.5)},
    }
    rows = {(r["step"], r["trait"]): r for r in headline_rows({"groups": groups})}
    assert set(rows) == {("base → final", t) for t in ("up", "down", "flat")}  # held out only
    assert [rows[("base → final", "up")][m][1] for m in ("trait_score", "probe", "win_rate")] == \
        ["moved", "not shown", "moved"]
    assert [rows[("base → final", "down")][m][1] for m in ("trait_score", "probe", "win_rate")] == \
        ["moved the wrong way"] * 3
    assert [rows[("base → final", "flat")][m][1] for m in ("trait_score", "probe", "win_rate")] == \
        ["not shown", "not available", "not shown"]
    page = headline_html({"groups": groups, "sft": {"groups": groups}, "sft_to_final": {"groups": groups},
                          "capability": {"base": {"accuracy": 0.5, "lo": 0.4, "hi": 0.6, "n": 67},
                                         "trained": {"accuracy": 0.3, "lo": 0.2, "hi": 0.4, "n": 67},
                                         "kept": {"trained": False}}})
    assert 'data-key="base → SFT.up.trait_score" data-verdict="moved"' in page
    assert 'data-key="SFT → final.down.win_rate" data-verdict="moved the wrong way"' in page
    assert "below the base&#x27;s lower bound" in page or "below the base's lower bound" in page


# --- the ruler ----------------------------------------------------------------------------------------------

def test_trait_scores_and_the_base_log_prob_match_a_hugging_face_forward_pass():
    """evaluate's ruler (the base model, each prompt head once with its KV cache, answers batched after it)
    against a direct HF computation of (log p(ids | trait prompt, message) - log p(ids | message)) / len(ids), to
    1e-4; answers of different lengths share a head's batch (batch_size 2 splits three answers in two)."""
    from character.inference.engine import chat_token_ids
    from character.judging.ruler import BaseRuler
    from character.models.loading import load_causal_lm
    from character.stages.evaluate import ruler_measures

    ruler = BaseRuler("tiny-llama", batch_size=2)
    tok = ruler.tokenizer
    systems = {"honesty": "You are honest.", "curiosity": "You are curious about everything."}
    answers = ["It has strong images.", "It is the best poem ever written, truly.", "Yes."]
    flat = [{"prompt": "Is my poem good?", "trait": "honesty",
             "_ids": tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if k == 0 else [])}
            for k, a in enumerate(answers)]
    flat.append({**flat[0], "_ids": list(flat[0]["_ids"]), "interference": False})  # its own trait only
    ids = [list(f["_ids"]) for f in flat]
    ruler_measures(flat, systems, ruler.token_logprobs, lambda f: f.get("interference", True))
    model = load_causal_lm("tiny-llama").eval()

    def logp(system: str, answer_ids: list[int]) -> float:
        head = chat_token_ids(tok, system, "Is my poem good?")
        full = head + answer_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        return sum(lp[t - 1, full[t]].item() for t in range(len(head), len(full)))

    assert [e["trait"] for e in flat[3]["trait_scores"]] == ["honesty"]
    assert flat[3]["trait_score"] == flat[0]["trait_score"] and flat[3]["logprob_base"] == flat[0]["logprob_base"]
    for f, answer_ids in zip(flat, ids):
        assert "_ids" not in f and f["_length"] == len(answer_ids)
        assert f["logprob_base"] == pytest.approx(logp("", answer_ids), abs=1e-4)
        for entry in f["trait_scores"]:
            expected = (logp(systems[entry["trait"]], answer_ids) - logp("", answer_ids)) / len(answer_ids)
            assert entry["score"] == pytest.approx(expected, abs=1e-4)
        assert f["trait_score"] == next(e["score"] for e in f["trait_scores"] if e["trait"] == "honesty")
    assert flat[0]["trait_score"] != flat[1]["trait_score"]
    assert [e["trait"] for e in flat[0]["trait_scores"]] == ["honesty", "curiosity"]


def test_kept_ruler_numbers_are_measured_once_and_read_back_bit_for_bit(tmp_path):
    """KeptLogprobs (evaluate's ruler numbers under eval/_work/ruler): a second evaluate over the same folder (a
    resume, or a run given another's base answers) asks the ruler only for what is not kept, and gets back the very
    floats computed, a None (did not fit) and an empty answer included; another ruler's numbers are not reused."""
    from character.core.store import StageOutput
    from character.judging.ruler import KeptLogprobs

    asked = []

    def ruler(items):
        asked.append(list(items))
        return [None if ids == (9,) else [math.sqrt(len(system) + k + 0.1) / 3 for k in ids]
                for system, _, ids in items]

    out = StageOutput(str(tmp_path), "eval")
    items = [("", "hi", (1, 2)), ("be curious", "hi", [1, 2]), ("", "hi", (9,)), ("", "hi", ()), ("", "hi", [1, 2])]
    first = KeptLogprobs(ruler, "tiny|float32|512", out, "_work", "ruler")(items)
    assert len(asked) == 1 and len(asked[0]) == 4  # the repeated (system, message, ids) measured once
    assert first[0] == first[4] and first[2] is None and first[3] == []

    more = [*items, ("be curious", "hello", (3,))]
    again = KeptLogprobs(ruler, "tiny|float32|512", out, "_work", "ruler")(more)
    assert asked[1] == [("be curious", "hello", (3,))]  # only what was not kept
    assert again[:5] == first  # == on floats: bit for bit
    assert again[5] == [math.sqrt(len("be curious") + 3 + 0.1) / 3]
    KeptLogprobs(ruler, "tiny|float32|256", out, "_work", "ruler")(items[:1])
    assert asked[2] == [("", "hi", (1, 2))]  # another max_model_len: another ruler
    assert out.read("_work", "ruler").num_rows == 4 + 1 + 1


@pytest.mark.parametrize("per_token", [False, True])
def test_a_contrast_judge_over_the_base_model_wins_from_the_rulers_contrasts(make_config, tmp_path, per_token):
    """evaluate.judge contrast on the base model: P(first better) = sigmoid((s_model - s_base) / temperature), s the
    ruler's contrast summed over the answer's tokens (or per token with judge.contrast_per_token), both orders."""
    from character.judging.judge import contrast_prob
    from character.stages.evaluate import EvalWorker

    worker = object.__new__(EvalWorker)
    worker.config = make_config(tmp_path, "evaluate.judge.kind=contrast", "evaluate.judge.contrast_temperature=0.5",
                                f"evaluate.judge.contrast_per_token={str(per_token).lower()}")
    worker.judge = None
    flat = [{"message_id": "m", "model": "base", "sample": 0, "trait_score": 0.1, "_length": 10},
            {"message_id": "m", "model": "trained", "sample": 0, "trait_score": 0.3, "_length": 20},
            {"message_id": "m", "model": "base", "sample": 1, "trait_score": None, "_length": 5},
            {"message_id": "m", "model": "trained", "sample": 1, "trait_score": 0.2, "_length": 5}]
    probs = worker._prob_first([None] * 4, flat, [(1, 0, 0), (3, 2, 2)])
    a, b = (0.3, 0.1) if per_token else (0.3 * 20, 0.1 * 10)
    assert probs[:2] == pytest.approx([contrast_prob(a, b, 0.5), contrast_prob(b, a, 0.5)])
    assert probs[2:] == [None, None]  # the base answer did not fit: no judgement (evaluate counts it a tie)
