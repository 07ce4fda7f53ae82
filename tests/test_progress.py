"""Run progress: the work estimate per stage and the time-left arithmetic (pure, no Ray)."""
import pytest

from character.execution.registry import stage_work
from character.tracking import progress
from character.pipeline.cli import STAGES, pipeline
from character.core.config import load_config


def test_every_stage_has_a_work_estimate_that_grows_with_its_size(repo):
    config = load_config(repo / "configs/small.yaml")
    work = stage_work(config, n_traits=4, n_seed_questions=16)
    assert set(work) == set(STAGES) and work["report"] == 0
    assert all(work[s] > 0 for s in STAGES if s != "report")
    bigger = stage_work(load_config(repo / "configs/small.yaml", ["ppo.iterations=8"]), 4, 16)
    assert bigger["train-ppo"] > 1.9 * work["train-ppo"] and bigger["respond"] == work["respond"]
    rule = stage_work(load_config(repo / "configs/small.yaml", ["judge.kind=rule",
                                                                        "judge.rule.words=[AI]"]), 4, 16)
    assert rule["rank"] == 0
    online = stage_work(load_config(repo / "configs/small.yaml", ["dpo.precompute_reference=false"]), 4, 16)
    assert online["train-dpo"] > work["train-dpo"]  # the reference scores every training pass, not each pair once
    gae = stage_work(load_config(repo / "configs/small.yaml", ["ppo.advantage=gae", "ppo.samples_per_prompt=1",
                                                                "ppo.kl_penalty=reward"]), 4, 16)
    grpo = stage_work(load_config(repo / "configs/small.yaml", ["ppo.advantage=grpo",
                                                                        "ppo.samples_per_prompt=4"]), 4, 16)
    assert grpo["train-ppo"] > gae["train-ppo"]  # 4 samples per prompt, less than 4x: no critic


def test_the_pipeline_follows_the_policy_method(repo):
    ppo = pipeline(load_config(repo / "configs/tiny.yaml"))
    dpo = pipeline(load_config(repo / "configs/tiny.yaml", ["policy.method=dpo"]))
    assert ppo == ["synthesize", "respond", "rank", "train-pm", "train-ppo", "evaluate", "report"]
    assert dpo == ["synthesize", "respond", "rank", "train-dpo", "evaluate", "report"]


def test_time_left_uses_the_rate_measured_so_far(monkeypatch):
    clock = iter([0.0, 0.0, 130.0, 130.0, 130.0])  # start, stage 1 begins, ends at 130 s, stage 2 begins (+ skip)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    run = progress.RunProgress(["a", "b", "c"], {"a": 100.0, "b": 300.0, "c": 0.0})
    assert run.begin(0).endswith("0m00s so far")  # no estimate before any stage has worked
    run.end(0, skipped=False)  # 130 s - 30 s start-up for 100 units: 1 s per unit
    line = run.begin(1)
    assert run.estimate_left(1) == pytest.approx(300.0 + progress.STARTUP_S)  # c has no work: no start-up
    assert "stage 2/3 b: 2m10s so far; about 5m30s left (estimate)" in line
    run.end(1, skipped=True)
    assert run.work["b"] == 0.0
