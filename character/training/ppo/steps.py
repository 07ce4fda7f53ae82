"""The model side of one PPO iteration, for character/training/ppo/loop.py: the DeepSpeed engines (policy, critic,
reference; LoRA or full), the scoring forwards (log-probabilities, values, rewards, advantages: GAE with the
critic, or the group baseline of GRPO / RLOO without one) and the clipped updates over minibatches with
gradient accumulation."""
from __future__ import annotations

import numpy as np

from character.core.config import Config
from character.core.store import StageOutput
from character.models import lora
from character.models.loading import resolve_model
from character.models.lora import adapter_disabled
from character.training.deepspeed_setup import (adamw, build_trainable, build_under_zero, deepspeed_config,
                                                frozen_engine, trainable_policy)
from character.training.estimators import AdvantageInputs, estimator, policy_loss, uses_critic
from character.training.losses import (clipped_value_loss, kl_per_token, masked_mean, truncated_importance_weights,
                                       zero_variance_groups)
from character.training.ppo import rollouts as ppo
from character.training.scoring import SequenceScorer
from character.training.stepping import accumulation_step, eval_mode


def build_models(config: Config, world: int):
    """Policy and critic (trained), reference (frozen) as DeepSpeed engines; the sequence scorer. No critic
    (None) for a critic-free estimator (ppo.advantage grpo / rloo: character/training/estimators.py).

    With train.lora the policy and the critic are peft models, each on its own frozen base: the critic's
    base is the PM (ppo.critic_init: pm), whose weights are not the policy's, so one shared base would
    fit only critic_init: policy, and would tie both into one DeepSpeed engine (one optimizer, one learning
    rate, one ZeRO partitioning). The reference is the policy with its adapter disabled: no second copy."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, dtype = config.ppo, getattr(torch, config.train_dtype)
    micro = min(cfg.forward_batch_size, cfg.minibatch_size)
    ds = deepspeed_config(config.train, micro, cfg.minibatch_size // micro, world, config.train_dtype)
    base = resolve_model(config.start_model)  # sft/ with policy.sft: the policy, its reference and critic start there
    adapters = config.train.lora
    policy, policy_model = trainable_policy(config.start_model, config.train, ds, config.train_dtype, lr=cfg.lr)
    critic = build_critic(config, ds, base) if uses_critic(cfg) else None
    reference = None if adapters.enabled else frozen_engine(
        build_under_zero(lambda: AutoModelForCausalLM.from_pretrained(base, dtype=dtype), ds), ds)
    scorer = SequenceScorer(config, build=lambda factory: frozen_engine(build_under_zero(factory, ds), ds))
    return policy, critic, reference, scorer, policy_model, micro


def build_critic(config: Config, ds: dict, base: str):
    from transformers import AutoConfig, AutoModelForTokenClassification

    cfg, adapters = config.ppo, config.train.lora
    critic_src = resolve_model(StageOutput(config.run.output_dir, "pm").path()) if cfg.critic_init == "pm" else base
    critic_config = AutoConfig.from_pretrained(critic_src, num_labels=1)
    # No dropout in the value head (HF's token classifiers default to 0.1): the values of the clipped value
    # loss would otherwise be noisy copies of the scoring pass's `old_values`.
    critic_config.classifier_dropout = 0.0
    critic, _ = build_trainable(lambda torch_dtype: lora.wrap(build_under_zero(
        lambda: AutoModelForTokenClassification.from_pretrained(critic_src, config=critic_config, dtype=torch_dtype),
        ds), adapters, "critic"), ds, config.train_dtype, lambda model: adamw(lora.trainable(model), lr=cfg.critic_lr))
    return critic


def logprobs(engine, roll, cfg, with_entropy: bool = False):
    """Taken-token log-probs (and entropy) of the rollouts, `forward_batch_size` sequences per forward."""
    return ppo.forward_in_batches(
        engine, roll.input_ids, roll.attention_mask, cfg.forward_batch_size,
        lambda out, ids: ppo.logprobs_and_entropy(out.logits, ids, cfg.logits_chunk, with_entropy))


def reference_logprobs(policy, reference, roll, cfg):
    """The reference model's log-probs: its own engine, or (LoRA) the policy with its adapter disabled."""
    if reference is not None:
        return logprobs(reference, roll, cfg)[0]
    with adapter_disabled(policy):
        return logprobs(policy, roll, cfg)[0]


def values(engine, roll, cfg):
    return ppo.forward_in_batches(engine, roll.input_ids, roll.attention_mask, cfg.forward_batch_size,
                                  lambda out, ids: out.logits.squeeze(-1)[:, :-1].float())


def score(models, roll, batch, outs, pad, beta, cfg):
    """Rewards, advantages and the statistics of one rollout batch (no gradients). Rows come in groups of
    `cfg.samples_per_prompt` samples of one prompt. Returns (old log-probs, reference log-probs, old values,
    advantages, returns, truncated importance weights, scores, stats); values and returns are None without a
    critic. The stats hold `behaviour_gap_sum` and `behaviour_tokens` (|engine - trainer| log-prob summed over
    the response tokens whose engine log-prob is known, and their count) for the caller to reduce over ranks."""
    import torch

    policy, critic, reference, scorer = models
    scores = scorer(batch, [o["text"] for o in outs], [o["finish_reason"] for o in outs])
    real = torch.tensor([0.0 if p else 1.0 for p in pad])
    roll.mask = roll.mask * real[:, None]  # padding rows weigh nothing: no reward, KL, advantage or loss
    with torch.no_grad(), eval_mode(*[m for m in (policy, critic) if m is not None]):
        old_logp, entropy = logprobs(policy, roll, cfg, with_entropy=True)
        ref_logp = reference_logprobs(policy, reference, roll, cfg)
        old_values = values(critic, roll, cfg) if critic is not None else None
    reward_beta = beta if cfg.kl_penalty == "reward" else 0.0  # "loss": the KL enters the policy loss instead
    rewards, kl = ppo.shaped_rewards(scores * real, old_logp, ref_logp, roll.mask, reward_beta, cfg.kl)
    n_real = float(real.sum())
    behaviour = roll.behaviour_logp if roll.behaviour_logp is not None else torch.full_like(old_logp, float("nan"))
    tis_weights, tis_clipped = truncated_importance_weights(old_logp, behaviour, roll.mask, cfg.tis_cap)
    known = roll.mask * (~torch.isnan(behaviour)).float()
    stats = {"reward": float((scores * real).sum()) / max(n_real, 1.0),
             "kl": float((kl.sum(-1) * real).sum()) / max(n_real, 1.0),
             "entropy": float(masked_mean(entropy, roll.mask)), "tis_clipped_frac": float(tis_clipped),
             "behaviour_gap_sum": float(((old_logp - torch.nan_to_num(behaviour)).abs() * known).sum()),
             "behaviour_tokens": float(known.sum())}
    chosen = estimator(cfg.advantage)
    adv, returns = chosen.fn(AdvantageInputs(
        scores * real, kl, roll.mask, reward_beta, rewards=rewards, values=old_values,
        samples_per_prompt=cfg.samples_per_prompt, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages,
        scale_by_std=cfg.group_std))
    if not chosen.needs_critic:
        k = cfg.samples_per_prompt
        real_groups = real.view(-1, k)[:, 0] > 0
        flat = zero_variance_groups(scores.view(-1, k))
        stats["zero_variance_groups"] = float(flat[real_groups].float().mean()) if bool(real_groups.any()) else 0.0
    return old_logp, ref_logp, old_values, adv, returns, tis_weights, scores, stats


def train(policy, critic, roll, old, beta, cfg, seed: int, iteration: int, micro: int):
    """`ppo_epochs` passes over the batch in minibatches; each minibatch is one optimizer step of the policy (and the
    critic, if any), its `micro`-sequence pieces accumulated (stepping.accumulation_step skips the whole step on
    every rank if any piece's loss is not finite). `old`: (log-probs, reference log-probs, values, advantages,
    returns, truncated importance weights) from `score`. With ppo.kl_penalty "loss", beta times the KL to the
    reference (ppo.kl: k3 unless kl_estimator says otherwise; GRPO's choice, as k3 is >= 0 and its gradient
    points towards the reference, while k1's has expectation zero) joins the policy loss. Returns the losses and
    the number of skipped steps."""
    import torch

    old_logp, ref_logp, old_values, adv, returns, tis_weights = old
    n, accum = roll.input_ids.shape[0], cfg.minibatch_size // micro
    kl_loss = cfg.kl_penalty == "loss"
    names = ["policy_loss"] + (["value_loss"] if critic is not None else [])
    stats: dict[str, list[float]] = {name: [] for name in names + ["clip_frac"] + (["kl_loss"] if kl_loss else [])}
    engines = [policy] + ([critic] if critic is not None else [])
    skipped = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + iteration))
        for start in range(0, n, cfg.minibatch_size):
            minibatch = perm[start : start + cfg.minibatch_size]

            def micro_losses(m: int):
                idx = minibatch[m * micro : (m + 1) * micro]
                # A short last minibatch still runs `accum` passes (DeepSpeed counts them), the missing
                # ones as zero-weight repeats of its first row.
                weight = 1.0 if len(idx) else 0.0
                idx = idx if len(idx) else minibatch[:1]
                sub = ppo.Rollouts(roll.input_ids[idx], roll.attention_mask[idx], roll.mask[idx], [])
                logp, _ = logprobs(policy, sub, cfg)
                pg_loss, clip_frac = policy_loss(cfg.policy_loss).fn(logp, old_logp[idx], adv[idx], sub.mask, cfg,
                                                                tis_weights[idx])
                stats["clip_frac"].append(float(clip_frac))
                if kl_loss:
                    kl = masked_mean(kl_per_token(logp, ref_logp[idx], cfg.kl), sub.mask)
                    stats["kl_loss"].append(float(kl))
                    pg_loss = pg_loss + beta * kl
                out = [pg_loss * weight]
                if critic is not None:
                    out.append(clipped_value_loss(values(critic, sub, cfg), old_values[idx], returns[idx], sub.mask,
                                                  cfg.value_clip) * weight)
                return out

            losses, applied = accumulation_step(engines, micro_losses, accum)
            skipped += not applied
            for k, name in enumerate(names):
                stats[name] += [x[k] for x in losses]
    return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}, skipped
