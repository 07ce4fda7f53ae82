"""Stage `train-ppo`: the policy is trained with PPO against the preference model (or a rule), a KL
penalty to the frozen reference folded into the per-token reward (or added to the loss), and either a
critic with GAE or, critic-free, GRPO / RLOO advantages over several samples per prompt. Ray Train workers
hold DeepSpeed engines (policy and critic trained; reference and reward frozen) and run
`character.ppo_trainer.ppo_loop`; rollouts come from vLLM engines in Ray actors, which receive the updated
policy weights in place after every iteration.
"""
from __future__ import annotations

from character import schemas
from character.config import Config
from character.runtime import StageResult, Timer, init_ray, skip_or_reset, write_resolved_config
from character.store import StageOutput, require_complete
from character.tracking import tracked

STAGE = "policy"


@tracked("train-ppo", "policy")
def run(config: Config, force: bool = False) -> StageResult:
    from character.stage_checks import check_stage_config
    from character.ppo_trainer import read_metrics
    from character.review import announce, load_marks
    from character.splits import ppo_messages
    from character.runtime import reset_train_state
    from character.train_common import check_resume_settings

    out = StageOutput(config.run.output_dir, STAGE)
    if (skipped := skip_or_reset(out, force)) is not None:
        return skipped
    if not out.exists("metrics.jsonl"):
        # The loop writes its first metrics line before any checkpoint, so checkpoints without it belong to a
        # deleted output: resuming them would skip the iterations whose history is gone. Start afresh.
        reset_train_state(out)
    check_stage_config(config, "train-ppo")
    messages = StageOutput(config.run.output_dir, "messages")
    require_complete(messages, "train-ppo", schemas.MESSAGES)
    if config.ppo.reward == "pm" or (config.ppo.uses_critic and config.ppo.critic_init == "pm"):
        require_complete(StageOutput(config.run.output_dir, "pm"), "train-ppo")
    announce("train-ppo", config.run.output_dir, load_marks(config.run.output_dir))
    train, held = ppo_messages(config)
    if len(train) < config.ppo.prompts_per_iteration or not held:
        from character.runtime import StageInputError, upstream_cause

        raise StageInputError(
            f"train-ppo: needs >= {config.ppo.prompts_per_iteration} training prompts (ppo.prompts_per_iteration) and "
            f">= 1 validation prompt, carved by message from the 'train' split (ppo.eval_fraction="
            f"{config.ppo.eval_fraction}); has {len(train)} and {len(held)}; {upstream_cause(messages)} "
            f"(per split: {messages.success_info().get('per_split')})")
    check_resume_settings(config, STAGE)
    write_resolved_config(config)
    init_ray(config.ray)
    import ray

    from character.engine import engine_env, resolved_device
    from character.ppo_trainer import ppo_loop
    from character.rollout import RolloutEngine
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
    lines = read_metrics(out)
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
