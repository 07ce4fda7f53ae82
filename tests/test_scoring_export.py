"""The shared library pieces of PM scoring and model export (no Ray): the PM reads text with its own
tokenizer, and exports are strict and exact."""
import pytest
import torch

from character.models.export import export_model
from character.models.loading import load_tokenizer, resolve_model

PROMPTS = ["What do you remember between conversations?", "Is it fine to be unsure?"]
RESPONSES = ["Nothing carries over; each conversation starts fresh for me.", "Yes, saying so is honest."]


def _export_pm(base: str, target):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(base), num_labels=1)
    export_model(AutoModelForSequenceClassification, model.config, model.state_dict(), load_tokenizer(base),
                 str(target))
    return model.eval()


def test_a_pm_on_another_tokenizer_scores_text_with_its_own(tmp_path, make_config):
    """PM base tiny-qwen2 (vocabulary 1536), policy tiny-llama (2048): PPO's and evaluate's scorer must
    tokenise with the PM's tokenizer; with the policy's ids (the old Scorer) the scores are wrong."""
    from character.data.pm_data import encode_response, pad_batch
    from character.training.scoring import SequenceScorer

    pm = _export_pm("tiny-qwen2", tmp_path / "pm")
    config = make_config(tmp_path, "pm.base_model=tiny-qwen2", "ppo.critic_init=policy", "ppo.reward=pm")
    scores = SequenceScorer(config)([{"text": p, "trait": "honesty"} for p in PROMPTS], RESPONSES, ["stop", "stop"])

    def direct(tokenizer):
        ids, mask = pad_batch([encode_response(tokenizer, p, r, config.pm.max_length)
                               for p, r in zip(PROMPTS, RESPONSES)], tokenizer.pad_token_id)
        with torch.no_grad():
            return pm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)

    assert torch.allclose(scores, direct(load_tokenizer("tiny-qwen2")), atol=1e-5)
    with pytest.raises(IndexError):  # the policy's ids (the old Scorer) run past the PM's vocabulary
        direct(load_tokenizer("tiny-llama"))


def test_rule_reward_adds_the_truncation_penalty(tmp_path, make_config):
    from character.training.scoring import SequenceScorer

    config = make_config(tmp_path, "ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule",
                         "judge.rule.type=length", "judge.rule.target_words=0", "ppo.truncation_penalty=-2")
    scores = SequenceScorer(config)([{"text": "q", "trait": "honesty"}] * 2, ["one two three", "one"], ["stop", "length"])
    assert scores.tolist() == pytest.approx([-3.0, -3.0])


def test_export_is_strict_and_exact(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-qwen2"))  # tied embeddings
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    export_model(AutoModelForCausalLM, model.config, weights, load_tokenizer("tiny-qwen2"), str(tmp_path / "out"),
                 {"metrics.json": {"a": 1}})
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(value, weights[key]), key
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(RuntimeError, match="model.norm.weight"):  # strict: never a silently untrained tensor
        export_model(AutoModelForCausalLM, model.config, missing, load_tokenizer("tiny-qwen2"), str(tmp_path / "x"))


def test_bf16_weights_cross_to_the_engines_bit_exactly():
    from character.inference.rollout import arrays_for_engines, tensors_from_arrays

    weights = {"model.embed_tokens.weight": torch.randn(5, 4).bfloat16(), "model.norm.weight": torch.randn(4)}
    arrays = arrays_for_engines(weights, tie_word_embeddings=True)
    back = tensors_from_arrays(arrays)
    assert set(back) == set(weights)
    for key, value in weights.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_response_logprobs_and_the_dpo_implicit_reward_by_hand(tmp_path, make_config):
    """response_logprobs sums log p over the response's tokens only (eos included), computed here token by
    token from the logits; evaluate's DPO score is beta * (log pi - log base), 0 for the base itself."""
    from transformers import AutoModelForCausalLM

    from character.data.pm_data import chat_prefix
    from character.training.scoring import ImplicitReward, evaluation_scorer, response_logprobs

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")).eval()
    tok = load_tokenizer("tiny-llama")
    with torch.no_grad():
        total, tokens = response_logprobs(base, tok, PROMPTS, RESPONSES, 128)
        for k, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            head = chat_prefix(tok, prompt)
            tail = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(base(input_ids=torch.tensor([head + tail])).logits[0].double(), -1)
            by_hand = sum(float(logp[len(head) - 1 + t, y]) for t, y in enumerate(tail))
            assert float(total[k]) == pytest.approx(by_hand, abs=1e-3) and int(tokens[k]) == len(tail)
    torch.manual_seed(1)
    trained = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_model(AutoModelForCausalLM, trained.config, trained.state_dict(), tok, str(tmp_path / "dpo"))
    config = make_config(tmp_path, "policy.method=dpo", "dpo.beta=0.5")
    scorer = evaluation_scorer(config)
    assert isinstance(scorer, ImplicitReward)
    with torch.no_grad():
        expected = 0.5 * (response_logprobs(trained.eval(), tok, PROMPTS, RESPONSES, config.dpo.max_length)[0] - total)
    assert torch.allclose(scorer(PROMPTS, RESPONSES), expected, atol=1e-4)
    assert torch.allclose(ImplicitReward(resolve_model("tiny-llama"), "tiny-llama", 0.5, 128, 1)(PROMPTS, RESPONSES),
                          torch.zeros(2), atol=1e-6)


def test_the_judge_reward_is_the_contrast_judges_score_of_each_answer(tmp_path, make_config):
    """ppo.reward judge (direct RLAIF): PPO's sequence score equals what the contrast judge (vLLM, the base
    model) gives the same answer under its trait's system prompt, summed and per token, to 1e-4; rows of
    different traits get their own trait's prompt."""
    import gc

    from character.data.prompts import character_system_prompt
    from character.judging.judge import ContrastJudge
    from character.review.marks import active_constitution
    from character.training.scoring import SequenceScorer

    rows = [{"text": PROMPTS[0], "trait": "ai_nature"}, {"text": PROMPTS[1], "trait": "honesty"},
            {"text": PROMPTS[1], "trait": "curiosity"}]
    answers = [RESPONSES[0], RESPONSES[1], RESPONSES[1]]
    expected = {}
    for per_token in (False, True):
        config = make_config(tmp_path, "ppo.reward=judge", "judge.kind=contrast", "ppo.critic_init=policy",
                             f"judge.contrast_per_token={str(per_token).lower()}", "ppo.truncation_penalty=-1.0")
        constitution = active_constitution(config, "test", quiet=True).by_name()
        items = [(character_system_prompt(constitution[r["trait"]], active_constitution(config, "test", quiet=True),
                                          config.respond.system_prompt), r["text"], a) for r, a in zip(rows, answers)]
        judge = ContrastJudge(config.model.name, "float32", config.engine, config.judge, seed=0)
        try:
            expected[per_token] = judge.scores(items)
        finally:
            del judge.llm
            gc.collect()
        scores = SequenceScorer(config)(rows, answers, ["stop", "stop", "length"])
        assert scores[:2].tolist() == pytest.approx(expected[per_token][:2], abs=1e-4)
        assert float(scores[2]) == pytest.approx(expected[per_token][2] - 1.0, abs=1e-4)  # the truncation penalty
    assert expected[False][1] != expected[False][2]  # another trait, another score
    with pytest.raises(Exception, match="judge.kind is 'model'"):
        make_config(tmp_path, "ppo.reward=judge", "judge.kind=model")
