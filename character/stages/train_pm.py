"""Stage `train-pm`: a preference model (sequence classifier, one logit) trained on the soft-labelled
pairs with a Bradley-Terry loss, by Ray Train workers each running a DeepSpeed ZeRO engine.

Checkpoints (DeepSpeed's own: weights, optimizer, step, guard counters, RNG) go through
`ray.train.report`; `FailureConfig` restarts lost workers from the latest one, and rerunning the stage
with the same run directory resumes from it. The data position is the step (see pm_data).
"""
from __future__ import annotations

import math
from collections import defaultdict

from character import schemas
from character.config import Config, check_stage_config
from character.runtime import StageResult, Timer, init_ray, skip_or_reset, write_resolved_config
from character.store import StageOutput, require_complete

STAGE = "pm"


def pm_metrics(r_chosen: list[float], r_rejected: list[float], p: list[float], traits: list[str],
               margin: float, bins: int) -> dict:
    """Held-out loss, accuracy, mean reward margin, per-trait accuracy and calibration (accuracy by
    confidence bucket, confidence = sigma(|r_c - r_r|) in [0.5, 1])."""
    import torch

    from character.losses import bradley_terry_loss

    rc, rr, pp = (torch.tensor(x, dtype=torch.float64) for x in (r_chosen, r_rejected, p))
    delta = rc - rr
    correct = (delta > 0).tolist()
    per_trait: dict[str, list[int]] = defaultdict(list)
    for t, c in zip(traits, correct):
        per_trait[t].append(c)
    buckets = [{"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "n": 0, "correct": 0}
               for b in range(bins)]
    for d, c in zip(delta.tolist(), correct):
        conf = 1.0 / (1.0 + math.exp(-abs(d)))
        b = buckets[min(int((conf - 0.5) * 2 * bins), bins - 1)]
        b["n"] += 1
        b["correct"] += c
    for b in buckets:
        b["accuracy"] = b["correct"] / b["n"] if b["n"] else None
    return {
        "eval_loss": float(bradley_terry_loss(rc, rr, pp, margin)) if len(p) else float("nan"),
        "eval_accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "eval_mean_margin": float(delta.mean()) if len(p) else float("nan"),
        "eval_pairs": len(p),
        "per_trait_accuracy": {t: sum(v) / len(v) for t, v in sorted(per_trait.items())},
        "calibration": buckets,
    }


def _load_pairs(output_dir: str, eval_fraction: float):
    """Training and validation pairs, both from the `train` split's messages (rank only ever sees those),
    divided by message (character/splits.py); unusable pairs set aside with a reason."""
    from character.pm_data import validate_pairs
    from character.splits import pm_validation

    rows = StageOutput(output_dir, "preferences").read(schema=schemas.PREFERENCES).to_pylist()
    good, bad = validate_pairs(rows)
    train = [r for r in good if not pm_validation(r["message_id"], eval_fraction)]
    held = [r for r in good if pm_validation(r["message_id"], eval_fraction)]
    return train, held, bad


def check_pairs(train: list[dict], held: list[dict], bad: list[dict], preferences: StageOutput,
                eval_fraction: float) -> None:
    """Enough pairs to train and to validate on, checked before Ray starts, naming the upstream cause."""
    from collections import Counter

    from character.runtime import StageInputError, format_counts, upstream_cause

    unusable = format_counts(Counter(r["reason"] for r in bad), "")
    if not train and not held:
        raise StageInputError(f"train-pm: 0 usable preference pairs; {upstream_cause(preferences)}"
                              + (f"; unusable pairs: {unusable}" if unusable else ""))
    if not train or not held:
        messages = len({r["message_id"] for r in train + held})
        raise StageInputError(
            f"train-pm: {len(train) + len(held)} pairs from {messages} messages split (by message, pm.eval_fraction="
            f"{eval_fraction}) into {len(train)} training and {len(held)} validation pairs: each side needs at least "
            f"one; synthesize more messages (synthesize.messages_per_trait) or change pm.eval_fraction")


def _rewards(engine, tokenizer, rows, side: str, max_length: int):
    from character.scoring import pm_rewards

    return pm_rewards(engine, tokenizer, [r["prompt"] for r in rows], [r[side] for r in rows], max_length)


def _evaluate(engine, tokenizer, held, cfg, rank, world) -> dict:
    """Every rank scores an equal-sized shard (ZeRO-3 forwards are collectives), results all-gathered."""
    import torch
    import torch.distributed as dist

    per_rank = math.ceil(len(held) / world) if held else 0
    mine = [held[min(i, len(held) - 1)] for i in range(rank * per_rank, (rank + 1) * per_rank)] if held else []
    results = []
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, cfg.micro_batch_size):
            chunk = mine[start : start + cfg.micro_batch_size]
            rc = _rewards(engine, tokenizer, chunk, "chosen", cfg.max_length).tolist()
            rr = _rewards(engine, tokenizer, chunk, "rejected", cfg.max_length).tolist()
            results += [(rank * per_rank + start + k, a, b) for k, (a, b) in enumerate(zip(rc, rr))]
    engine.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    by_index = {i: (a, b) for part in gathered for i, a, b in part if i < len(held)}
    order = sorted(by_index)
    return pm_metrics([by_index[i][0] for i in order], [by_index[i][1] for i in order],
                      [held[i]["p_chosen"] for i in order], [held[i]["trait"] for i in order],
                      cfg.margin, cfg.calibration_bins)


def train_loop(loop_config: dict) -> None:
    import deepspeed
    import numpy as np
    import ray.train
    import torch
    from transformers import AutoModelForSequenceClassification

    from character import lora, pm_data
    from character.losses import bradley_terry_loss
    from character.models import load_tokenizer, resolve_model
    from character.train_common import (NonFiniteGuard, StepClock, accumulation_step, adamw, build_under_zero,
                                        deepspeed_config, full_state_dict, maybe_inject_fault,
                                        plain_model_construction, restore, restore_rng, rng_states,
                                        save_and_report, setup_distributed, tensorboard_writer)

    config = Config.model_validate(loop_config["config"])
    cfg, seed = config.pm, config.run.seed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_distributed(config.train.use_gpu)
    torch.manual_seed(seed)
    base = cfg.base_model or config.model.name
    tokenizer = load_tokenizer(base)
    train, held, _ = _load_pairs(config.run.output_dir, cfg.eval_fraction)
    ds = deepspeed_config(config.train, cfg.micro_batch_size, cfg.grad_accum, world, config.train_dtype)
    model = lora.wrap(build_under_zero(lambda: AutoModelForSequenceClassification.from_pretrained(
        resolve_model(base), num_labels=1, pad_token_id=tokenizer.pad_token_id,
        dtype=getattr(torch, config.train_dtype)), ds), config.train.lora, "pm")
    optimizer = adamw(lora.trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    engine.train()  # from_pretrained returns eval mode: LoRA dropout would apply only after the first evaluation

    state = restore({"pm": engine}) or {"step": 0, "position": 0, "guard": [0, 0], "last_metrics": {}}
    resumed_from = state["step"] or None
    restore_rng(state)
    guard = NonFiniteGuard(cfg.max_nonfinite_in_row, *state["guard"])
    n, micro, accum = len(train), cfg.micro_batch_size, cfg.grad_accum
    end = n * cfg.epochs
    total = state["step"] + pm_data.steps_left(n, state["position"], end, world, micro, accum)
    total = min(total, cfg.max_steps or total)
    writer = tensorboard_writer(config, STAGE) if rank == 0 else None
    metrics, position = state["last_metrics"], state["position"]
    clock = StepClock("train-pm step", state["step"], total, rank == 0)
    for step in range(state["step"], total):
        maybe_inject_fault(config, step)
        epoch, start, size = pm_data.step_slice(n, position, world, micro, accum)
        order = pm_data.epoch_order(n, epoch, seed)

        def micro_loss(m: int):
            picked = pm_data.micro_batch_indices(order, start, size, m, rank, world, micro)
            # A short last step can leave this rank nothing: it still runs a (zero-weight) pass, because
            # every rank must take part in every backward (ZeRO's collectives).
            rows = [train[i] for i in picked] or [train[order[start]]]
            rc = _rewards(engine, tokenizer, rows, "chosen", cfg.max_length)
            rr = _rewards(engine, tokenizer, rows, "rejected", cfg.max_length)
            p = torch.tensor([r["p_chosen"] for r in rows], dtype=torch.float32)
            loss = bradley_terry_loss(rc, rr, p, cfg.margin)
            return [loss if picked else loss * 0.0]

        losses, applied = accumulation_step([engine], micro_loss, accum)
        guard.update(applied, step, "loss or gradient norm")
        losses = [x[0] for x in losses]
        position += size
        done = step + 1
        if writer and losses:
            writer.add_scalar("pm/train_loss", float(np.mean(losses)), done)
        clock.tick(done, f"loss {np.mean(losses):.4f}" if applied else "skipped (not finite)")
        if done % config.train.checkpoint_every == 0 or done == total:
            if cfg.eval_every == 0 or done == total:
                metrics = _evaluate(engine, tokenizer, held, cfg, rank, world)
            client = {"step": done, "position": position, "guard": [guard.in_row, guard.total],
                      "last_metrics": metrics, "rng": rng_states()}
            report = {"step": done, "train_loss": float(np.mean(losses)) if applied else float("nan"),
                      "skipped_steps": guard.total, **{k: v for k, v in metrics.items() if isinstance(v, float)}}
            save_and_report({"pm": engine}, client, report)
            if writer:
                for k, v in report.items():
                    writer.add_scalar(f"pm/{k}", v, done)
        elif cfg.eval_every and done % cfg.eval_every == 0:
            metrics = _evaluate(engine, tokenizer, held, cfg, rank, world)

    weights = full_state_dict(engine)
    plain_model_construction()
    if rank == 0:
        _export(config, model, weights, tokenizer, {**metrics, "steps": total, "skipped_steps": guard.total,
                                                     "resumed_from_step": resumed_from,
                                                     "examples_seen": position, "workers": world,
                                                     "resized_from_workers": state.get("resized_from"),
                                                     "train_pairs": len(train), "eval_pairs_total": len(held),
                                                     **lora.parameter_counts(model)})
        if writer:
            writer.close()


def _export(config: Config, model, weights: dict, tokenizer, metrics: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + metrics.json into <run>/pm (local or object storage).
    With LoRA, the adapter too (pm/adapter/); the merged model is always written, since PPO and evaluate
    score with it."""
    from transformers import AutoModelForSequenceClassification

    from character import lora

    lora.export("pm", config.train.lora, AutoModelForSequenceClassification, model.config, weights, tokenizer,
                StageOutput(config.run.output_dir, STAGE).uri, config.pm.base_model or config.model.name,
                merged=True, files={"metrics.json": metrics})


def run(config: Config, force: bool = False) -> StageResult:
    out = StageOutput(config.run.output_dir, STAGE)
    if (skipped := skip_or_reset(out, force)) is not None:
        return skipped
    check_stage_config(config, "train-pm")
    preferences = StageOutput(config.run.output_dir, "preferences")
    require_complete(preferences, "train-pm", schemas.PREFERENCES)
    train, held, bad = _load_pairs(config.run.output_dir, config.pm.eval_fraction)
    check_pairs(train, held, bad, preferences, config.pm.eval_fraction)
    from character.train_common import check_resume_settings, trainer_for

    check_resume_settings(config, STAGE)
    write_resolved_config(config)
    init_ray(config.ray)

    result = StageResult(STAGE, out.uri, rows_in=len(train) + len(held) + len(bad))
    with Timer() as timer:
        trainer_for(config, train_loop, {"config": config.model_dump(mode="json")}, STAGE).fit()
    metrics = out.read_json("metrics.json")
    result.seconds = timer.seconds
    result.rows_out = len(train)
    result.drops.update(r["reason"] for r in bad)
    result.extra = {k: metrics.get(k) for k in ("eval_loss", "eval_accuracy", "eval_mean_margin", "steps",
                                                "skipped_steps")}
    out.mark_success(result.summary())
    print(f"[train-pm] held-out accuracy {metrics['eval_accuracy']:.3f}, loss {metrics['eval_loss']:.4f}, "
          f"mean margin {metrics['eval_mean_margin']:.3f} over {metrics['eval_pairs']} pairs; "
          f"per trait {metrics['per_trait_accuracy']}", flush=True)
    return result
