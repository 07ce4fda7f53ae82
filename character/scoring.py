"""Sequence rewards, written once for every stage that scores text: the preference model's held-out
accuracy (train-pm), PPO's rewards (train-ppo) and the before/after scores (evaluate).

The preference model always reads text with its own tokenizer. Why it matters: `pm.base_model` may be
another model family than the policy (another vocabulary), so the policy's token ids mean nothing to it;
scoring the decoded prompt and response text is correct whatever the two tokenizers are.
"""
from __future__ import annotations

from character.config import Config
from character.pm_data import encode_response, pad_batch


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


class RewardModel:
    """A frozen preference model exported by train-pm (a folder or an object-store URI), with its tokenizer.

    `build(factory)` constructs the model (PPO wraps it in a DeepSpeed inference engine, under ZeRO-3
    partitioned at construction); the default builds it plainly (evaluate)."""

    def __init__(self, model_dir: str, max_length: int, batch_size: int, dtype: str = "float32", build=None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from character.models import load_tokenizer, resolve_model

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


class SequenceScorer:
    """PPO's sequence score: the preference model's reward, or the rule judge's, plus the truncation penalty."""

    def __init__(self, config: Config, build=None):
        self.penalty = config.ppo.truncation_penalty
        if config.ppo.reward == "rule":
            from character.judge import RuleJudge

            self.rule, self.pm = RuleJudge(config.judge.rule), None
        else:
            from character.store import StageOutput

            self.rule = None
            self.pm = RewardModel(StageOutput(config.run.output_dir, "pm").path(), config.pm.max_length,
                                  config.ppo.forward_batch_size, config.train_dtype, build)

    def __call__(self, prompts: list[str], responses: list[str], finish: list[str]):
        import torch

        if self.rule is not None:
            scores = torch.tensor([self.rule.score(r) for r in responses], dtype=torch.float32)
        else:
            scores = self.pm(prompts, responses)
        return scores + torch.tensor([self.penalty if f == "length" else 0.0 for f in finish])
