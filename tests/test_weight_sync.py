"""Weight sync into vLLM rollout actors: full state dicts and LoRA's merged modules, and the probe that
stops a run whose engines do not serve the trained policy. One engine for the module (its own file, so the
actor's CPU is free again before the PPO runs of test_train_ppo.py)."""
import pytest
import torch

pytestmark = pytest.mark.slow

QWEN = "tiny-qwen2"  # tied input/output embeddings and biases in q/k/v: the harder case


@pytest.fixture(scope="module")
def qwen_engine(ray_local):
    import ray

    from character.core.config import EngineConfig
    from character.inference.engine import engine_env
    from character.inference.rollout import RolloutEngine

    engine_cfg = EngineConfig(num_cpus_per_actor=1)
    actor = ray.remote(num_cpus=1)(RolloutEngine).options(
        runtime_env={"env_vars": engine_env(engine_cfg)}).remote(QWEN, "float32", engine_cfg.model_dump(), 0)
    yield actor
    ray.kill(actor)


def test_weight_sync_into_a_vllm_actor_matches_the_trained_policy(qwen_engine):
    import ray

    from character.models.loading import load_causal_lm, load_tokenizer
    from character.inference.rollout import arrays_for_engines

    name, actor = QWEN, qwen_engine
    tok = load_tokenizer(name)
    ids = tok("I wonder what it is like to remember nothing between conversations.")["input_ids"]
    before = torch.tensor(ray.get(actor.prompt_logprobs.remote(ids)))

    model = load_causal_lm(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    loss = -torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        hf = torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
    arrays = arrays_for_engines(model.state_dict(), tie_word_embeddings=True)
    assert "lm_head.weight" not in arrays  # the tied head crosses once, as the embedding
    assert ray.get(actor.update_weights.remote(ray.put(arrays), True, 1)) == 1
    after = torch.tensor(ray.get(actor.prompt_logprobs.remote(ids)))
    assert (after - hf).abs().max() <= 1e-3
    assert (before - hf).abs().max() > 1e-2  # the engine really changed


def _push(actor, weights: dict, version: int) -> None:
    import ray

    from character.inference.rollout import arrays_for_engines

    assert ray.get(actor.update_weights.remote(ray.put(arrays_for_engines(weights, True)), True, version)) == version


def test_lora_sync_pushes_merged_adapted_modules_and_the_probe_catches_a_stale_or_broken_engine(qwen_engine):
    """A LoRA policy (q_proj and v_proj only) updated 3 times: after each push of the merged adapted modules
    the engine's log-probs equal the peft model's within 1e-3 and differ from the previous ones, the peft
    model's base weights never change. The SyncProbe passes those syncs, and stops a run whose engine was
    not updated (still the previous policy) or was given the base weights of the adapted modules."""
    import ray
    from peft import get_peft_model

    from character.models import lora
    from character.core.config import LoraConfig
    from character.models.loading import load_causal_lm, load_tokenizer
    from character.inference.rollout import SyncError, SyncProbe

    actor = qwen_engine
    _push(actor, load_causal_lm(QWEN).state_dict(), 0)  # the previous test changed the engine: back to the base
    ids = load_tokenizer(QWEN)("Tell me honestly what you are, and what you are not.")["input_ids"]
    settings = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load_causal_lm(QWEN), lora.peft_config(settings, "policy"))
    base = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(lora.trainable(model), lr=5e-2)
    x = torch.tensor([ids])
    probe = SyncProbe(ids, tolerance=1e-3)

    def policy_logprobs():
        with torch.no_grad():
            return torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]

    previous = torch.tensor(ray.get(actor.prompt_logprobs.remote(ids)))
    probe.compare([previous.tolist()], policy_logprobs().tolist(), 0)
    for version in (1, 2, 3):
        loss = -torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        weights = lora.merged_weights(model)
        assert {k.rpartition(".")[0].rpartition(".")[2] for k in weights} == {"q_proj", "k_proj", "v_proj"}
        _push(actor, weights, version)
        now = torch.tensor(ray.get(actor.prompt_logprobs.remote(ids)))
        expected = policy_logprobs()
        assert (now - expected).abs().max() <= 1e-3, version
        assert (now - previous).abs().max() > 1e-2, version  # the engine moved with the policy
        found = probe.compare([now.tolist()], expected.tolist(), version)
        previous = now
    assert found["engine_drift"] > 1e-2
    for k, v in model.base_model.model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k

    loss = -torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).mean()
    loss.backward()
    opt.step()
    stale = ray.get(actor.prompt_logprobs.remote(ids))  # no push: the engine still has version 3
    with pytest.raises(SyncError, match="version 4 the vLLM engines do not serve the trained policy"):
        probe.compare([stale], policy_logprobs().tolist(), 4)
    # A sync that maps the peft names to the engine's but forgets the adapters (base_layer weights pushed):
    adapted = ("q_proj.weight", "v_proj.weight")
    unmerged = {k: base[k.replace("_proj.weight", "_proj.base_layer.weight")] if k.endswith(adapted) else v
                for k, v in lora.merged_weights(model).items()}
    _push(actor, unmerged, 4)
    with pytest.raises(SyncError):
        probe.compare([ray.get(actor.prompt_logprobs.remote(ids))], policy_logprobs().tolist(), 4)
