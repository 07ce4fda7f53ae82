"""Stage `train-ppo`: the policy is trained with PPO against the preference model (or a rule), a KL
penalty to the frozen reference folded into the per-token reward, a critic and GAE. Ray Train workers
hold DeepSpeed engines (policy and critic trained; reference and reward frozen); rollouts come from vLLM
engines in Ray actors, which receive the updated policy weights in place after every iteration.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid

from character.config import Config
from character.runtime import StageResult, Timer, init_ray, skip_or_reset, write_resolved_config
from character.store import StageOutput, require_complete, seed_from_id, stable_id

STAGE = "policy"


def load_prompts(config: Config) -> tuple[list[dict], list[dict]]:
    """Training and held-out messages, split by message_id (held-out ones are never trained on)."""
    from character import schemas
    from character.pm_data import is_held_out

    rows = StageOutput(config.run.output_dir, "messages").read(schema=schemas.MESSAGES,
                                                               columns=["message_id", "trait", "text"]).to_pylist()
    rows.sort(key=lambda r: r["message_id"])
    held = [r for r in rows if is_held_out(r["message_id"], config.ppo.eval_fraction, config.run.seed + 1)]
    train = [r for r in rows if not is_held_out(r["message_id"], config.ppo.eval_fraction, config.run.seed + 1)]
    return train, held


def _frozen(model, ds: dict):
    """Frozen models run as DeepSpeed inference engines: ZeRO-3 when training uses it, else stage 0
    (stage 1/2 need an optimizer)."""
    import deepspeed

    from character.train_common import zero_stage

    frozen = {k: v for k, v in ds.items() if k != "zero_optimization"}
    frozen["zero_optimization"] = {"stage": 3 if zero_stage(ds) == 3 else 0}
    engine, *_ = deepspeed.initialize(model=model, config=frozen)
    engine.eval()
    return engine


class Scorer:
    """Sequence scores: the preference model's reward, or the rule judge's score."""

    def __init__(self, config: Config, tokenizer, ds: dict):
        self.config, self.tokenizer = config, tokenizer
        if config.ppo.reward == "rule":
            from character.judge import RuleJudge

            self.rule, self.engine = RuleJudge(config.judge.rule), None
        else:
            import torch
            from transformers import AutoModelForSequenceClassification

            from character.train_common import build_under_zero

            pm = StageOutput(config.run.output_dir, "pm").path()
            self.rule = None
            self.engine = _frozen(build_under_zero(lambda: AutoModelForSequenceClassification.from_pretrained(
                pm, dtype=torch.float32), ds), ds)

    def __call__(self, prompts: list[str], responses: list[str], finish: list[str]):
        import torch

        from character.pm_data import encode_response, pad_batch

        if self.rule is not None:
            scores = torch.tensor([self.rule.score(r) for r in responses], dtype=torch.float32)
        else:
            ids, mask = pad_batch([encode_response(self.tokenizer, p, r, self.config.pm.max_length)
                                   for p, r in zip(prompts, responses)], self.tokenizer.pad_token_id)
            with torch.no_grad():
                scores = self.engine(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
        penalty = torch.tensor([self.config.ppo.truncation_penalty if f == "length" else 0.0 for f in finish])
        return scores + penalty


def _export(config: Config, weights: dict, model_config, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    final = StageOutput(config.run.output_dir, STAGE).path()
    tmp = os.path.join(os.path.dirname(final), f".policy-export-{uuid.uuid4().hex[:8]}")
    model = AutoModelForCausalLM.from_config(model_config)
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.makedirs(final, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(final, name))
    shutil.rmtree(tmp, ignore_errors=True)


def run(config: Config, force: bool = False) -> StageResult:
    out = StageOutput(config.run.output_dir, STAGE)
    if (skipped := skip_or_reset(out, force)) is not None:
        return skipped
    if not os.path.exists(out.path("metrics.jsonl")):
        # The loop writes its first metrics line before any checkpoint, so checkpoints without it belong to a
        # deleted output: resuming them would skip the iterations whose history is gone. Start afresh.
        StageOutput(config.run.output_dir, f"_train/{STAGE}").reset()
    from character.config import check_stage_config

    check_stage_config(config, "train-ppo")
    require_complete(StageOutput(config.run.output_dir, "messages"), "train-ppo")
    if "pm" in (config.ppo.reward, config.ppo.critic_init):
        require_complete(StageOutput(config.run.output_dir, "pm"), "train-ppo")
    train, held = load_prompts(config)
    if len(train) < config.ppo.prompts_per_iteration or not held:
        raise ValueError(f"train-ppo needs >= {config.ppo.prompts_per_iteration} training and >= 1 held-out "
                         f"messages; have {len(train)} and {len(held)}")
    write_resolved_config(config)
    init_ray(config.ray)
    import ray

    from character.engine import engine_env, resolved_device
    from character.rollout import RolloutEngine
    from character.stages.ppo_loop import ppo_loop
    from character.train_common import trainer_for

    gpus = config.engine.num_gpus_per_actor if resolved_device(config.engine) == "cuda" else 0
    actor = ray.remote(num_cpus=config.engine.num_cpus_per_actor, num_gpus=gpus, max_restarts=2)(RolloutEngine)
    engines = [actor.options(runtime_env={"env_vars": engine_env(config.engine)}).remote(
        config.model.name, config.model.dtype, config.engine.model_dump(), config.run.seed)
        for _ in range(config.ppo.rollout_engines)]
    result = StageResult(STAGE, out.uri, rows_in=len(train))
    try:
        with Timer() as timer:
            trainer_for(config, ppo_loop, {"config": config.model_dump(mode="json"), "engines": engines},
                        STAGE).fit()
    finally:
        for engine in engines:
            ray.kill(engine)
    lines = [json.loads(x) for x in open(out.path("metrics.jsonl"))]
    evals = [x for x in lines if "eval_reward" in x]
    result.seconds = timer.seconds
    result.rows_out = len(lines)
    result.extra = {"iterations": lines[-1]["iteration"] if lines else 0,
                    "eval_reward_first": evals[0]["eval_reward"] if evals else None,
                    "eval_reward_last": evals[-1]["eval_reward"] if evals else None}
    out.mark_success(result.summary())
    print(f"[train-ppo] {result.extra['iterations']} iterations; held-out reward "
          f"{result.extra['eval_reward_first']} -> {result.extra['eval_reward_last']}", flush=True)
    return result


def iteration_seeds(rows: list[dict], iteration: int, seed: int) -> list[int]:
    return [seed_from_id(stable_id(r["message_id"], str(iteration)), seed) for r in rows]


def now() -> float:
    return time.perf_counter()
