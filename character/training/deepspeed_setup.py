"""DeepSpeed set-up shared by the training stages: the ZeRO config from the train settings, engines built (and frozen) under ZeRO, the process group, full weights gathered for export."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from character.core.config import ConfigError, TrainConfig
from character.models import lora
from character.models.loading import resolve_model


def read_deepspeed_json(path: str) -> dict:
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config (field 'train.deepspeed_config'): {exc}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: field 'zero_optimization.stage' must be 0-3, got {stage!r}")
    return ds


def deepspeed_config(train: TrainConfig, micro: int, accum: int, world: int, dtype: str = "float32") -> dict:
    """The JSON's settings plus the batch sizes and the precision section matching the training dtype
    (DeepSpeed keeps fp32 master weights for bf16/fp16; a JSON's own bf16/fp16 section is overridden,
    so the models' dtype and DeepSpeed's can never disagree)."""
    ds = read_deepspeed_json(train.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world
    if zero_stage(ds) in (1, 2):
        # Optimizer partitions saved so that a group of another size can load them (elastic resize).
        ds["zero_optimization"]["elastic_checkpoint"] = True
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    if dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    elif dtype == "float16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def adamw(params, **kwargs):
    """torch's AdamW as DeepSpeed's elastic ZeRO-1/2 checkpoints need it: they save and restore a `step` in
    the param groups (DeepSpeed's own Adam keeps it there; torch's keeps it per parameter, in its state,
    which the checkpoint carries anyway), and refuse to load without one. The group entry is a constant
    that torch never reads."""
    import torch

    optimizer = torch.optim.AdamW(params, **kwargs)
    for group in optimizer.param_groups:
        group["step"] = 0
    return optimizer


def frozen_engine(model, ds: dict):
    """A frozen model (PPO's reference and reward) as a DeepSpeed inference engine: ZeRO-3 when training
    uses it, else stage 0 (stages 1 and 2 need an optimizer)."""
    import deepspeed

    frozen = {k: v for k, v in ds.items() if k != "zero_optimization"}
    frozen["zero_optimization"] = {"stage": 3 if zero_stage(ds) == 3 else 0}
    engine, *_ = deepspeed.initialize(model=model, config=frozen)
    engine.eval()
    return engine


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def setup_distributed(use_gpu: bool) -> None:
    import deepspeed

    if not use_gpu:
        # Every init_distributed would JIT-compile the shm comm op (~80 s) that ZeRO over gloo never uses.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray Train's group


def trainable_policy(model_name: str, train: TrainConfig, ds: dict, dtype: str, **optimizer):
    """A causal LM (the policy of train-sft, train-dpo and train-ppo) from `model_name`, built under ZeRO-3 where
    `ds` asks for it, with train.lora's adapters, in a DeepSpeed engine whose AdamW (`optimizer`: lr, ...)
    steps its trainable parameters (build_trainable). Returns (the engine, the model it wraps)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_name)
    return build_trainable(lambda torch_dtype: lora.wrap(build_under_zero(
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype), ds), train.lora, "policy"),
        ds, dtype, lambda model: adamw(lora.trainable(model), **optimizer))


def build_trainable(factory, ds: dict, dtype: str, optimizer):
    """(engine, model): `factory(torch_dtype)` builds the model, `optimizer(model)` its optimizer, in a DeepSpeed
    engine in training mode (from_pretrained returns eval mode: LoRA dropout would apply only after the first
    evaluation). bf16 under ZeRO-1/2: the model is built in fp32, its trainable weights kept, the module cast
    to bf16, and DeepSpeed's fp32 master weights set back to the kept values (safe_set_full_fp32_param).
    DeepSpeed copies its masters from the bf16 module, and that rounding alone moves SmolLM2-135M's per-token
    log-probs by 0.2 nats on average: more than a short fine-tune moves them, and kept in every export.
    (ZeRO-3 builds its partitions in the training dtype at construction: its masters start rounded.)"""
    import deepspeed
    import torch

    exact = dtype == "bfloat16" and zero_stage(ds) < 3
    model = factory(torch.float32 if exact else getattr(torch, dtype))
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if exact else {}
    if exact:
        model.to(torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, config=ds, optimizer=optimizer(model))
    if exact:
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in model.named_parameters():
            if name in kept:
                safe_set_full_fp32_param(param, kept[name])
    engine.train()
    return engine, model


def build_under_zero(factory, ds: dict):
    """Construct a HF model so that ZeRO-3 partitions it at creation. The HfDeepSpeedConfig object must
    stay alive while the model is built (a bare deepspeed.zero.Init() fails on HF models here)."""
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)
        model = factory()
        model._character_hf_ds_config = keep_alive
        return model
    return factory()


def full_state_dict(engine, keep: bool = True, copy: bool = True, dtype: str | None = None) -> dict | None:
    """Full weights (gathering ZeRO-3 partitions: a collective, call it on every rank). `keep=False`
    returns None (a rank that only takes part in the gather); `copy=False` returns views of the live
    parameters where ZeRO does not partition them (valid until the next optimizer step). `dtype="float32"` on
    a bf16 engine returns the optimizer's fp32 master weights of the trained parameters (DeepSpeed's
    safe_get_full_fp32_param: a collective on every rank) instead of their bf16 rounding, which moves a 135M
    model's answers more than a short fine-tune does; an export in model.dtype float32 asks for it."""
    import deepspeed

    model = engine.module
    master = _master_weights(engine) if dtype == "float32" and engine.bfloat16_enabled() else {}
    if zero_stage(engine.config) == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            # The gathered storage is freed on leaving the context: copy what is kept.
            return ({k: master[k] if k in master else v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    if keep else None)
    if not keep:
        return None
    return {k: master[k] if k in master else (v.detach().cpu().clone() if copy else v.detach().cpu())
            for k, v in model.state_dict().items()}


def _master_weights(engine) -> dict:
    """state-dict key -> the fp32 master copy of each trained parameter (tied keys share one), on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    by_param: dict[int, object] = {}
    master = {}
    for key, param in engine.module.state_dict(keep_vars=True).items():  # the same order on every rank
        if not getattr(param, "requires_grad", False):
            continue
        if id(param) not in by_param:
            full = safe_get_full_fp32_param(param)
            by_param[id(param)] = None if full is None else full.detach().cpu().clone()
        if by_param[id(param)] is not None:
            master[key] = by_param[id(param)]
    return master


def plain_model_construction() -> None:
    """End ZeRO-3's construct-time partitioning (HfDeepSpeedConfig): a model built afterwards, e.g. on
    rank 0 alone for export, must not enter DeepSpeed's collectives."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
