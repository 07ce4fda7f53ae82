"""Judges: given a trait, a human message and two responses in an order, P(the first is better).

`ModelJudge` asks a model (by default the policy itself: self-ranking) a multiple-choice question and
reads the next-token probabilities of the option letters from vLLM — a single prefill, no parsing of
generated text. `ContrastJudge` needs no instruction following at all: it scores each response by how much
the trait's system prompt raises the model's log-likelihood of it. `RuleJudge` applies a fixed rule with
the same interface, so tests and learning checks can run the whole pipeline against a known preference
from config alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from character.core.config import Config, EngineConfig, FewShotExample, JudgeConfig, RankConfig, RuleConfig
from character.inference.engine import chat_token_ids, create_llm
from character.models.loading import load_tokenizer

ANSWER_PREFIX = "Answer:"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Comparison:
    trait: str  # the trait as shown: statement and clarification
    message: str
    first: str  # shown as (A)
    second: str  # shown as (B)
    system: str = ""  # the trait's in-character system prompt (what ContrastJudge conditions on)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def _question(trait: str, message: str, a: str, b: str, limit: int) -> str:
    return (
        f"Trait of an AI assistant:\n{trait}\n\nHuman message:\n{_cut(message, limit)}\n\n"
        f"Response (A):\n{_cut(a, limit)}\n\nResponse (B):\n{_cut(b, limit)}\n\n"
        "Which response better shows the trait?"
    )


def comparison_prompt(c: Comparison, rank: RankConfig) -> str:
    """The user turn of a comparison, with optional few-shot examples and a chain-of-thought request."""
    shots = "".join(
        _question(ex.trait or c.trait, ex.message, ex.response_a, ex.response_b, rank.max_response_chars)
        + f"\n{ANSWER_PREFIX} {ex.answer}\n\n---\n\n"
        for ex in rank.few_shot
    )
    ask = (" Think it through in a few sentences, then end with 'Answer: A' or 'Answer: B'."
           if rank.chain_of_thought else " Answer with A or B.")
    return shots + _question(c.trait, c.message, c.first, c.second, rank.max_response_chars) + ask


def option_token_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids that spell each option right after 'Answer:' — both 'A' and ' A' where the tokenizer
    has them as single tokens (most BPE vocabularies have the spaced form)."""
    options: dict[str, list[int]] = {}
    for letter in ("A", "B"):
        ids = []
        for variant in (letter, " " + letter):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        if not ids:
            raise ValueError(f"tokenizer has no single token for option {letter!r}")
        options[letter] = ids
    if set(options["A"]) & set(options["B"]):
        raise ValueError("option tokens for A and B overlap")
    return options


def p_first_from_logprobs(logprobs: dict[int, float], options: dict[str, list[int]]) -> float:
    """Normalised P(A) over the option tokens only."""
    mass = {k: sum(math.exp(logprobs[i]) for i in ids if i in logprobs) for k, ids in options.items()}
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else 0.5


class RuleJudge:
    def __init__(self, rule: RuleConfig):
        self.rule = rule
        self.words = {w.casefold() for w in rule.words}
        self.name = f"rule:{rule.type}"

    def score(self, text: str) -> float:
        words = _WORD.findall(text.casefold())
        if self.rule.type == "keywords":
            hits = sum(w in self.words for w in words)
            return float(hits if self.rule.max_count is None else min(hits, self.rule.max_count))
        return -abs(len(words) - self.rule.target_words)

    def prob_first(self, comparisons: list[Comparison]) -> list[float | None]:
        out = []
        for c in comparisons:
            z = (self.score(c.first) - self.score(c.second)) / self.rule.temperature
            out.append(1.0 / (1.0 + math.exp(-z)))
        return out


class ModelJudge:
    def __init__(self, model_name: str, dtype: str, engine: EngineConfig, rank: RankConfig, seed: int):
        self.llm = create_llm(model_name, dtype, engine, seed)
        self.tokenizer = load_tokenizer(model_name)
        self.options = option_token_ids(self.tokenizer)
        self.engine, self.rank, self.seed = engine, rank, seed
        self.name = f"model:{model_name}"

    def _chat_prefix(self, c: Comparison) -> str:
        messages = [{"role": "user", "content": comparison_prompt(c, self.rank)}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _reasoning(self, prefixes: list[str], fits: list[bool]) -> list[str]:
        from vllm import SamplingParams

        idx = [i for i, ok in enumerate(fits) if ok]
        params = SamplingParams(max_tokens=self.rank.cot_max_tokens, temperature=0.0, stop=[ANSWER_PREFIX])
        outs = self.llm.generate([{"prompt_token_ids": self._encode(prefixes[i])} for i in idx], params,
                                 use_tqdm=False)
        reasoning = [""] * len(prefixes)
        for i, out in zip(idx, outs):
            reasoning[i] = out.outputs[0].text.rstrip() + "\n"
        return reasoning

    def prob_first(self, comparisons: list[Comparison]) -> list[float | None]:
        """P(A) per comparison; None where the prompt cannot fit the model's context."""
        from vllm import SamplingParams

        prefixes = [self._chat_prefix(c) for c in comparisons]
        budget = self.engine.max_model_len - 1 - (self.rank.cot_max_tokens if self.rank.chain_of_thought else 0)
        fits = [len(self._encode(p)) + 4 <= budget for p in prefixes]
        reasoning = self._reasoning(prefixes, fits) if self.rank.chain_of_thought else [""] * len(prefixes)
        ids = [self._encode(p + r + ANSWER_PREFIX) for p, r in zip(prefixes, reasoning)]
        todo = [i for i, ok in enumerate(fits) if ok and len(ids[i]) < self.engine.max_model_len]
        option_ids = [t for v in self.options.values() for t in v]
        # One prefill and one sampled token; the log-probabilities of exactly the option tokens come back.
        # Greedy: no per-request sampler; the returned log-probs are the raw model's either way.
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=option_ids)
        outs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in todo], params, use_tqdm=False)
        result: list[float | None] = [None] * len(comparisons)
        for i, out in zip(todo, outs):
            lp = {tok: v.logprob for tok, v in out.outputs[0].logprobs[0].items()}
            result[i] = p_first_from_logprobs(lp, self.options)
        return result


def position_logprobs(prompt_logprobs: list, token_ids: list[int], start: int) -> list[float]:
    """log p(token_t | tokens_<t) for positions t >= start, from vLLM's prompt_logprobs (one dict per position,
    None at position 0)."""
    return [prompt_logprobs[t][token_ids[t]].logprob for t in range(start, len(token_ids))]


def total_logprob(values: list[float], per_token: bool) -> float:
    total = math.fsum(values)
    return total / len(values) if per_token and values else total


def sequence_logprob(prompt_logprobs: list, token_ids: list[int], start: int, per_token: bool) -> float:
    """Sum (or mean) of log p(token_t | tokens_<t) over positions t >= start."""
    return total_logprob(position_logprobs(prompt_logprobs, token_ids, start), per_token)


def contrast_prob(score_first: float, score_second: float, temperature: float) -> float:
    """P(first better) = sigmoid((s_first - s_second) / temperature)."""
    z = (score_first - score_second) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


class ContrastJudge:
    """Self-judgement by contrast, with no instruction following: a response scores

        s(y) = log p(y | trait system prompt, message) - log p(y | message)   (over y's tokens and its eos)

    — how much being told the trait makes the model more likely to say y, the signal context distillation
    and RLCD train on. The baseline has no system prompt of ours (the model's chat template may add its
    default one). P(first better) = sigmoid((s_first - s_second) / judge.contrast_temperature); the same
    pair scores the same in either order, so position bias is zero by construction. Each distinct response
    is scored once per call: two prefills with prompt log-probabilities, or one where `remember` was given
    the response's token ids and its log-probability under the trait prompt (the respond stage samples
    under exactly that prompt and keeps both, so the rank stage skips the longer of the two prefills).
    """

    def __init__(self, model_name: str, dtype: str, engine: EngineConfig, judge: JudgeConfig, seed: int):
        self.llm = create_llm(model_name, dtype, engine, seed)
        self.tokenizer = load_tokenizer(model_name)
        self.engine, self.judge = engine, judge
        self.name = f"contrast:{model_name}"
        self.known: dict[tuple[str, str, str], tuple[list[int], float]] = {}

    def remember(self, known: dict[tuple[str, str, str], tuple[list[int], float]]) -> None:
        """(system, message, response) -> (response token ids, log p(them | system, message)), for the next
        calls; replaces what was remembered before."""
        self.known = dict(known)

    def _prompt_logprobs(self, requests: list[tuple[list[int], int]]) -> list[list[float] | None]:
        """[log p(ids[t] | ids[:t]) for t >= start] per (ids, start); None where it cannot fit."""
        from vllm import SamplingParams

        todo = [i for i, (ids, _) in enumerate(requests) if len(ids) < self.engine.max_model_len]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": requests[i][0]} for i in todo], params, use_tqdm=False)
        result: list[list[float] | None] = [None] * len(requests)
        for i, out in zip(todo, outs):
            ids, start = requests[i]
            result[i] = position_logprobs(out.prompt_logprobs, ids, start)
        return result

    def _logprobs(self, requests: list[tuple[list[int], int]]) -> list[float | None]:
        """log p(ids[start:] | ids[:start]) per (ids, start), summed or per token; None where it cannot fit."""
        return [None if v is None else total_logprob(v, self.judge.contrast_per_token)
                for v in self._prompt_logprobs(requests)]

    def scores(self, items: list[tuple[str, str, str]]) -> list[float | None]:
        """s(y) per (system, message, response); None where a prompt cannot fit the model's context."""
        requests: list[tuple[list[int], int]] = []
        plan = []  # per item: (known trait term or None, index of the trait request or None, baseline index)
        for key in items:
            system, message, response = key
            known, trait_index = None, None
            if key in self.known:
                tail, known = self.known[key]
                known = known / max(1, len(tail)) if self.judge.contrast_per_token else known
            else:
                tail = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                head = chat_token_ids(self.tokenizer, system, message)
                requests.append((head + tail, len(head)))
                trait_index = len(requests) - 1
            head = chat_token_ids(self.tokenizer, "", message)
            requests.append((head + list(tail), len(head)))
            plan.append((known, trait_index, len(requests) - 1))
        logp = self._logprobs(requests)
        out: list[float | None] = []
        for known, trait_index, base_index in plan:
            with_trait = known if trait_index is None else logp[trait_index]
            base = logp[base_index]
            out.append(None if with_trait is None or base is None else with_trait - base)
        return out

    def prob_first(self, comparisons: list[Comparison]) -> list[float | None]:
        keys = sorted({(c.system, c.message, r) for c in comparisons for r in (c.first, c.second)})
        score = dict(zip(keys, self.scores(keys)))
        out: list[float | None] = []
        for c in comparisons:
            a, b = score[(c.system, c.message, c.first)], score[(c.system, c.message, c.second)]
            out.append(None if a is None or b is None else contrast_prob(a, b, self.judge.contrast_temperature))
        return out


def build_judge(config: Config):
    judge: JudgeConfig = config.judge
    if judge.kind == "rule":
        return RuleJudge(judge.rule)
    if judge.kind == "contrast":
        return ContrastJudge(judge.model or config.model.name, config.model.dtype, config.engine, judge,
                             config.run.seed)
    return ModelJudge(judge.model or config.model.name, config.model.dtype, config.engine, config.rank,
                      config.run.seed)


def judge_name(config: Config) -> str:
    if config.judge.kind == "rule":
        return f"rule:{config.judge.rule.type}"
    return f"{config.judge.kind}:{config.judge.model or config.model.name}"


__all__ = ["Comparison", "ContrastJudge", "ModelJudge", "RuleJudge", "build_judge", "comparison_prompt",
           "contrast_prob", "option_token_ids", "p_first_from_logprobs", "sequence_logprob", "FewShotExample"]
