"""Real DeepSpeed engines without Ray (ZeRO over gloo, one process): a non-finite micro-batch skips the
whole optimizer step, consistently (stepping.accumulation_step); LoRA checkpoints (checkpoints.save_engine
/ load_engine) hold the trained tensors only and resume exactly, and ZeRO-3 gathers merged weights."""
import os
import socket

import pytest
import torch

from character.training.deepspeed_setup import deepspeed_config
from character.training.stepping import accumulation_step

ACCUM = 4


@pytest.fixture(scope="module")
def dist_group():
    import torch.distributed as dist

    from character.training.deepspeed_setup import setup_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = dict(os.environ)  # later tests start in-process vLLM engines: no stale rank variables for them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    setup_distributed(use_gpu=False)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(repo, stage: int, dtype: str = "float32"):
    import deepspeed
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from character.core.config import TrainConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).to(getattr(torch, dtype))
    ds = deepspeed_config(TrainConfig(deepspeed_config=str(repo / f"configs/deepspeed/zero{stage}.json")),
                          2, ACCUM, 1, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    return engine


def _snapshot(engine) -> dict:
    """What an optimizer step changes: the fp32 master weights the wrapped torch optimizer steps (ZeRO's
    flat partitions, which hold every parameter under each stage) and its state (Adam moments, step)."""
    base = engine.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimizer
    # ZeRO-3 empties the torch optimizer's param groups between steps and keeps the flat partitions itself.
    params = ([p for group in base.param_groups for p in group["params"]]
              or list(engine.optimizer.fp32_partitioned_groups_flat))
    state = {}
    for i, param in enumerate(params):
        state[f"param/{i}"] = param.detach().clone()
        for name, value in base.state.get(param, {}).items():
            state[f"opt/{i}/{name}"] = value.clone() if torch.is_tensor(value) else value
    return state


def _losses(engine, step: int, bad_micro: int | None = None):
    def micro_loss(m: int):
        ids = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(100 * step + m))
        loss = engine(input_ids=ids).logits.float().pow(2).mean()
        return [loss * float("nan") if m == bad_micro else loss]

    return micro_loss


@pytest.mark.parametrize("stage, dtype", [(1, "float32"), (2, "float32"), (3, "float32"), (2, "bfloat16")])
def test_a_nan_at_micro_batch_2_of_4_leaves_parameters_and_optimizer_untouched(dist_group, repo, stage, dtype):
    engine = _engine(repo, stage, dtype)
    accumulation_step([engine], _losses(engine, 0), ACCUM)  # a first good step: optimizer state exists
    before = _snapshot(engine)
    losses, applied = accumulation_step([engine], _losses(engine, 1, bad_micro=2), ACCUM)
    assert not applied and len(losses) == 2  # micro-batches 0 and 1 were finite
    after = _snapshot(engine)
    assert before.keys() == after.keys() and any(k.startswith("opt/") for k in after)
    for key in before:
        assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])), key
    # the next step is a whole, clean accumulation window: it ends exactly where a run that never saw the
    # bad step ends (a `break` after micro-batch 2 left DeepSpeed's counter mid-window, so the next step's
    # boundary came early and mixed the bad step's gradients in)
    _, applied = accumulation_step([engine], _losses(engine, 2), ACCUM)
    assert applied
    clean = _engine(repo, stage, dtype)
    for step in (0, 2):
        accumulation_step([clean], _losses(clean, step), ACCUM)
    changed, expected = _snapshot(engine), _snapshot(clean)
    assert any(not torch.equal(before[k], changed[k]) for k in before if k.startswith("param/"))
    for key in expected:
        assert torch.equal(torch.as_tensor(changed[key]), torch.as_tensor(expected[key])), key


def test_bf16_zero2_trains_in_bf16_with_fp32_master_weights(dist_group, repo):
    """train.dtype bfloat16: the module computes in bf16, DeepSpeed gets the bf16 section and keeps fp32
    master weights, and a step moves them."""
    engine = _engine(repo, 2, "bfloat16")
    assert engine.bfloat16_enabled() and next(engine.module.parameters()).dtype == torch.bfloat16
    before = _snapshot(engine)
    assert all(v.dtype == torch.float32 for k, v in before.items() if k.startswith("param/"))
    losses, applied = accumulation_step([engine], _losses(engine, 0), ACCUM)
    assert applied and all(torch.isfinite(torch.tensor(x)).all() for x in losses)
    after = _snapshot(engine)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("param/"))


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_training_keeps_the_fp32_weights_it_loaded_as_its_master_weights(dist_group, repo, stage):
    """build_trainable under bf16: the module computes in bf16, and DeepSpeed's fp32 master weights are the
    weights as loaded, not their bf16 rounding (which DeepSpeed copies by default); an fp32 export
    (full_state_dict dtype float32) returns them, and after a step the masters have moved off bf16 values."""
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from character.core.config import TrainConfig
    from character.training.deepspeed_setup import adamw, build_trainable, full_state_dict

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    loaded = LlamaForSequenceClassification(config).state_dict()
    ds = deepspeed_config(TrainConfig(deepspeed_config=str(repo / f"configs/deepspeed/zero{stage}.json")),
                          2, ACCUM, 1, "bfloat16")

    def factory(torch_dtype):
        torch.manual_seed(0)
        return LlamaForSequenceClassification(config).to(torch_dtype)

    engine, model = build_trainable(factory, ds, "bfloat16", lambda m: adamw(m.parameters(), lr=1e-2))
    assert engine.bfloat16_enabled() and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.training
    weight = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(loaded[weight], loaded[weight].bfloat16().float())  # rounding would show
    for name, param in model.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(param), loaded[name]), name
    assert torch.equal(full_state_dict(engine, dtype="float32")[weight], loaded[weight])
    assert full_state_dict(engine)[weight].dtype == torch.bfloat16  # without dtype: the module's own
    _, applied = accumulation_step([engine], _losses(engine, 0), ACCUM)
    assert applied
    moved = full_state_dict(engine, dtype="float32")[weight]
    assert not torch.equal(moved, loaded[weight]) and not torch.equal(moved, moved.bfloat16().float())


def _lora_engine(repo, stage: int):
    import deepspeed
    from peft import get_peft_model

    from character.models import lora
    from character.core.config import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from character.core.config import TrainConfig
    from character.training.deepspeed_setup import adamw, deepspeed_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    settings = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora.peft_config(settings, "policy"))
    ds = deepspeed_config(TrainConfig(deepspeed_config=str(repo / f"configs/deepspeed/zero{stage}.json")), 2, 1, 1)
    engine, *_ = deepspeed.initialize(model=model, config=ds, optimizer=adamw(lora.trainable(model), lr=1e-2))
    return engine


def _step(engine, seed: int) -> None:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def test_lora_checkpoints_hold_the_trained_tensors_only_and_resume_exactly_under_zero2_and_zero3(
        tmp_path, repo, dist_group):
    """save_engine / load_engine (what Ray Train checkpoints hold): two steps, a checkpoint, a fresh engine
    loads it, both take a third step: the merged weights the engines would receive are identical; the
    checkpoint is smaller than the frozen base; ZeRO-3's gathered merged weights equal ZeRO-2's."""
    from character.models import lora
    from character.training.checkpoints import load_engine, save_engine

    merged = {}
    for stage in (2, 3):
        trained = _lora_engine(repo, stage)
        _step(trained, 1)
        _step(trained, 2)
        folder = tmp_path / f"zero{stage}"
        save_engine(trained, str(folder), {"step": 2})
        frozen = sum(getattr(p, "ds_numel", p.numel()) for p in trained.module.parameters() if not p.requires_grad)
        saved = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert saved < 4 * frozen, (stage, saved, frozen)  # the fp32 base alone would be 4 bytes a weight
        resumed = _lora_engine(repo, stage)
        assert load_engine(resumed, str(folder))["step"] == 2
        _step(trained, 3)
        _step(resumed, 3)
        a = lora.merged_weights(trained.module, gather=stage == 3)
        b = lora.merged_weights(resumed.module, gather=stage == 3)
        assert a.keys() == b.keys() and len(a) == 2 * 4  # 2 layers x (q, k, v, down); no biases in Llama
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)
        merged[stage] = a
    for k in merged[2]:
        assert torch.allclose(merged[2][k], merged[3][k], atol=1e-5), k


def test_ppo_scoring_has_no_dropout_in_the_critic_or_a_lora_policy(repo, dist_group, tmp_path):
    """PPO's models as train-ppo builds them (one worker, ZeRO-2), LoRA with dropout 0.5: they train in
    training mode (from_pretrained returns eval mode, where LoRA dropout would never apply), and scoring the
    same rollouts twice still gives the same log-probs and values (scoring runs in eval mode, then training
    mode comes back)."""
    from character.training.ppo import rollouts as ppo
    from character.training.ppo import steps as ppo_steps
    from character.core.config import load_config

    config = load_config(repo / "configs/tiny.yaml", [
        f"run.output_dir={tmp_path}", "ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule",
        "judge.rule.type=length", "train.lora.rank=4", "train.lora.dropout=0.5", "train.num_workers=1"])
    policy, critic, reference, scorer, _, _ = ppo_steps.build_models(config, 1)
    assert reference is None  # the adapter-disabled policy is the reference
    assert policy.module.training and critic.module.training
    models = (policy, critic, reference, scorer)
    outs = [{"text": "a b c", "finish_reason": "stop"}, {"text": "d", "finish_reason": "stop"}]

    def scored():
        roll = ppo.build_rollouts([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]], 0)
        return ppo_steps.score(models, roll, [{"text": "x"}, {"text": "y"}], outs, [False, False], 0.05, config.ppo)

    first, second = scored(), scored()
    for a, b in zip(first[:4], second[:4]):  # old log-probs, old values, advantages, returns
        assert torch.equal(a, b)
    assert policy.module.training and critic.module.training
