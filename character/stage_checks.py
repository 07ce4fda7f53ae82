"""Checks of a configuration that only matter to one stage (the models it loads, DeepSpeed and LoRA settings,
lengths), run before that stage, or before `character run` starts any."""
from __future__ import annotations

from character.config import Config, ConfigError

# Which model fields a stage loads (the judge's model defaults to the policy model).
_MODEL_FIELDS = {
    "synthesize": ["model.name"], "respond": ["model.name"], "rank": ["model.name", "judge.model"],
    "train-pm": ["model.name", "pm.base_model"], "train-ppo": ["model.name", "pm.base_model"],
    "train-dpo": ["model.name"],
    "evaluate": ["model.name", "evaluate.judge.model"],
}


TRAINING_STAGES = ("train-pm", "train-ppo", "train-dpo")


def check_stage_config(config: Config, stage: str) -> None:
    """Constraints that only matter to one stage, checked before that stage (or `run`) starts."""
    origin = config.source or "<config>"
    for field in _MODEL_FIELDS.get(stage, []):
        section, _, key = field.rpartition(".")
        node = config
        for part in section.split("."):
            node = getattr(node, part)
        name = getattr(node, key)
        from character.models import model_problem

        if name is not None and (why := model_problem(name)) is not None:
            raise ConfigError(f"{origin}: field '{field}': {why}")
    if stage in TRAINING_STAGES:
        from character.train_common import read_deepspeed_json, zero_stage

        if zero_stage(read_deepspeed_json(config.train.deepspeed_config)) == 0:
            raise ConfigError(f"{origin}: field 'train.deepspeed_config': {config.train.deepspeed_config} uses ZeRO stage 0, "
                              f"whose fp32 optimizer steps on non-finite gradients instead of skipping them; use "
                              f"configs/deepspeed/zero1.json, zero2.json or zero3.json")
    if stage in TRAINING_STAGES and config.train.lora.enabled:
        from character.lora import target_problem

        model = config.pm.base_model or config.model.name if stage == "train-pm" else config.model.name
        if (why := target_problem(model, config.train.lora)) is not None:
            raise ConfigError(f"{origin}: field 'train.lora.target_modules': {why}")
    if stage in TRAINING_STAGES and not isinstance(config.train.num_workers, int):
        from character.train_common import read_deepspeed_json, zero_stage

        if zero_stage(read_deepspeed_json(config.train.deepspeed_config)) == 3:
            raise ConfigError(f"{origin}: field 'train.num_workers': a range {list(config.train.num_workers)} (elastic "
                              f"group) with ZeRO-3 ({config.train.deepspeed_config}): DeepSpeed cannot load stage-3 "
                              f"checkpoints on another number of workers; use a fixed number, or ZeRO-1/2")
    if stage == "train-ppo" and config.ppo.sampling.max_tokens + config.ppo.max_prompt_tokens > config.engine.max_model_len:
        raise ConfigError(f"{origin}: field 'ppo.max_prompt_tokens': {config.ppo.max_prompt_tokens} prompt tokens + "
                          f"{config.ppo.sampling.max_tokens} new tokens do not fit engine.max_model_len "
                          f"{config.engine.max_model_len}")
