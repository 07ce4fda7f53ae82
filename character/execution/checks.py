"""Checks of a configuration that need more than its file: the registries (advantage estimators), the models a
stage loads, DeepSpeed and LoRA settings, lengths. Run before a stage, or before `character run` starts any."""
from __future__ import annotations

from character.core.config import Config, ConfigError
from character.execution.registry import STAGES
from character.models.loading import model_problem
from character.models.lora import target_problem
from character.training.deepspeed_setup import read_deepspeed_json, zero_stage
from character.training.estimators import estimator_problem, uses_critic


def check_config(config: Config) -> None:
    """Settings checked against the registries, for every command (they are not stage-specific: the progress
    estimate reads them too)."""
    origin = config.source or "<config>"
    if (why := estimator_problem(config.ppo)) is not None:
        raise ConfigError(f"{origin}: {why}")
    ppo = config.ppo
    if uses_critic(ppo) and ppo.critic_init == "pm" and config.pm.base_model not in (None, config.model.name):
        raise ConfigError(f"{origin}: field 'ppo.critic_init': 'pm' but pm.base_model ({config.pm.base_model}) is not "
                          f"the policy ({config.model.name}): the critic reads the policy's token ids, which another "
                          f"tokenizer does not share (set ppo.critic_init: policy)")


def check_stage_config(config: Config, stage: str) -> None:
    """Constraints that only matter to one stage, checked before that stage (or `run`) starts."""
    check_config(config)
    spec, origin = STAGES[stage], config.source or "<config>"
    for field in spec.models:
        section, _, key = field.rpartition(".")
        node = config
        for part in section.split("."):
            node = getattr(node, part)
        name = getattr(node, key)
        if name is not None and (why := model_problem(name)) is not None:
            raise ConfigError(f"{origin}: field '{field}': {why}")
    if spec.trains:
        _check_training(config, stage, origin)
    if stage == "train-ppo" and config.ppo.sampling.max_tokens + config.ppo.max_prompt_tokens > config.engine.max_model_len:
        raise ConfigError(f"{origin}: field 'ppo.max_prompt_tokens': {config.ppo.max_prompt_tokens} prompt tokens + "
                          f"{config.ppo.sampling.max_tokens} new tokens do not fit engine.max_model_len "
                          f"{config.engine.max_model_len}")


def _check_training(config: Config, stage: str, origin: str) -> None:
    """A Ray Train + DeepSpeed stage: ZeRO stage, LoRA targets, elastic worker counts."""
    zero = zero_stage(read_deepspeed_json(config.train.deepspeed_config))
    if zero == 0:
        raise ConfigError(f"{origin}: field 'train.deepspeed_config': {config.train.deepspeed_config} uses ZeRO stage 0, "
                          f"whose fp32 optimizer steps on non-finite gradients instead of skipping them; use "
                          f"configs/deepspeed/zero1.json, zero2.json or zero3.json")
    if config.train.lora.enabled:
        model = config.pm.base_model or config.model.name if stage == "train-pm" else config.model.name
        if (why := target_problem(model, config.train.lora)) is not None:
            raise ConfigError(f"{origin}: field 'train.lora.target_modules': {why}")
    if not isinstance(config.train.num_workers, int) and zero == 3:
        raise ConfigError(f"{origin}: field 'train.num_workers': a range {list(config.train.num_workers)} (elastic "
                          f"group) with ZeRO-3 ({config.train.deepspeed_config}): DeepSpeed cannot load stage-3 "
                          f"checkpoints on another number of workers; use a fixed number, or ZeRO-1/2")
