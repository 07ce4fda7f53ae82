"""Stage `train-pm`: a preference model (sequence classifier, one logit) trained on the soft-labelled
pairs with a Bradley-Terry loss, by Ray Train workers each running a DeepSpeed ZeRO engine.

The step loop, the pairs and the held-out metrics are shared with train-dpo (character/training/pairs.py).
Checkpoints (DeepSpeed's own: weights, optimizer, step, guard counters, RNG) go through
`ray.train.report`; `FailureConfig` restarts lost workers from the latest one, and rerunning the stage
with the same run directory resumes from it. The data position is the examples consumed (see pm_data).
"""
from __future__ import annotations

from character.core import schemas
from character.core.config import Config
from character.core.store import StageOutput
from character.execution.pair_stage import run_pair_stage
from character.execution.registry import spec_of
from character.execution.runtime import StageResult
from character.models import lora
from character.models.loading import load_tokenizer, resolve_model
from character.training.deepspeed_setup import (adamw, build_trainable, build_under_zero, deepspeed_config,
                                                full_state_dict, plain_model_construction, setup_distributed)
from character.training.losses import bradley_terry_loss
from character.training.pairs import PairTraining, gather_pair_scores, load_pairs, pair_metrics
from character.training.scoring import pm_rewards
from character.training.stepping import eval_mode

SPEC = spec_of(__name__)


def _rewards(engine, tokenizer, rows, side: str, max_length: int):
    return pm_rewards(engine, tokenizer, [r["prompt"] for r in rows], [r[side] for r in rows], max_length)


def _pair_rewards(engine, tokenizer, rows, cfg, rank, world) -> tuple[list, list]:
    """The PM's rewards of each pair's chosen and rejected response, scored on every rank's shard (a
    collective: every rank calls it), in the order of `rows`."""
    import torch

    def score(batch):
        return (_rewards(engine, tokenizer, batch, "chosen", cfg.max_length).tolist(),
                _rewards(engine, tokenizer, batch, "rejected", cfg.max_length).tolist())

    with torch.no_grad(), eval_mode(engine):
        return gather_pair_scores(rows, rank, world, cfg.micro_batch_size, score)


def _evaluate(engine, tokenizer, held, cfg, rank, world) -> dict:
    chosen, rejected = _pair_rewards(engine, tokenizer, held, cfg, rank, world)
    return pair_metrics(chosen, rejected, [r["p_chosen"] for r in held], [r["trait"] for r in held], cfg.margin,
                        cfg.calibration_bins)


def pair_scores_table(train: list[dict], held: list[dict], chosen: list[float], rejected: list[float]):
    """pm/pair_scores.parquet: the trained PM's rewards of every pair (`train + held` order)."""
    import pyarrow as pa

    rows = [{"pair_id": r["pair_id"], "message_id": r["message_id"], "trait": r["trait"],
             "role": "train" if n < len(train) else "validation", "chosen_reward": float(c),
             "rejected_reward": float(x)}
            for n, (r, c, x) in enumerate(zip(train + held, chosen, rejected))]
    return pa.Table.from_pylist(rows, schema=schemas.PM_PAIR_SCORES)


def train_loop(loop_config: dict) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    config = Config.model_validate(loop_config["config"])
    cfg, seed = config.pm, config.run.seed
    setup_distributed(config.train.use_gpu)
    torch.manual_seed(seed)
    base = cfg.base_model or config.start_model  # sft/ with policy.sft
    tokenizer = load_tokenizer(base)
    train, held, _ = load_pairs(config.run.output_dir, cfg.eval_fraction, loop_config.get("review_marks"),
                                cfg.pairs_per_message)
    world = torch.distributed.get_world_size()
    ds = deepspeed_config(config.train, cfg.micro_batch_size, cfg.grad_accum, world, config.train_dtype)
    engine, model = build_trainable(lambda torch_dtype: lora.wrap(build_under_zero(
        lambda: AutoModelForSequenceClassification.from_pretrained(
            resolve_model(base), num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch_dtype), ds),
        config.train.lora, "pm"), ds, config.train_dtype,
        lambda model: adamw(lora.trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay))
    training = PairTraining(config, cfg, {"pm": engine}, train, SPEC.output, loop_config.get("tracking"))

    def micro_loss(rows: list[dict]):
        rc = _rewards(engine, tokenizer, rows, "chosen", cfg.max_length)
        rr = _rewards(engine, tokenizer, rows, "rejected", cfg.max_length)
        p = torch.tensor([r["p_chosen"] for r in rows], dtype=torch.float32)
        return bradley_terry_loss(rc, rr, p, cfg.margin)

    summary = training.run(micro_loss, lambda: _evaluate(engine, tokenizer, held, cfg, training.rank, training.world))
    scores = _pair_rewards(engine, tokenizer, train + held, cfg, training.rank, training.world) if cfg.score_pairs else None
    weights = full_state_dict(engine, dtype=config.model.dtype)  # a collective: every rank
    plain_model_construction()
    if training.rank == 0:
        _export(config, model, weights, tokenizer, {**summary, "eval_pairs_total": len(held),
                                                    **lora.parameter_counts(model)})
        if scores is not None:
            StageOutput(config.run.output_dir, SPEC.output).write_table("pair_scores.parquet",
                                                                  pair_scores_table(train, held, *scores))


def _export(config: Config, model, weights: dict, tokenizer, metrics: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + metrics.json into <run>/pm (local or object storage).
    With LoRA, the adapter too (pm/adapter/); the merged model is always written, since PPO and evaluate
    score with it."""
    from transformers import AutoModelForSequenceClassification

    lora.export("pm", config.train.lora, AutoModelForSequenceClassification, model.config, weights, tokenizer,
                StageOutput(config.run.output_dir, SPEC.output).uri, config.pm.base_model or config.start_model,
                merged=True, files={"metrics.json": metrics})


def run(config: Config, force: bool = False) -> StageResult:
    result, metrics = run_pair_stage(config, SPEC, "pm", train_loop, force)
    if metrics is not None:
        print(f"[train-pm] held-out accuracy {metrics['eval_accuracy']:.3f}, loss {metrics['eval_loss']:.4f}, "
              f"mean margin {metrics['eval_mean_margin']:.3f} over {metrics['eval_pairs']} pairs; "
              f"per trait {metrics['per_trait_accuracy']}", flush=True)
    return result
