"""Training losses (pure torch, unit-tested against hand-computed values)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor,
                       margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss with soft labels, mean over pairs:
    -(p * log sigma(r_c - r_r - m) + (1 - p) * log sigma(r_r - r_c - m)).
    p = 1 gives the usual -log sigma(r_c - r_r); the margin m asks each side to win by at least m."""
    delta = r_chosen - r_rejected
    return -(p_chosen * F.logsigmoid(delta - margin) + (1.0 - p_chosen) * F.logsigmoid(-delta - margin)).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, p_chosen: torch.Tensor, beta: float):
    """DPO (Rafailov et al.) on summed response log-probs [N]: the Bradley-Terry loss above on the implicit
    rewards beta * (log pi - log ref). With soft labels p it is conservative DPO's label smoothing, eps = 1 - p:
    -[(1 - eps) log sigma(h) + eps log sigma(-h)]. Returns (loss, chosen rewards, rejected rewards)."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    return bradley_terry_loss(reward_chosen, reward_rejected, p_chosen), reward_chosen, reward_rejected


def chosen_nll(logp_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """DPO's NLL term (RPO, Open Character Training's nll_loss_coef): each chosen response's mean per-token
    negative log-likelihood, averaged over pairs (so long answers do not outweigh short ones)."""
    return (-logp_sum / n_tokens.clamp(min=1)).mean()


def completion_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning's loss on the answer's tokens only (TRL's completion-only loss): the mean negative
    log-likelihood over the tokens `mask` flags (per-token log-probs [B, T], mask [B, T] with 1 on answer
    tokens, 0 on the prompt's and padding), every answer token of the micro-batch weighted alike, as TRL and
    Hugging Face's causal-LM loss average."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def zero_variance_groups(scores: torch.Tensor) -> torch.Tensor:
    """Per group [G]: True where every sample scored the same (its advantages are all 0)."""
    return scores.amax(-1) == scores.amin(-1)


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from sampled tokens (Schulman's k1 / k2 / k3, verl's kl, mse
    and low_var_kl). k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2 (biased, >= 0, low
    variance); k3 = (r - 1) - log r with r = q / p (unbiased, >= 0)."""
    log_ratio = logp_ref - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded sequences [batch, T] (mask 1 on real tokens).
    The value after the last real token is 0 (the episode ends). Returns (advantages, returns)."""
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(batch, dtype=rewards.dtype)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros(batch, dtype=values.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < length else 0.0)
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, 0 elsewhere. The variance is Bessel-corrected (divided
    by n - 1), as TRL's masked_whiten and verl's masked_whiten compute it; one entry alone whitens to 0."""
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float, weights: torch.Tensor | None = None):
    """PPO's clipped surrogate; returns (loss, clip fraction). `weights` [B, L-1]: each token's loss is
    multiplied by its weight before the mean over response tokens (the truncated importance weights of
    `truncated_importance_weights`, as verl multiplies pg_losses by them before aggregating)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def truncated_importance_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float | None):
    """Truncated importance sampling (TIS; verl's `tis_imp_ratio_cap`, Yao et al. 2025): per token
    w = min(pi_old / pi_behaviour, cap), pi_behaviour the engine that sampled the token (older weights, other
    kernels), pi_old the trainer's log-prob before the update. PPO's ratio pi / pi_old is clipped as usual and
    w corrects the rest of the way to the behaviour policy (pi / pi_behaviour = pi / pi_old * pi_old / pi_behaviour,
    the decoupled objective); the cap bounds the variance a token can add. A NaN behaviour log-prob (unknown)
    weighs 1, as does every token with `cap` None. Returns (weights [B, L-1], fraction of response tokens whose
    ratio exceeded the cap); no gradient flows through the weights."""
    known = ~torch.isnan(behaviour_logp)
    ratio = torch.where(known, torch.exp((old_logp - torch.nan_to_num(behaviour_logp)).detach()), 1.0)
    if cap is None:
        return torch.ones_like(ratio), masked_mean(torch.zeros_like(ratio), mask)
    return ratio.clamp(max=cap), masked_mean((ratio > cap).float(), mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2), masked mean."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1.0 - var_e / var_r) if var_r > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: moves beta so the measured KL tracks a target."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
