"""train-pm on real Ray Train + DeepSpeed (gloo, 2 CPU workers): ZeRO-2 and ZeRO-3, export, learning,
fault tolerance (a killed worker, a stopped run) and the non-finite guard."""
import json
import shutil

import pytest
import torch

from character.core.store import StageOutput

pytestmark = pytest.mark.slow

from conftest import RULE_PAIRS as RULE

LEARN = ["pm.micro_batch_size=16", "pm.lr=1e-3", "pm.epochs=4"]


def _run_dir(tmp_path, preferences):
    shutil.copytree(preferences, tmp_path / "preferences")
    return tmp_path


def _pm(run_dir, make_config, *overrides):
    from character.stages import train_pm

    # Scoring every pair for `character review` is checked once, below; the other PM runs here skip it.
    result = train_pm.run(make_config(run_dir, *RULE, "pm.score_pairs=false", *overrides))
    return result, json.loads((run_dir / "pm" / "metrics.json").read_text())


def test_learns_the_rule_and_exports_a_loadable_model(tmp_path, preferences, make_config, repo):
    """ZeRO-3 over 2 workers (ZeRO-2, the default, in the tests below): the PM learns the rule, and the
    export, gathered from the shards, is a plain HF model whose rewards are the ones the stage measured."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from character.data.pm_data import encode_response, pad_batch
    from character.data.splits import pm_validation
    from character.core import schemas

    run_dir = _run_dir(tmp_path, preferences)
    result, metrics = _pm(run_dir, make_config, *LEARN, "train.checkpoint_every=1000", "pm.score_pairs=true",
                          f"train.deepspeed_config={repo / 'configs/deepspeed/zero3.json'}")
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["skipped_steps"] == 0 and metrics["workers"] == 2
    assert result.extra["eval_accuracy"] == metrics["eval_accuracy"]
    assert set(metrics["per_trait_accuracy"]) == {"curiosity", "honesty", "ai_nature"}
    assert sum(b["n"] for b in metrics["calibration"]) == metrics["eval_pairs"]
    assert list((run_dir / "tensorboard" / "pm").glob("events.out.tfevents.*"))
    # the export is a plain HF sequence classifier with safetensors weights
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "pm").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "pm")
    assert (run_dir / "pm" / "model.safetensors").is_file() and model.config.num_labels == 1
    held = [r for r in StageOutput(str(run_dir), "preferences").read(schema=schemas.PREFERENCES).to_pylist()
            if pm_validation(r["message_id"], 0.2)]
    with torch.no_grad():
        rewards = {}
        for side in ("chosen", "rejected"):
            ids, mask = pad_batch([encode_response(tok, r["prompt"], r[side], 128) for r in held], tok.pad_token_id)
            rewards[side] = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    accuracy = float((rewards["chosen"] > rewards["rejected"]).float().mean())
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-6)
    # pm/pair_scores.parquet (what `character review` shows): every pair, scored by the exported model.
    import pyarrow.parquet as pq

    scores = {r["pair_id"]: r for r in pq.read_table(run_dir / "pm" / "pair_scores.parquet").to_pylist()}
    pairs = StageOutput(str(run_dir), "preferences").read(schema=schemas.PREFERENCES).to_pylist()
    assert set(scores) == {r["pair_id"] for r in pairs} and len(scores) == len(pairs)
    assert [scores[r["pair_id"]]["role"] for r in held] == ["validation"] * len(held)
    for side in ("chosen", "rejected"):
        assert [scores[r["pair_id"]][f"{side}_reward"] for r in held] == pytest.approx(rewards[side].tolist(), abs=1e-4)


FAULT = ["pm.max_steps=12", "train.checkpoint_every=4", "pm.micro_batch_size=8"]


def _one_tracked_run_with_every_step_once(run_dir, steps: int) -> None:
    """Rank 0 logged each step once to the stage's one MLflow run, though the steps after the checkpoint ran twice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("character").experiment_id],
                                "tags.`character.stage` = 'train-pm'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, steps + 1))
    assert run.data.metrics["eval_accuracy"] == pytest.approx(
        json.loads((run_dir / "pm" / "metrics.json").read_text())["eval_accuracy"])


def test_killed_worker_and_stopped_run_resume_to_the_same_loss(tmp_path, preferences, make_config):
    plain = _run_dir(tmp_path / "plain", preferences)
    _, reference = _pm(plain, make_config, *FAULT)

    # 1) a worker process dies at step 6: FailureConfig restarts the group from the step-4 checkpoint
    killed = _run_dir(tmp_path / "killed", preferences)
    (killed / "_train").mkdir()
    (killed / "_train" / "inject_fault.json").write_text(json.dumps({"step": 6}))
    _, after_kill = _pm(killed, make_config, *FAULT, "train.max_failures=1", "tracking.backend=mlflow")
    assert not (killed / "_train" / "inject_fault.json").exists()  # the fault really fired
    assert after_kill["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-3)
    assert reference["resumed_from_step"] is None and after_kill["resumed_from_step"] == 4  # not from scratch
    _one_tracked_run_with_every_step_once(killed, 12)

    # 2) no retries allowed: the run stops; running the stage again resumes from its checkpoint, here on
    #    one worker instead of two (an elastic group that shrank): the weights load on the other count
    #    (Adam's moments restart: DeepSpeed cannot re-partition them) and the data position, counted in
    #    examples, carries over (8 steps x 16 pairs, then 8 a step)
    stopped = _run_dir(tmp_path / "stopped", preferences)
    (stopped / "_train").mkdir()
    (stopped / "_train" / "inject_fault.json").write_text(json.dumps({"step": 9}))
    with pytest.raises(Exception):
        _pm(stopped, make_config, *FAULT, "train.max_failures=0", "tracking.backend=mlflow")
    assert not StageOutput(str(stopped), "pm").complete()
    _, resumed = _pm(stopped, make_config, *FAULT, "train.max_failures=0", "train.num_workers=1",
                     "tracking.backend=mlflow")
    _one_tracked_run_with_every_step_once(stopped, 12)  # the resumed stage continued its MLflow run
    assert resumed["steps"] == 12 and resumed["resumed_from_step"] == 8 and resumed["workers"] == 1
    assert resumed["resized_from_workers"] == 2 and reference["resized_from_workers"] is None
    assert resumed["examples_seen"] == 8 * 16 + 4 * 8
    assert reference["examples_seen"] == 12 * 16 and reference["workers"] == 2


def test_non_finite_losses_stop_the_run_naming_the_step(tmp_path, preferences, make_config):
    run_dir = _run_dir(tmp_path, preferences)
    with pytest.raises(Exception) as err:
        _pm(run_dir, make_config, "pm.lr=1e30", "pm.max_steps=20", "pm.max_nonfinite_in_row=2",
            "train.max_failures=0", "train.checkpoint_every=1000")
    assert "was not finite for 2 steps in a row" in str(err.value) and "step " in str(err.value)
    assert not StageOutput(str(run_dir), "pm").complete()


LORA = ["train.lora.rank=8", "train.lora.alpha=16", "pm.lr=1e-2"]


def test_lora_learns_the_rule_and_exports_the_adapter_and_the_merged_model(tmp_path, preferences, make_config):
    """train.lora on the PM (ZeRO-2, 2 workers; ZeRO-3 and exact resume in test_accumulation.py, ZeRO-3 in
    the LoRA PPO test): it learns the rule (rank 8 trains 6% of the weights: held-out accuracy 0.94-0.96 over
    seeds 0-3 here, 0.89 once on CI's CPU with seed 0; chance is 0.5); the checkpoint holds the adapters, the
    score head and their optimizer state only (smaller than the frozen base alone); the export is the
    adapter (PeftModel.from_pretrained) and the merged model, equal to base + adapter, with the base weights
    untouched."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from character.models.loading import resolve_model

    run_dir = _run_dir(tmp_path, preferences)
    _, metrics = _pm(run_dir, make_config, *LEARN, *LORA, "pm.epochs=3", "train.checkpoint_every=1000")
    assert metrics["eval_accuracy"] >= 0.85, metrics
    assert metrics["trainable_parameters"] < 0.1 * metrics["total_parameters"]
    checkpoint = max((run_dir / "_train" / "pm").glob("checkpoint_*"))
    saved = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    assert saved < 4 * (metrics["total_parameters"] - metrics["trainable_parameters"]), saved  # no frozen base

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-llama"), num_labels=1).eval()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = load_file(str(run_dir / "pm" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or ".score." in k for k in adapter), sorted(adapter)[:5]
    peft_model = PeftModel.from_pretrained(base, run_dir / "pm" / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "pm").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        with peft_model.disable_adapter():
            for k, v in peft_model.base_model.model.state_dict().items():
                if k in base_weights and "score" not in k:
                    assert torch.equal(v, base_weights[k]), k
