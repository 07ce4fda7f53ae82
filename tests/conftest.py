"""Shared fixtures: one local Ray for the in-process stage tests, tiny configs in temporary run dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): it sees a
# finished, failed or restarted group only at the next poll, up to 2 s late each time on runs of seconds; the
# tests poll at 0.5 s (set before any Ray starts: the local Rays, the test clusters and the stage subprocesses
# inherit it; the fault drills wait for the controller to commit the last checkpoint, whatever the interval:
# checkpoints.maybe_inject_fault).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray sized for a 2-core box (logical overcommit, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_config(output_dir: Path | str, *overrides: str):
    """configs/tiny.yaml in `output_dir`. Untracked unless an override sets tracking.backend: a new MLflow store
    costs ~2 s per run directory and most tests make several; the tracking tests, the PM and PPO resume
    tests and the pipeline (the default, mlflow) track."""
    from character.core.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"run.output_dir={output_dir}", f"traits.path={REPO / 'configs/traits/tiny.yaml'}",
                        "tracking.backend=none", *overrides])


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


# Preferences labelled by the rule judge ("fewer words is better") on tiny-model candidates.
RULE_PAIRS = ["judge.kind=rule", "judge.rule.type=length", "judge.rule.target_words=0", "judge.rule.temperature=1.0",
              "rank.tie_margin=0.3"]


@pytest.fixture(scope="session")
def preferences(tmp_path_factory, ray_local):
    """Rule-labelled pairs from 100 messages per trait (synthesize, respond, rank), shared by the PM and DPO
    tests: returns the preferences/ folder (messages/ and responses/ beside it)."""
    from character.stages import rank, respond, synthesize

    root = tmp_path_factory.mktemp("pair-data")
    config = tiny_config(root, "synthesize.messages_per_trait=100", *RULE_PAIRS)
    for stage in (synthesize, respond, rank):
        stage.run(config)
    return root / "preferences"
