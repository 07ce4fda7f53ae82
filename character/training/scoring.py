"""Sequence rewards, written once for every stage that scores text: the preference model's held-out
accuracy (train-pm), PPO's rewards (train-ppo), the before/after scores (evaluate: the PM's, or after
train-dpo the DPO implicit reward), and the response log-probabilities DPO trains on.

The preference model always reads text with its own tokenizer. Why it matters: `pm.base_model` may be
another model family than the policy (another vocabulary), so the policy's token ids mean nothing to it;
scoring the decoded prompt and response text is correct whatever the two tokenizers are.
"""
from __future__ import annotations

from character.core.config import Config
from character.core.store import StageOutput
from character.data.pm_data import encode_prompt_and_response, encode_response, pad_batch
from character.judging.judge import RuleJudge
from character.models.loading import load_tokenizer, resolve_model
from character.training.ppo import rollouts as ppo


def pm_rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
               batch_size: int | None = None):
    """The PM's scalar reward per (prompt, response), fp32 [N]. `model`: a HF sequence classifier or a
    DeepSpeed engine around one. Forwards run `batch_size` rows at a time (None: all at once), so memory
    stays bounded whatever N is; under ZeRO-3 every rank must pass the same N (the forwards are collectives)."""
    import torch

    sequences = [encode_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    if not sequences:
        return torch.zeros(0)
    device = next(model.parameters()).device
    step = batch_size or len(sequences)
    out = []
    for start in range(0, len(sequences), step):
        ids, mask = pad_batch(sequences[start : start + step], tokenizer.pad_token_id)
        out.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.squeeze(-1).float())
    return torch.cat(out)


def response_logprobs(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                      chunk: int = 128):
    """log pi(response | chat-formatted prompt), summed over the response's tokens (its eos included), and
    the number of those tokens: fp32 [N], [N]. Truncated as the PM's inputs (pm_data.encode_response). One
    forward of all N rows: the caller bounds N."""
    parts = [encode_prompt_and_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    logp, mask = answer_token_logprobs(model, parts, tokenizer.pad_token_id, chunk)
    return (logp * mask).sum(-1), mask.sum(-1)


def answer_token_logprobs(model, parts: list[tuple[list[int], list[int]]], pad_id: int, chunk: int = 128):
    """Per-token log-probs [B, T] of (prompt ids, answer ids) sequences and the mask of the answer's tokens [B, T]
    (1 on them, 0 on the prompt's and on padding), from one forward of all rows (the caller bounds them): what
    `response_logprobs` sums and SFT's completion-only loss averages."""
    roll = ppo.build_rollouts([h for h, _ in parts], [t for _, t in parts], pad_id)
    device = next(model.parameters()).device
    ids = roll.input_ids.to(device)
    logits = model(input_ids=ids, attention_mask=roll.attention_mask.to(device)).logits
    return ppo.logprobs_and_entropy(logits, ids, chunk, with_entropy=False)[0], roll.mask.to(device)


class ImplicitReward:
    """DPO's implicit reward of a response, beta * (log pi(y | x) - log ref(y | x)), from the trained policy
    (a folder or URI: train-dpo's export, full or adapter) and the reference (the model train-dpo started from:
    the base model, or sft/ with policy.sft): what evaluate
    scores with after train-dpo, where no preference model is trained (README, "Recipes")."""

    def __init__(self, policy_dir: str, reference: str, beta: float, max_length: int, batch_size: int):
        from transformers import AutoModelForCausalLM

        self.policy = AutoModelForCausalLM.from_pretrained(resolve_model(policy_dir)).eval()
        self.reference = AutoModelForCausalLM.from_pretrained(resolve_model(reference)).eval()
        self.tokenizer = load_tokenizer(resolve_model(reference))
        self.beta, self.max_length, self.batch_size = beta, max_length, batch_size

    def __call__(self, prompts: list[str], responses: list[str]):
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                p, r = prompts[start : start + self.batch_size], responses[start : start + self.batch_size]
                policy = response_logprobs(self.policy, self.tokenizer, p, r, self.max_length)[0]
                reference = response_logprobs(self.reference, self.tokenizer, p, r, self.max_length)[0]
                out.append(self.beta * (policy - reference))
        return torch.cat(out) if out else torch.zeros(0)


def evaluation_scorer(config: Config):
    """evaluate's score of a response: the preference model (policy.method ppo), or the DPO implicit reward
    (dpo, which trains no PM)."""
    if config.policy.method == "dpo":
        return ImplicitReward(StageOutput(config.run.output_dir, config.policy_stage).path(), config.start_model,
                              config.dpo.beta, config.dpo.max_length, config.ppo.forward_batch_size)
    return RewardModel(StageOutput(config.run.output_dir, "pm").path(), config.pm.max_length,
                       config.ppo.forward_batch_size)


class RewardModel:
    """A frozen preference model exported by train-pm (a folder or an object-store URI), with its tokenizer.

    `build(factory)` constructs the model (PPO wraps it in a DeepSpeed inference engine, under ZeRO-3
    partitioned at construction); the default builds it plainly (evaluate)."""

    def __init__(self, model_dir: str, max_length: int, batch_size: int, dtype: str = "float32", build=None):
        import torch
        from transformers import AutoModelForSequenceClassification

        path = resolve_model(model_dir)
        self.tokenizer = load_tokenizer(path)
        self.max_length, self.batch_size = max_length, batch_size
        factory = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
            path, dtype=getattr(torch, dtype)).eval()
        self.model = build(factory) if build is not None else factory()

    def __call__(self, prompts: list[str], responses: list[str]):
        import torch

        with torch.no_grad():
            return pm_rewards(self.model, self.tokenizer, prompts, responses, self.max_length, self.batch_size)


class ContrastReward:
    """ppo.reward judge, "direct RLAIF" (Lee et al. 2023, RLAIF vs. RLHF): the judge's own score of each answer
    used as the reward, with no preference model in between. The judge is the contrast judge rank labels pairs
    with (judge.kind contrast, character/judging/judge.py): log p(y | the trait's system prompt, x) - log p(y | x)
    under the frozen judge model (judge.model, else the base model: not the policy, which moves), per token with
    judge.contrast_per_token. Forwards through HF (or the DeepSpeed engine `build` makes), `batch_size` rows at a
    time, as the PM's rewards."""

    def __init__(self, config: Config, build=None):
        import torch
        from transformers import AutoModelForCausalLM

        from character.data.prompts import character_system_prompt
        from character.review.marks import active_constitution

        path = resolve_model(config.judge.model or config.model.name)
        self.tokenizer = load_tokenizer(path)
        factory = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            path, dtype=getattr(torch, config.train_dtype)).eval()
        self.model = build(factory) if build is not None else factory()
        constitution = active_constitution(config, "train-ppo", quiet=True)
        self.systems = {t.name: character_system_prompt(t, constitution, config.respond.system_prompt)
                        for t in constitution.traits}
        self.per_token, self.max_length = config.judge.contrast_per_token, config.engine.max_model_len
        self.batch_size = config.ppo.forward_batch_size

    def __call__(self, traits: list[str], prompts: list[str], responses: list[str]):
        import torch

        def logp(systems: list[str]):
            parts = [encode_prompt_and_response(self.tokenizer, p, r, self.max_length, system=s)
                     for s, p, r in zip(systems, prompts, responses)]
            out = []
            for start in range(0, len(parts), self.batch_size):
                lp, mask = answer_token_logprobs(self.model, parts[start : start + self.batch_size],
                                                 self.tokenizer.pad_token_id)
                total = (lp * mask).sum(-1).float()
                out.append(total / mask.sum(-1).clamp(min=1) if self.per_token else total)
            return torch.cat(out) if out else torch.zeros(0)

        with torch.no_grad():
            return logp([self.systems[t] for t in traits]) - logp([""] * len(prompts))


class SequenceScorer:
    """PPO's sequence score: the preference model's reward, the judge's (ppo.reward judge) or the rule judge's,
    plus the truncation penalty."""

    def __init__(self, config: Config, build=None):
        self.penalty = config.ppo.truncation_penalty
        self.rule = self.pm = self.judge = None
        if config.ppo.reward == "rule":
            self.rule = RuleJudge(config.judge.rule)
        elif config.ppo.reward == "judge":
            self.judge = ContrastReward(config, build)
        else:
            self.pm = RewardModel(StageOutput(config.run.output_dir, "pm").path(), config.pm.max_length,
                                  config.ppo.forward_batch_size, config.train_dtype, build)

    def __call__(self, rows: list[dict], responses: list[str], finish: list[str]):
        """rows: the prompts' message rows (text, trait)."""
        import torch

        prompts = [r["text"] for r in rows]
        if self.rule is not None:
            scores = torch.tensor([self.rule.score(r) for r in responses], dtype=torch.float32)
        elif self.judge is not None:
            scores = self.judge([r["trait"] for r in rows], prompts, responses)
        else:
            scores = self.pm(prompts, responses)
        return scores + torch.tensor([self.penalty if f == "length" else 0.0 for f in finish])
