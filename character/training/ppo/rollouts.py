"""PPO pieces on model outputs: batching rollouts, per-token log-probs and values, KL-shaped rewards."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from character.training.losses import kl_per_token


@dataclass
class Rollouts:
    """Right-padded prompt+response sequences; response positions flagged in `mask` (shifted by one:
    column t scores token t+1, so `mask[:, t]` is 1 where token t+1 belongs to the response)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] float
    response_lengths: list[int]
    # [B, L-1] fp32: the engine's log-prob of each response token, aligned with `mask`; NaN where unknown
    behaviour_logp: torch.Tensor | None = None


def build_rollouts(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   behaviour: list[list[float]] | None = None) -> Rollouts:
    """`behaviour`: per response the engine's log-prob of each of its tokens (a response whose list does not
    match its length, e.g. an empty answer stood in for by eos, is NaN: unknown)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    behaviour_logp = torch.full((len(seqs), width - 1), float("nan")) if behaviour is not None else None
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        mask[b, len(p) - 1 : len(s) - 1] = 1.0
        if behaviour is not None and len(behaviour[b]) == len(s) - len(p):
            behaviour_logp[b, len(p) - 1 : len(s) - 1] = torch.tensor(behaviour[b], dtype=torch.float32)
    return Rollouts(ids, attn, mask, [len(r) for r in responses], behaviour_logp)


class _ChunkedLogprobs(torch.autograd.Function):
    """Taken-token log-probs and entropy over chunks of positions. Backward recomputes each chunk's
    log_softmax instead of saving it, so neither pass ever holds a full [B, L-1, V] fp32 tensor."""

    @staticmethod
    def forward(ctx, logits, input_ids, chunk_size: int, with_entropy: bool):
        ctx.set_materialize_grads(False)
        batch, positions = logits.shape[0], logits.shape[1] - 1
        logp = logits.new_empty((batch, positions), dtype=torch.float32)
        entropy = logits.new_empty((batch, positions), dtype=torch.float32) if with_entropy else None
        for start in range(0, positions, chunk_size):
            end = min(start + chunk_size, positions)
            chunk_logp = torch.log_softmax(logits[:, start:end].float(), dim=-1)
            logp[:, start:end] = chunk_logp.gather(-1, input_ids[:, start + 1 : end + 1, None]).squeeze(-1)
            if with_entropy:
                entropy[:, start:end] = -(chunk_logp.exp().mul_(chunk_logp)).sum(-1)
            del chunk_logp
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(logits, input_ids, entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        # d logp[y]/dz = onehot(y) - p;  dH/dz = -p * (logp + H).
        logits, input_ids, entropy = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, logits.shape[1] - 1, ctx.chunk_size):
            end = min(start + ctx.chunk_size, logits.shape[1] - 1)
            chunk_logp = torch.log_softmax(logits[:, start:end].float(), dim=-1)
            probs = chunk_logp.exp()
            if grad_entropy is not None:
                grad = chunk_logp.add_(entropy[:, start:end, None]).mul_(-grad_entropy[:, start:end, None])
            else:
                grad = chunk_logp.zero_()
            if grad_logp is not None:
                grad.sub_(grad_logp[:, start:end, None]).mul_(probs)
                grad.scatter_add_(-1, input_ids[:, start + 1 : end + 1, None], grad_logp[:, start:end, None])
            else:
                grad.mul_(probs)
            grad_logits[:, start:end] = grad
            del chunk_logp, probs, grad
        return grad_logits, None, None, None


def logprobs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 128,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token t+1 | <= t) and the entropy of that distribution, both fp32 [B, L-1], from logits of any
    float dtype. The fp32 log_softmax exists for `chunk_size` positions at a time (a full fp32 copy of a
    152k-vocabulary batch is tens of GB); entropy reuses the same chunk's log_softmax."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLogprobs.apply(logits, input_ids, chunk_size, with_entropy)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | <= t) for every position: [B, L-1]."""
    return logprobs_and_entropy(logits, input_ids, with_entropy=False)[0]


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position: [B, L-1]."""
    no_targets = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, no_targets)[1]


def forward_in_batches(forward, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, fn):
    """`fn(forward(...), ids)` over row slices of at most `batch_size`, concatenated along dim 0: only one
    micro-batch of logits is alive at a time. Tuple results are concatenated element-wise; None stays None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = []
    for start in range(0, max(input_ids.shape[0], 1), batch_size):  # an empty batch still gets one call
        ids = input_ids[start : start + batch_size]
        output = forward(input_ids=ids, attention_mask=attention_mask[start : start + batch_size])
        parts.append(fn(output, ids))
        del output  # before the next forward, or two micro-batches of logits coexist
    if isinstance(parts[0], tuple):
        return tuple(None if column[0] is None else torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, estimator: str):
    """Per-token reward -beta * KL, plus the sequence score on each response's last token."""
    kl = kl_per_token(logp, logp_ref, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.float() * scores[:, None]
    return rewards, kl
