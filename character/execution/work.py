"""How much work each stage of `character run` is, in vLLM token passes, from the config alone: the progress
estimate (character/tracking/progress.py turns it into time left, calibrated on the run itself).

One prompt token through vLLM's forward pass is 1, a generated token 2 (decoding runs at about half the
efficiency of a prefill on CPU, benchmarks/generation.py), a token through a Hugging Face forward pass (PPO
scoring) 2 and a training token 8: forward + backward + AdamW in fp32 under DeepSpeed, with the Ray Train workers
sharing the cores, ran at about 3x the seconds of vLLM's 3 passes in the main job here (2026-12-01: 1.4-1.8 ms per
vLLM pass in the generating stages, 4.3 in train-pm). A rough guide, not a promise: it is only as good as the
guesses below about how many messages survive filtering.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

from character.core.config import Config
from character.reporting.capability import capability_items
from character.training.estimators import uses_critic

PROMPT_TOKENS = 130  # a chat prompt with a system prompt, a typical synthesis or respond prompt here
KEEP = 0.7  # share of synthesised messages kept (configs/small.yaml on SmolLM2-135M: 0.66)
HF_FORWARD = 2.0  # one token through a Hugging Face forward pass, in vLLM passes
TRAIN_PASS = 8.0  # one training token (forward + backward + optimizer step), in vLLM passes


@dataclass(frozen=True)
class RunSize:
    """What the work of a run scales with, before any stage has run."""

    n_traits: int
    n_seed_questions: int


def training_messages(config: Config, size: RunSize) -> float:
    """Messages of the `train` split: respond, rank and the pair-training stages see only these."""
    syn = config.synthesize
    seeds = size.n_seed_questions if syn.include_seed_questions else 0
    return (size.n_traits * syn.messages_per_trait * KEEP + seeds) * (1 - config.run.held_out_fraction)


def _pairs(config: Config, size: RunSize) -> float:
    k = config.respond.candidates
    return training_messages(config, size) * (1 if config.rank.pairs == "best_worst" else comb(k, 2))


def pair_tokens(cfg, pairs: float) -> float:
    """Tokens through a pair-training stage (train-pm, train-dpo): both sides of every training pair, once per
    epoch, sequences of about half their maximal length."""
    tokens = pairs * (1 - cfg.eval_fraction) * cfg.epochs * 2 * (cfg.max_length / 2)
    if cfg.max_steps:
        tokens = min(tokens, cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum * 2 * cfg.max_length / 2)
    return tokens


def synthesize(config: Config, size: RunSize) -> float:
    syn, ev = config.synthesize, config.evaluate
    return size.n_traits * (syn.messages_per_trait + ev.adversarial_per_trait) * (PROMPT_TOKENS + 2 * syn.sampling.max_tokens)


def respond(config: Config, size: RunSize) -> float:
    res = config.respond
    return training_messages(config, size) * (PROMPT_TOKENS + res.candidates * res.sampling.max_tokens * 2)


def rank(config: Config, size: RunSize) -> float:
    k, answer, messages = config.respond.candidates, config.respond.sampling.max_tokens, training_messages(config, size)
    if config.judge.kind == "contrast":
        return messages * k * (PROMPT_TOKENS // 2 + answer)  # one baseline prefill per candidate
    if config.judge.kind == "model":
        return messages * comb(k, 2) * 2 * (PROMPT_TOKENS + 2 * answer)  # both orders, two answers shown
    return 0.0


def train_sft(config: Config, size: RunSize) -> float:
    """Training passes over the SFT targets (one per training message, or every candidate with source all),
    each sequence about half its maximal length; with source revised, the critiques and revisions generated
    first (a prompt with the answer, then the new tokens, per round)."""
    sft, messages = config.sft, training_messages(config, size)
    examples = messages * (config.respond.candidates if sft.source == "all" else 1)
    tokens = examples * (1 - sft.eval_fraction) * sft.epochs * sft.max_length / 2
    if sft.max_steps:
        tokens = min(tokens, sft.max_steps * sft.micro_batch_size * sft.grad_accum * sft.max_length / 2)
    revising = 0.0
    if sft.source == "revised":
        rev = sft.revision
        per_round = 2 * (PROMPT_TOKENS + config.respond.sampling.max_tokens) + 2 * (
            rev.critique_sampling.max_tokens + rev.revision_sampling.max_tokens)
        revising = messages * rev.rounds * per_round
    held_out_nll = 2 * examples * sft.eval_fraction * sft.max_length / 2  # before and after
    return TRAIN_PASS * tokens + HF_FORWARD * held_out_nll + revising


def train_pm(config: Config, size: RunSize) -> float:
    return TRAIN_PASS * pair_tokens(config.pm, _pairs(config, size))


def train_dpo(config: Config, size: RunSize) -> float:
    """The policy's training passes, plus the reference's forward passes: once per pair (precomputed) or per
    training pass (a frozen reference engine)."""
    dpo, pairs = config.dpo, _pairs(config, size)
    reference = pairs * 2 * (dpo.max_length / 2) if dpo.precompute_reference else pair_tokens(dpo, pairs)
    return TRAIN_PASS * pair_tokens(dpo, pairs) + HF_FORWARD * reference


def train_ppo(config: Config, size: RunSize) -> float:
    """Per iteration: generation, scoring by policy, reference, critic and reward (4 forward passes; 3 without a
    critic), then per PPO epoch policy and critic training; held-out evaluations generate and score."""
    ppo = config.ppo
    samples = ppo.prompts_per_iteration * ppo.samples_per_prompt
    rollout = samples * (PROMPT_TOKENS + ppo.sampling.max_tokens)
    models = 2 if uses_critic(ppo) else 1
    per_iteration = rollout * ((2 + models) * HF_FORWARD + models * TRAIN_PASS * ppo.ppo_epochs)
    tokens = ppo.iterations * (samples * ppo.sampling.max_tokens * 2 + per_iteration)
    return tokens + (ppo.iterations // ppo.eval_every + 1) * ppo.eval_prompts * (ppo.sampling.max_tokens * 2 + PROMPT_TOKENS)


def evaluate(config: Config, size: RunSize) -> float:
    ev = config.evaluate
    models = 3 if config.policy.sft else 2
    answers = models * size.n_traits * (ev.max_messages_per_trait + ev.adversarial_per_trait) * ev.samples
    generations = answers * (PROMPT_TOKENS + ev.sampling.max_tokens * 2)
    scoring = answers * (PROMPT_TOKENS + ev.sampling.max_tokens) * 2  # reward model + judge
    ruler = answers * (size.n_traits + 1) * (PROMPT_TOKENS + ev.sampling.max_tokens)  # each trait + none
    items = len(capability_items()) if ev.capability else 0
    capability = models * items * (PROMPT_TOKENS + ev.capability_max_tokens * 2)
    return generations + scoring + ruler + capability


def nothing(config: Config, size: RunSize) -> float:
    return 0.0
