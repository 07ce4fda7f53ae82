"""PPO on real Ray Train + DeepSpeed with vLLM rollout actors: learning (PPO with a critic, full weights; GRPO
without one, LoRA), resume, bf16."""
import json
import shutil

import pytest
import torch

from character.core.store import StageOutput

pytestmark = pytest.mark.slow

# Reward from the rule judge: fewer words is better (the tiny model's eos bias gives it a way to comply).
RULE = ["ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule", "judge.rule.type=length",
        "judge.rule.target_words=0"]


@pytest.fixture(scope="module")
def messages(tmp_path_factory, ray_local, make_config):
    from character.stages import synthesize

    root = tmp_path_factory.mktemp("ppo-data")
    synthesize.run(make_config(root, "synthesize.messages_per_trait=40"))
    return root / "messages"


def _run(tmp_path, messages, make_config, *overrides):
    from character.stages import train_ppo

    if not (tmp_path / "messages").exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(messages, tmp_path / "messages")
    result = train_ppo.run(make_config(tmp_path, *RULE, *overrides))
    lines = [json.loads(x) for x in open(tmp_path / "policy" / "metrics.jsonl")]
    return result, lines


def test_ppo_raises_held_out_reward_with_bounded_kl(tmp_path, messages, make_config):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, lines = _run(tmp_path, messages, make_config, "ppo.iterations=12", "ppo.eval_every=4",
                         "ppo.lr=3e-4", "ppo.critic_lr=3e-4", "train.checkpoint_every=100")
    evals = [x["eval_reward"] for x in lines if "eval_reward" in x]
    assert len(evals) == 4  # before training, then iterations 4, 8, 12
    assert evals[-1] - evals[0] >= 2.0, evals  # reward = -(words): clearly fewer words on held-out prompts
    iterations = [x for x in lines if "reward" in x]
    assert [x["iteration"] for x in iterations] == list(range(1, 13))
    assert all(abs(x["kl"]) < 20 for x in iterations), [x["kl"] for x in iterations]
    for key in ("entropy", "clip_frac", "value_loss", "explained_variance", "response_length",
                "time_generation", "time_scoring", "time_training", "time_sync"):
        assert key in iterations[-1]
    assert list((tmp_path / "tensorboard" / "policy").glob("events.out.tfevents.*"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # exported with save_pretrained
    assert StageOutput(str(tmp_path), "policy").complete()
    # the export (strict) is exactly the module of the final DeepSpeed checkpoint
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    [states] = list((tmp_path / "_train" / "policy").glob("checkpoint_*/policy/ckpt/mp_rank_00_model_states.pt"))
    module = torch.load(states, weights_only=False)["module"]  # our own test checkpoint: trusted
    assert set(module) == set(exported)
    for key, value in module.items():
        assert torch.equal(value, exported[key]), key


def test_lora_grpo_raises_held_out_reward_without_a_critic_and_syncs_merged_adapters(tmp_path, messages,
                                                                                   make_config, repo):
    """Critic-free GRPO (4 samples per prompt, the group as baseline, the KL to the reference a k3 loss term)
    reaches the PPO test's learning bar, with train.lora (adapters on q_proj and v_proj only: the engine's
    fused qkv layer must be pushed whole) under ZeRO-3 (merged weights gathered module by module): after every
    sync the engine's log-probs of a probe equal the policy's (the run stops otherwise) and, by iteration 3,
    differ from the initial policy's; the reference is the adapter-disabled policy; no critic is built or
    checkpointed; the export is the adapter alone (export.merged false), which evaluate's loader merges.
    With ppo.async on (max_staleness 1): each batch after the first comes from the merged weights one sync old,
    generated while the previous batch trains (the synchronous loop is max_staleness 0, tested equal below)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from character.models.loading import resolve_model

    _, lines = _run(tmp_path, messages, make_config, "ppo.iterations=8", "ppo.eval_every=4", "ppo.lr=3e-3",
                    "ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=8",
                    "ppo.kl_penalty=loss", "ppo.kl_coef=0.05", "ppo.ppo_epochs=1",
                    "train.checkpoint_every=100", "train.lora.rank=8", "ppo.async.enabled=true",
                    "train.lora.alpha=16", "train.lora.target_modules=[q_proj,v_proj]",
                    f"train.deepspeed_config={repo / 'configs/deepspeed/zero3.json'}")
    evals = [x["eval_reward"] for x in lines if "eval_reward" in x]
    assert evals[-1] - evals[0] >= 2.0, evals
    assert lines[0]["policy_trainable_parameters"] < 0.1 * lines[0]["policy_total_parameters"]
    iterations = [x for x in lines if "reward" in x]
    assert all(abs(x["kl"]) < 20 for x in iterations), [x["kl"] for x in iterations]
    assert all(x["samples"] == 32 and x["prompts"] == 8 for x in iterations)
    assert [x["staleness_max"] for x in iterations] == [0] + [1] * 7
    assert "critic_total_parameters" not in lines[0]
    for key in ("value_loss", "explained_variance"):
        assert key not in iterations[-1]
    assert all(0.0 <= x["zero_variance_groups"] <= 1.0 and x["kl_loss"] >= 0.0 for x in iterations)
    assert not list((tmp_path / "_train" / "policy").glob("checkpoint_*/critic"))
    assert all(x["sync_logprob_diff"] <= 1e-3 for x in iterations), [x["sync_logprob_diff"] for x in iterations]
    assert iterations[2]["engine_drift"] > 1e-2, [x["engine_drift"] for x in iterations]  # not the initial policy
    assert not (tmp_path / "policy" / "model.safetensors").exists()
    merged = resolve_model(str(tmp_path / "policy"))  # what evaluate does with an adapter-only export
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "policy" / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits, expected, atol=1e-4)


# 15 prompts over 2 workers (padded, never cut) and an adaptive KL coefficient (one beta for all ranks).
MULTI = ["ppo.iterations=5", "ppo.eval_every=5", "train.checkpoint_every=2", "ppo.prompts_per_iteration=15",
         "ppo.kl_target=0.5", "ppo.kl_coef=0.2", "ppo.kl_horizon=50"]


def test_stopped_ppo_resumes_to_the_same_policy_with_one_kl_coefficient_and_every_prompt(tmp_path, messages,
                                                                                         make_config):
    from safetensors.torch import load_file

    from character.core.config import ConfigError
    from character.stages import train_ppo

    _, plain = _run(tmp_path / "plain", messages, make_config, *MULTI)
    iterations = [x for x in plain if "reward" in x]
    assert all(x["prompts"] == 15 for x in iterations)  # 15 // 2 * 2 = 14 before: one prompt dropped each time
    assert all(len(set(x["kl_coef_ranks"])) == 1 for x in iterations), [x["kl_coef_ranks"] for x in iterations]
    assert len({x["kl_coef"] for x in iterations}) == 5  # the controller really moved it

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(messages, stopped / "messages")
    (stopped / "_train").mkdir()
    (stopped / "_train" / "inject_fault.json").write_text(json.dumps({"step": 3}))
    tracked = "tracking.backend=mlflow"
    with pytest.raises(Exception):
        _run(stopped, messages, make_config, *MULTI, "train.max_failures=0", tracked)
    assert not (stopped / "_train" / "inject_fault.json").exists()  # the worker really died at iteration 3
    with pytest.raises(ConfigError, match=r"ppo.lr: 0.0001 in the checkpoint, 0.0002 in the config"):
        train_ppo.run(make_config(stopped, *RULE, *MULTI, "ppo.lr=2e-4", tracked))  # refused before any compute
    _, lines = _run(stopped, messages, make_config, *MULTI, "train.max_failures=0", tracked)
    assert [x["iteration"] for x in lines if "reward" in x] == [1, 2, 3, 4, 5]  # each once: redone after 2
    assert [x.get("resumed_from") for x in lines if "reward" in x] == [None, None, 2, None, None]
    assert [x["kl_coef"] for x in lines if "reward" in x] == [x["kl_coef"] for x in iterations]
    resumed, reference = load_file(str(stopped / "policy" / "model.safetensors")), load_file(
        str(tmp_path / "plain" / "policy" / "model.safetensors"))
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key
    # One MLflow run for the stage through the failure, the refused start and the resume; each iteration once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{stopped}/mlflow/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("character").experiment_id],
                                "tags.`character.stage` = 'train-ppo'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kl")] == [1, 2, 3, 4, 5]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "kl_coef")] == pytest.approx(
        [x["kl_coef"] for x in lines if "reward" in x])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_reward")] == [
        x["iteration"] for x in lines if "eval_reward" in x]


def test_a_bf16_ppo_iteration_trains_exports_fp32_masters_and_is_redone_once_its_output_is_deleted(
        tmp_path, messages, make_config):
    """train.dtype bfloat16 on CPU: policy, critic and reference in bf16 under ZeRO-2 (bf16 section in the
    DeepSpeed config), losses in fp32, bf16 weights synced into the fp32 vLLM engine, and an export in
    model.dtype (float32): the optimizer's fp32 master weights, not their bf16 rounding.
    Then `policy/` is deleted (its metric history with it) while the last Ray Train checkpoint stays: the
    stage starts afresh instead of resuming past every iteration and failing on the lost history."""
    import math

    from safetensors.torch import load_file

    bf16 = ["train.dtype=bfloat16", "ppo.iterations=1", "ppo.eval_every=1", "train.checkpoint_every=100"]
    _, lines = _run(tmp_path, messages, make_config, *bf16)
    [it] = [x for x in lines if "reward" in x]
    for key in ("reward", "kl", "policy_loss", "value_loss", "entropy", "eval_reward"):
        assert math.isfinite(it[key]), (key, it)
    assert it["skipped"] == 0
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.float32}
    weight = exported["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(weight, weight.bfloat16().float())  # the masters, not bf16 values stored as fp32

    assert list((tmp_path / "_train" / "policy").glob("checkpoint_*"))
    shutil.rmtree(tmp_path / "policy")
    _, again = _run(tmp_path, messages, make_config, *bf16)
    assert [(x["iteration"], x.get("resumed_from")) for x in again if "reward" in x] == [(1, None)]
    assert StageOutput(str(tmp_path), "policy").complete()


# ------------------------------------------------------------------------------------ asynchronous rollouts

# Wall-clock figures, and what a process measures against its own start (engine_drift: the engine now vs when
# this process first probed it, so a resumed process measures from the resumed weights).
OWN = ("time_", "memory_peak_gib", "engine_idle_s", "trainer_idle_s", "engine_drift", "resumed_from")


def _same_iterations(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    """Two metric histories equal key by key (wall-clock timings aside) within `tol`."""
    assert [x["iteration"] for x in a] == [x["iteration"] for x in b]
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(OWN)}
        assert keys == {k for k in y if not k.startswith(OWN)}
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol, nan_ok=True), (x["iteration"], key, x[key], y[key])


def _same_weights(a, b) -> None:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "policy" / "model.safetensors")), load_file(str(b / "policy" / "model.safetensors"))
    assert set(left) == set(right)
    for key in left:
        assert torch.allclose(left[key], right[key], atol=1e-6), key


def test_async_with_max_staleness_zero_is_the_synchronous_loop(tmp_path, messages, make_config):
    """ppo.async on with max_staleness 0 asks for batch i at iteration i and waits for it: the same seeds give the
    same metrics and weights as the synchronous loop, to 1e-6."""
    short = ["ppo.iterations=3", "ppo.eval_every=3", "train.checkpoint_every=100"]
    _, sync = _run(tmp_path / "sync", messages, make_config, *short)
    _, zero = _run(tmp_path / "zero", messages, make_config, *short, "ppo.async.enabled=true",
                   "ppo.async.max_staleness=0")
    _same_iterations(sync, zero)
    _same_weights(tmp_path / "sync", tmp_path / "zero")
    assert all(x["staleness_max"] == 0 for x in zero if "reward" in x)


def test_async_ppo_learns_from_batches_one_version_old(tmp_path, messages, make_config):
    """The rule-reward learning test of PPO with a critic, with ppo.async on (max_staleness 1): each batch after
    the first is generated by the weights before the previous update, while that update trains, and the run
    still reaches the same bar. The behaviour log-probs now differ from the trainer's by a policy version, and
    the truncated importance weights correct for it."""
    _, lines = _run(tmp_path, messages, make_config, "ppo.iterations=12", "ppo.eval_every=4", "ppo.lr=3e-4",
                    "ppo.critic_lr=3e-4", "train.checkpoint_every=100", "ppo.async.enabled=true")
    evals = [x["eval_reward"] for x in lines if "eval_reward" in x]
    assert evals[-1] - evals[0] >= 2.0, evals
    iterations = [x for x in lines if "reward" in x]
    # every trained sample's version is within one of the weights it trained: exactly one after the first batch
    assert [x["staleness_max"] for x in iterations] == [0] + [1] * 11
    assert [x["staleness_mean"] for x in iterations] == [0.0] + [1.0] * 11
    gaps = [x["behaviour_logprob_gap"] for x in iterations]
    assert gaps[0] < 1e-3 and all(g > 1e-3 for g in gaps[1:]), gaps  # fp32: one version apart, not numerics
    assert all(0.0 <= x["tis_clipped_frac"] <= 1.0 for x in iterations)
    assert all(x["engine_idle_s"] >= 0.0 and x["trainer_idle_s"] >= 0.0 for x in iterations)
    assert all(abs(x["kl"]) < 20 for x in iterations), [x["kl"] for x in iterations]


def test_a_run_stopped_with_a_batch_in_flight_resumes_to_the_uninterrupted_run(tmp_path, messages, make_config):
    """ppo.async with a batch in flight at the checkpoint: the checkpoint keeps the batch itself (the weights that
    generated it are gone after the update), and the resumed run trains on it: the same iteration metrics, step
    for step, and the same weights as a run that was never stopped, on 2 workers with padded prompts."""
    import pyarrow.parquet as pq

    from character.training.ppo import inflight

    multi = [*MULTI, "ppo.async.enabled=true"]
    _, plain = _run(tmp_path / "plain", messages, make_config, *multi)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(messages, stopped / "messages")
    (stopped / "_train").mkdir()
    (stopped / "_train" / "inject_fault.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(Exception):
        _run(stopped, messages, make_config, *multi, "train.max_failures=0")
    [saved] = list((stopped / "_train" / "policy").glob(f"checkpoint_*/{inflight.FILE}"))
    table = pq.read_table(saved)
    assert set(table.column("iteration").to_pylist()) == {2}  # batch 3, asked for during iteration 2
    assert set(table.column("version").to_pylist()) == {1} and table.num_rows == 15
    _, lines = _run(stopped, messages, make_config, *multi, "train.max_failures=0")
    resumed = [x for x in lines if "reward" in x]
    assert [x.get("resumed_from") for x in resumed] == [None, None, 2, None, None]
    assert resumed[2]["staleness_max"] == 1  # trained on the saved batch, not one generated again by v2
    _same_iterations([x for x in plain if "reward" in x], resumed)
    _same_weights(tmp_path / "plain", stopped)
