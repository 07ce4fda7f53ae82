"""The PPO training loop run by every Ray Train worker (see stages/train_ppo.py for the stage)."""
from __future__ import annotations

import json
import os

import numpy as np


def _metrics_path(config) -> str:
    from character.store import StageOutput

    return StageOutput(config.run.output_dir, "policy").path("metrics.jsonl")


def _truncate_metrics(path: str, iteration: int) -> None:
    """A resumed run drops lines logged after its checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    lines = [x for x in open(path) if x.strip() and json.loads(x)["iteration"] <= iteration]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def _mean_all(values: dict) -> dict:
    """Average scalar metrics over ranks."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def ppo_loop(loop_config: dict) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from character import ppo
    from character.config import Config
    from character.losses import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss,
                                  explained_variance, masked_mean)
    from character.models import load_tokenizer, resolve_model
    from character.pm_data import chat_prefix
    from character.rollout import arrays_for_engines
    from character.stages.train_ppo import STAGE, Scorer, _export, _frozen, iteration_seeds, load_prompts, now
    from character.store import StageOutput
    from character.train_common import (NonFiniteGuard, StepClock, all_agree, build_under_zero, deepspeed_config,
                                        full_state_dict, is_finite, plain_model_construction, maybe_inject_fault, restore, save_and_report,
                                        setup_distributed, tensorboard_writer)

    config = Config.model_validate(loop_config["config"])
    engines = loop_config["engines"]
    cfg, seed = config.ppo, config.run.seed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_distributed(config.train.use_gpu)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(config.model.name)
    base = resolve_model(config.model.name)
    train, held = load_prompts(config)
    ds = deepspeed_config(config.train, cfg.minibatch_size, 1, world)

    policy_model = build_under_zero(lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ds)
    tie = bool(policy_model.config.tie_word_embeddings)
    policy, *_ = deepspeed.initialize(model=policy_model, config=ds,
                                      optimizer=torch.optim.AdamW(policy_model.parameters(), lr=cfg.lr))
    critic_src = StageOutput(config.run.output_dir, "pm").path() if cfg.critic_init == "pm" else base
    critic_model = build_under_zero(lambda: AutoModelForTokenClassification.from_pretrained(
        critic_src, num_labels=1, dtype=torch.float32), ds)
    critic, *_ = deepspeed.initialize(model=critic_model, config=ds,
                                      optimizer=torch.optim.AdamW(critic_model.parameters(), lr=cfg.critic_lr))
    reference = _frozen(build_under_zero(lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         ds), ds)
    scorer = Scorer(config, tokenizer, ds)

    state = restore({"policy": policy, "critic": critic}) or {"iteration": 0, "kl_coef": cfg.kl_coef, "guard": [0, 0]}
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    kl_ctl = AdaptiveKLController(state["kl_coef"], cfg.kl_target, cfg.kl_horizon)
    guard = NonFiniteGuard(cfg.max_nonfinite_in_row, *state["guard"])
    engine = engines[rank % len(engines)]
    metrics_path = _metrics_path(config)
    writer = tensorboard_writer(config, STAGE) if rank == 0 else None
    if rank == 0:
        os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
        _truncate_metrics(metrics_path, state["iteration"])

    def prompt_ids(rows):
        return [chat_prefix(tokenizer, r["text"])[-cfg.max_prompt_tokens:] for r in rows]

    def sync(version: int) -> float:
        """Full policy weights (ZeRO-3 gathered) into every vLLM engine, in place (character/rollout.py)."""
        start = now()
        weights = full_state_dict(policy, keep=rank == 0, copy=False)
        if rank == 0:
            ref = ray.put(arrays_for_engines(weights, tie))  # the one copy: into the object store
            ray.get([e.update_weights.remote(ref, tie, version) for e in engines])
            del ref, weights
        dist.barrier()
        return now() - start

    def evaluate(iteration: int) -> float:
        rows = held[: cfg.eval_prompts]
        mine = rows[rank::world]
        outs = ray.get(engine.generate.remote(prompt_ids(mine), iteration_seeds(mine, -1, seed),
                                              cfg.sampling.model_dump())) if mine else []
        scores = scorer([r["text"] for r in mine], [o["text"] for o in outs], [o["finish_reason"] for o in outs]) \
            if mine else torch.zeros(0)
        total = torch.tensor([float(scores.sum()), float(len(mine))], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total[0] / total[1])

    resumed_from = state["iteration"] if state["iteration"] > 0 else None
    if resumed_from:
        sync(resumed_from)  # engines may hold base or newer weights after a restart
    if state["iteration"] == 0:
        first_eval = evaluate(0)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"iteration": 0, "eval_reward": first_eval}) + "\n")

    per_rank = cfg.prompts_per_iteration // world
    clock = StepClock("train-ppo iteration", state["iteration"], cfg.iterations, rank == 0)
    for iteration in range(state["iteration"], cfg.iterations):
        maybe_inject_fault(config, iteration)
        t0 = now()
        epoch, offset = divmod(iteration * cfg.prompts_per_iteration, len(train))
        order = np.random.default_rng([seed, epoch]).permutation(len(train)).tolist()
        # Equal shares on every rank (ZeRO's collectives need the same number of steps everywhere).
        batch = [train[order[(offset + k) % len(train)]] for k in range(per_rank * world)][rank::world]
        prompts = prompt_ids(batch)
        outs = ray.get(engine.generate.remote(prompts, iteration_seeds(batch, iteration, seed),
                                              cfg.sampling.model_dump()))
        responses = [o["token_ids"] or [tokenizer.eos_token_id] for o in outs]
        t_gen = now() - t0

        t1 = now()
        roll = ppo.build_rollouts(prompts, responses, tokenizer.pad_token_id)
        scores = scorer([r["text"] for r in batch], [o["text"] for o in outs], [o["finish_reason"] for o in outs])
        with torch.no_grad():
            old_logp, logits = ppo.policy_forward(policy, roll)
            ref_logp, _ = ppo.policy_forward(reference, roll)
            old_values = ppo.value_forward(critic, roll)
            entropy = masked_mean(ppo.token_entropy(logits), roll.mask)
        rewards, kl = ppo.shaped_rewards(scores, old_logp, ref_logp, roll.mask, kl_ctl.beta, cfg.kl_estimator)
        adv, returns = ppo.advantages_and_returns(rewards, old_values, roll.mask, cfg.gamma, cfg.lam,
                                                  cfg.whiten_advantages)
        kl_mean = float((kl.sum(-1)).mean())
        t_score = now() - t1

        t2 = now()
        ok = all_agree(bool(torch.isfinite(scores).all() and torch.isfinite(adv).all() and is_finite(kl_mean)))
        stats = {"policy_loss": [], "value_loss": [], "clip_frac": []}
        if guard.update(ok, iteration, "reward, KL or advantage"):
            for _ in range(cfg.ppo_epochs):
                perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed + iteration))
                for start in range(0, len(batch), cfg.minibatch_size):
                    idx = perm[start : start + cfg.minibatch_size]
                    sub = ppo.Rollouts(roll.input_ids[idx], roll.attention_mask[idx], roll.mask[idx], [])
                    logp, _ = ppo.policy_forward(policy, sub)
                    pg_loss, clip_frac = clipped_policy_loss(logp, old_logp[idx], adv[idx], sub.mask, cfg.clip)
                    values = ppo.value_forward(critic, sub)
                    v_loss = clipped_value_loss(values, old_values[idx], returns[idx], sub.mask, cfg.value_clip)
                    if not guard.update(all_agree(is_finite(pg_loss) and is_finite(v_loss)), iteration, "PPO loss"):
                        continue
                    policy.backward(pg_loss)
                    policy.step()
                    critic.backward(v_loss)
                    critic.step()
                    stats["policy_loss"].append(float(pg_loss))
                    stats["value_loss"].append(float(v_loss))
                    stats["clip_frac"].append(float(clip_frac))
        t_train = now() - t2
        t_sync = sync(iteration + 1)
        kl_ctl.update(kl_mean, cfg.prompts_per_iteration)

        done = iteration + 1
        local = {"reward": float(scores.mean()), "kl": kl_mean, "entropy": float(entropy),
                 "response_length": float(np.mean([len(r) for r in responses])),
                 "truncated": float(np.mean([o["finish_reason"] == "length" for o in outs])),
                 "explained_variance": explained_variance(old_values, returns, roll.mask),
                 **{k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}}
        record = {"iteration": done, "kl_coef": kl_ctl.beta, "skipped": guard.total, **_mean_all(local),
                  "time_generation": t_gen, "time_scoring": t_score, "time_training": t_train, "time_sync": t_sync}
        if resumed_from is not None and iteration == resumed_from:
            record["resumed_from"] = resumed_from
        if done % cfg.eval_every == 0 or done == cfg.iterations:
            record["eval_reward"] = evaluate(done)
        clock.tick(done, f"reward {record['reward']:.3f}, KL {record['kl']:.3f}"
                   + (f", held-out reward {record['eval_reward']:.3f}" if "eval_reward" in record else ""))
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer:
                for k, v in record.items():
                    if k != "iteration":
                        writer.add_scalar(f"ppo/{k}", v, done)
        if done % config.train.checkpoint_every == 0 or done == cfg.iterations:
            save_and_report({"policy": policy, "critic": critic},
                            {"iteration": done, "kl_coef": kl_ctl.beta, "guard": [guard.in_row, guard.total],
                             "rng": torch.get_rng_state()},
                            {k: v for k, v in record.items() if isinstance(v, (int, float))})

    weights = full_state_dict(policy)
    plain_model_construction()
    if rank == 0:
        _export(config, weights, policy_model.config, tokenizer)
        if writer:
            writer.close()
