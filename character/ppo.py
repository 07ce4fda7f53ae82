"""PPO pieces on model outputs: batching rollouts, per-token log-probs and values, KL-shaped rewards."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from character.losses import gae, kl_per_token, whiten


@dataclass
class Rollouts:
    """Right-padded prompt+response sequences; response positions flagged in `mask` (shifted by one:
    column t scores token t+1, so `mask[:, t]` is 1 where token t+1 belongs to the response)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] float
    response_lengths: list[int]


def build_rollouts(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollouts:
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        mask[b, len(p) - 1 : len(s) - 1] = 1.0
    return Rollouts(ids, attn, mask, [len(r) for r in responses])


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | <= t) for every position: [B, L-1]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def policy_forward(engine, rollouts: Rollouts):
    out = engine(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask)
    return token_logprobs(out.logits, rollouts.input_ids), out.logits


def value_forward(engine, rollouts: Rollouts) -> torch.Tensor:
    """Per-position values from a token-classification head: [B, L-1] (value of the state before t+1)."""
    out = engine(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask)
    return out.logits.squeeze(-1)[:, :-1].float()


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, estimator: str):
    """Per-token reward -beta * KL, plus the sequence score on each response's last token."""
    kl = kl_per_token(logp, logp_ref, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.float() * scores[:, None]
    return rewards, kl


def advantages_and_returns(rewards, values, mask, gamma: float, lam: float, whiten_adv: bool):
    # GAE runs over response positions only; shift them to start at column 0 per row is unnecessary:
    # masked positions contribute nothing and the recursion stops at the mask's end.
    adv, ret = gae(rewards, values * mask, mask, gamma, lam)
    if whiten_adv:
        adv = whiten(adv, mask)
    return adv, ret
