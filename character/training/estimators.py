"""Advantage estimators and policy losses, registered by name (verl's `core_algos` pattern: `register_adv_est`,
`register_policy_loss`): `ppo.advantage` and `ppo.policy_loss` pick one each; the config checks, the critic
decision (`uses_critic`) and train-ppo's dispatch all read the registries. A new estimator or loss is one
decorated function (plus its unit test against hand values).

Every estimator has one signature: `fn(x: AdvantageInputs) -> (advantages [B, L-1], returns [B, L-1] or None)`,
returns being the critic's targets (None for a critic-free estimator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from character.training.losses import clipped_policy_loss, gae, whiten


@dataclass
class AdvantageInputs:
    """One rollout batch as the estimators see it; rows of one prompt are consecutive."""

    scores: torch.Tensor  # [B] one score per sequence (padding rows 0)
    kl: torch.Tensor  # [B, L-1] per-token KL to the reference (masked)
    mask: torch.Tensor  # [B, L-1] 1 on response tokens
    kl_coef: float = 0.0  # the KL weight in the reward (0 when the KL is a loss term instead)
    rewards: torch.Tensor | None = None  # [B, L-1] -kl_coef * KL plus the score on each response's last token
    values: torch.Tensor | None = None  # [B, L-1] the critic's, for estimators that need one
    samples_per_prompt: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    scale_by_std: bool = True  # grpo: divide by the group's std (False: Dr. GRPO)
    eps: float = 1e-6


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool
    min_samples_per_prompt: int
    summary: str


class Registry(dict):
    """name -> entry, filled by the decorators below: a name registered twice, or looked up but unknown, is an
    error naming what is registered."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry

    def find(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r} (registered: {', '.join(self)})")
        return self[name]


def _summary(fn) -> str:
    """A registered function's docstring's first line: its summary in the docs."""
    return (fn.__doc__ or fn.__name__).strip().splitlines()[0]


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


def register_advantage(name: str, *, needs_critic: bool = False, min_samples_per_prompt: int = 1):
    """Registers `fn` as `ppo.advantage: <name>`."""
    def register(fn):
        ADVANTAGE_ESTIMATORS.add(name, AdvantageEstimator(name, fn, needs_critic, min_samples_per_prompt, _summary(fn)))
        return fn
    return register


def estimator(name: str) -> AdvantageEstimator:
    return ADVANTAGE_ESTIMATORS.find(name)


def uses_critic(ppo) -> bool:
    """Whether `ppo.advantage` needs a critic (train-ppo then trains one beside the policy)."""
    return estimator(ppo.advantage).needs_critic


def estimator_problem(ppo) -> str | None:
    """Why the PPO settings cannot run their estimator and loss (None: they can): an unknown name, too few
    samples per prompt."""
    for field, registry in (("policy_loss", POLICY_LOSSES), ("advantage", ADVANTAGE_ESTIMATORS)):
        try:
            registry.find(getattr(ppo, field))
        except ValueError as exc:
            return f"field 'ppo.{field}': {exc}"
    need = ADVANTAGE_ESTIMATORS[ppo.advantage].min_samples_per_prompt
    if ppo.samples_per_prompt < need:
        return (f"field 'ppo.advantage': '{ppo.advantage}' needs ppo.samples_per_prompt >= {need} (the other samples "
                f"of a prompt are each sample's baseline), got {ppo.samples_per_prompt}")
    return None


@register_advantage("gae", needs_critic=True)
def gae_advantages(x: AdvantageInputs):
    """PPO with a critic: GAE over the per-token rewards, whitened advantages, returns as the critic's targets."""
    # GAE runs over response positions only; masked positions contribute nothing and the recursion stops at the
    # mask's end, so the response need not be shifted to column 0.
    adv, returns = gae(x.rewards, x.values * x.mask, x.mask, x.gamma, x.lam)
    return (whiten(adv, x.mask) if x.whiten else adv), returns


def _group_returns(x: AdvantageInputs) -> torch.Tensor:
    """[G, K]: each sequence's return (score - kl_coef * its summed KL) in its prompt's group of K."""
    k = x.samples_per_prompt
    if k < 2:
        raise ValueError(f"group advantages need >= 2 samples per prompt, got {k}")
    return (x.scores - x.kl_coef * (x.kl * x.mask).sum(-1)).view(-1, k)


def _on_tokens(group_advantages: torch.Tensor, x: AdvantageInputs) -> torch.Tensor:
    """A sequence's advantage on every one of its response tokens."""
    return group_advantages.reshape(-1)[:, None] * x.mask


@register_advantage("grpo", min_samples_per_prompt=2)
def grpo_advantages(x: AdvantageInputs):
    """GRPO, critic-free: (r - group mean) / (group std + eps); Dr. GRPO without the std (ppo.group_std false)."""
    returns = _group_returns(x)
    centered = returns - returns.mean(-1, keepdim=True)
    # std with Bessel's correction, as TRL and verl compute it
    return _on_tokens(centered / (returns.std(-1, keepdim=True) + x.eps) if x.scale_by_std else centered, x), None


@register_advantage("rloo", min_samples_per_prompt=2)
def rloo_advantages(x: AdvantageInputs):
    """RLOO, critic-free: r minus the mean of the other K - 1 samples of its prompt = K / (K - 1) (r - mean)."""
    returns = _group_returns(x)
    k = returns.shape[-1]
    return _on_tokens((returns - returns.mean(-1, keepdim=True)) * (k / (k - 1)), x), None


def group_token_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, samples_per_prompt: int,
                           method: str, scale_by_std: bool, kl_coef: float) -> torch.Tensor:
    """Critic-free advantages [B, L-1] of the estimator `method` for rows that come in groups of
    `samples_per_prompt` consecutive samples of one prompt: each sequence's KL-shaped return against its group,
    the same on every response token. A group whose samples all score the same gets 0: it carries no signal."""
    x = AdvantageInputs(scores, kl, mask, kl_coef, samples_per_prompt=samples_per_prompt, scale_by_std=scale_by_std)
    return _critic_free(method).fn(x)[0]


def group_advantages(scores: torch.Tensor, method: str, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The critic-free estimator `method` on group scores [G, K] -> [G, K] (one token per sample, no KL)."""
    g, k = scores.shape
    ones = torch.ones(g * k, 1, dtype=scores.dtype)
    x = AdvantageInputs(scores.reshape(-1), torch.zeros_like(ones), ones, samples_per_prompt=k,
                        scale_by_std=scale_by_std, eps=eps)
    return _critic_free(method).fn(x)[0].view(g, k)


def _critic_free(method: str) -> AdvantageEstimator:
    found = estimator(method)
    if found.needs_critic:
        raise ValueError(f"advantage estimator {method!r} needs a critic, not a group of samples")
    return found


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    fn: Callable  # (logp, old_logp, advantages, mask, ppo settings, token weights) -> (loss, clip fraction)
    summary: str


POLICY_LOSSES: Registry = Registry("policy loss")


def register_policy_loss(name: str):
    """Registers `fn` as `ppo.policy_loss: <name>`, with the one signature
    `fn(logp [B, L-1], old_logp, advantages, mask, ppo settings, weights) -> (scalar loss, fraction of tokens
    clipped)`, `weights` [B, L-1] the truncated importance weights of each token (losses.truncated_importance_weights;
    all 1 without a correction) that multiply its loss."""
    def register(fn):
        POLICY_LOSSES.add(name, PolicyLoss(name, fn, _summary(fn)))
        return fn
    return register


def policy_loss(name: str) -> PolicyLoss:
    return POLICY_LOSSES.find(name)


@register_policy_loss("clip")
def clipped_surrogate(logp, old_logp, advantages, mask, ppo, weights=None):
    """PPO's clipped surrogate (ratio clipped to 1 +- ppo.clip), the mean over response tokens."""
    return clipped_policy_loss(logp, old_logp, advantages, mask, ppo.clip, weights)
