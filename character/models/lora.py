"""Low-rank adapters (peft) for the trained models, and the merged weights the vLLM engines receive.

With `train.lora.rank > 0` the PM, the policy and the critic are peft models: the base weights are frozen
(no gradient, no optimizer state, not in checkpoints), the adapters and the heads are trained. The
engines are never given an adapter: after each update the trainer computes W + (alpha/r) B A for the
adapted modules only (`merged_weights`) and pushes those tensors in place, as TRL and NeMo-RL do; the
engines' other weights are the base's, which never change. vLLM's own LoRA path also works on CPU here,
but samples 4x slower there (benchmarks/lora.py measures both).

Why hand-written: peft's `merge_and_unload` rewrites the trained model itself and returns every weight;
we need the merged tensors of the adapted modules, named as the engine names them, without touching the
model, on every iteration.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from character.core.config import ConfigError, LoraConfig
from character.models.export import export_model, write_folder
from character.models.loading import ADAPTER_DIR, resolve_model

# peft's task types for our three heads: the policy (causal LM), the PM (one score per sequence) and the
# critic (one value per token).
TASKS = {"policy": "CAUSAL_LM", "pm": "SEQ_CLS", "critic": "TOKEN_CLS"}
HEAD = "score"  # the PM's and the critic's head (Llama/Qwen2 ...ForSequenceClassification/ForTokenClassification)
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the wrapped model's own names

# vLLM fuses these projections into one parameter each (qkv_proj, gate_up_proj). Reloading part of a fused
# parameter leaves the rest of it uninitialised (measured with vLLM 0.32: q and v alone give NaN
# log-probabilities), so a module of a group is always pushed with its whole group.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def peft_config(lora: LoraConfig, model: str):
    """A peft LoraConfig for `model` in TASKS. The heads are trained whole (peft's modules_to_save for the
    classification tasks), so they are kept out of the adapted modules."""
    from peft import LoraConfig as PeftLoraConfig

    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                          bias="none", task_type=TASKS[model],
                          exclude_modules=[HEAD] if model != "policy" else None)


def wrap(model, lora: LoraConfig, kind: str):
    """`model` with adapters (base weights frozen), or `model` itself when LoRA is off."""
    if not lora.enabled:
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(lora, kind))
    except ValueError as exc:  # e.g. target modules that match nothing in this architecture
        raise ConfigError(f"field 'train.lora.target_modules': {exc}") from None


def target_problem(model_name: str, lora: LoraConfig) -> str | None:
    """Why `lora.target_modules` cannot adapt `model_name` (None: it can), read from the architecture built
    on the meta device (no weights, no memory): checked with the config, before any compute."""
    if not lora.enabled or lora.target_modules == "all-linear":
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model_name)))
    linear = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    if not missing:
        return None
    leaves = sorted({n.rpartition(".")[2] for n in linear})
    return f"{missing} match no linear layer of {model_name} (its linear layers: {', '.join(leaves)})"


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model) -> dict:
    """Trainable and total parameters (ZeRO-3 partitions count their full size, `ds_numel`)."""
    size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    return {"trainable_parameters": sum(size(p) for p in trainable(model)),
            "total_parameters": sum(size(p) for p in model.parameters())}


def adapter_disabled(engine):
    """Context in which a LoRA policy is its base model (PPO's reference, no second copy of the base)."""
    return engine.module.disable_adapter()


def engine_name(peft_module_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'."""
    return peft_module_name[len(PEFT_PREFIX):] if peft_module_name.startswith(PEFT_PREFIX) else peft_module_name


def modules_to_push(adapted: list[str]) -> list[str]:
    """The adapted modules (engine names) plus the other members of every fused group they belong to, in a
    stable order (layer by layer, so vLLM processes each fused layer as soon as its last piece arrives)."""
    wanted = set(adapted)
    for name in adapted:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                wanted.update(f"{parent}.{member}" for member in group)
    return sorted(wanted, key=_layer_order)


def _layer_order(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def merged_weights(model, gather: bool = False, keep: bool = True) -> dict | None:
    """Engine name -> tensor for every parameter of `modules_to_push`: W + (alpha/r) B A for an adapted
    module's weight, the base tensor for its bias and for an unadapted member of a fused group. `model` is
    the PeftModel and is not modified. `gather`: ZeRO-3 partitions are gathered module by module (a
    collective: every rank calls; `keep=False` ranks take part and get None)."""
    import torch
    from peft.tuners.lora import LoraLayer

    by_name = {engine_name(n): m for n, m in model.named_modules()}
    adapted = [name for name, m in by_name.items() if isinstance(m, LoraLayer)]
    out = {}
    for name in modules_to_push(adapted):
        module = by_name[name]
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        params = list(module.parameters(recurse=True))
        with _gathered(params, gather), torch.no_grad():
            if not keep:
                continue
            for key, tensor in base.named_parameters(recurse=False):
                value = tensor.detach()
                if key == "weight" and isinstance(module, LoraLayer):
                    value = value + module.get_delta_weight(module.active_adapters[0]).to(value.dtype)
                out[f"{name}.{key}"] = value.cpu().clone()
    return out if keep else None


def _gathered(params: list, gather: bool):
    if not gather:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def export(kind: str, lora: LoraConfig, model_class, model_config, weights: dict, tokenizer, uri: str,
           base_name: str, merged: bool, files: dict | None = None) -> None:
    """A trained model at `uri`. Without LoRA: `export.export_model` (an ordinary HF folder). With it: the
    adapter in `<uri>/adapter/` (`save_pretrained` of the peft model: adapter_config.json naming `base_name`,
    adapter_model.safetensors with the adapters and the trained head, the tokenizer) and, with `merged`, the
    merged full model at `<uri>/` itself. `weights`: the model's full state dict, taken strictly by a clean
    copy of it."""
    from peft import get_peft_model

    if not lora.enabled:
        export_model(model_class, model_config, weights, tokenizer, uri, files)
        return

    dtype = next(iter(weights.values())).dtype
    model = get_peft_model(model_class.from_config(model_config, dtype=dtype), peft_config(lora, kind))
    model.load_state_dict(weights, strict=True)
    model.peft_config["default"].base_model_name_or_path = base_name  # portable: a model name, not a cache path

    def write(folder: str) -> None:
        # save_embedding_layers=False: embeddings are never adapted here, and "auto" asks the Hugging Face hub
        # about the base model (a network timeout on clusters without it).
        model.save_pretrained(str(Path(folder, ADAPTER_DIR)), safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(str(Path(folder, ADAPTER_DIR)))
        if merged:
            model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)

    write_folder(uri, write, files)
