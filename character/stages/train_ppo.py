"""Stage `train-ppo`: the policy is trained with PPO against the preference model (or a rule), a KL
penalty to the frozen reference folded into the per-token reward (or added to the loss), and either a
critic with GAE or, critic-free, GRPO / RLOO advantages over several samples per prompt. Ray Train workers
hold DeepSpeed engines (policy and critic trained; reference and reward frozen) and run
`character.training.ppo.loop.ppo_loop`; rollouts come from vLLM engines in Ray actors, which receive the updated
policy weights in place after every iteration.
"""
from __future__ import annotations

from character.core.config import Config
from character.core.store import StageInputError, StageOutput
from character.data.splits import ppo_messages
from character.execution.registry import spec_of
from character.execution.runtime import StageResult, reset_train_state, upstream_cause
from character.execution.stage_run import run_stage
from character.inference.engine import engine_env, resolved_device
from character.inference.rollout import RolloutEngine
from character.review.marks import announce, load_marks
from character.training.checkpoints import check_resume_settings, trainer_for
from character.training.ppo.loop import ppo_loop, read_metrics

SPEC = spec_of(__name__)


def run(config: Config, force: bool = False) -> StageResult:
    result = run_stage(config, SPEC, force, lambda out, result, prompts: _train(config, out, result, prompts),
                       inputs=lambda out: _prompts(config, out))
    if not result.skipped:
        print(f"[train-ppo] {result.extra['iterations']} iterations; held-out reward "
              f"{result.extra['eval_reward_first']} -> {result.extra['eval_reward_last']}", flush=True)
    return result


def _prompts(config: Config, out: StageOutput) -> tuple[list, list]:
    """The training and validation prompts, checked before Ray starts; checkpoints whose history is gone are
    dropped and the resume settings checked."""
    if not out.exists("metrics.jsonl"):
        # The loop writes its first metrics line before any checkpoint, so checkpoints without it belong to a
        # deleted output: resuming them would skip the iterations whose history is gone. Start afresh.
        reset_train_state(out)
    announce("train-ppo", config.run.output_dir, load_marks(config.run.output_dir))
    train, held = ppo_messages(config)
    if len(train) < config.ppo.prompts_per_iteration or not held:
        messages = StageOutput(config.run.output_dir, "messages")
        raise StageInputError(
            f"train-ppo: needs >= {config.ppo.prompts_per_iteration} training prompts (ppo.prompts_per_iteration) and "
            f">= 1 validation prompt, carved by message from the 'train' split (ppo.eval_fraction="
            f"{config.ppo.eval_fraction}); has {len(train)} and {len(held)}; {upstream_cause(messages)} "
            f"(per split: {messages.success_info().get('per_split')})")
    check_resume_settings(config, SPEC.output)
    return train, held


def _train(config: Config, out: StageOutput, result: StageResult, prompts: tuple[list, list]) -> None:
    """Rollout engines as Ray actors, the Ray Train workers' PPO loop, and the metrics it wrote."""
    import ray

    gpus = config.engine.num_gpus_per_actor if resolved_device(config.engine) == "cuda" else 0
    actor = ray.remote(num_cpus=config.engine.num_cpus_per_actor, num_gpus=gpus, max_restarts=2)(RolloutEngine)
    engines = [actor.options(runtime_env={"env_vars": engine_env(config.engine)}).remote(
        config.start_model, config.model.dtype, config.engine.model_dump(), config.run.seed)
        for _ in range(config.ppo.rollout_engines)]
    try:
        trainer_for(config, ppo_loop, {"config": config.model_dump(mode="json"), "engines": engines},
                    SPEC.output).fit()
    finally:
        for engine in engines:
            ray.kill(engine)
    lines = read_metrics(out)
    evals = [x for x in lines if "eval_reward" in x]
    result.rows_in, result.rows_out = len(prompts[0]), len(lines)
    result.extra = {"iterations": lines[-1]["iteration"] if lines else 0,
                    "eval_reward_first": evals[0]["eval_reward"] if evals else None,
                    "eval_reward_last": evals[-1]["eval_reward"] if evals else None}
