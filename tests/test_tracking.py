"""Experiment tracking (character/tracking/runs.py) on real MLflow and W&B (offline) stores, with a stage stand-in that
writes a real stage output, so the run bookkeeping is tested without Ray; progress lines; `character compare`.
The Ray Train side (rank 0's per-step metrics across a restart) is in test_train_pm.py and test_train_ppo.py,
the whole pipeline's tracking in test_pipeline.py."""
from __future__ import annotations

import io
import json
import re

import pytest

from character.execution.runtime import StageResult
from character.core.store import StageOutput


def _stage(stage: str = "synthesize", output: str = "messages", fail: bool = False, files: dict | None = None):
    """A stage's `run`, tracked as the real ones are: writes stats.json (and `files`) and _SUCCESS, or fails
    half-way."""
    from character.execution.runtime import skip_or_reset
    from character.tracking.runs import tracked

    @tracked(stage, output)
    def run(config, force=False):
        out = StageOutput(config.run.output_dir, output)
        if (skipped := skip_or_reset(out, force)) is not None:
            return skipped
        out.write_json("stats.json", {"kept": 5})
        for name, payload in (files or {}).items():
            out.write_json(name, payload)
        if fail:
            raise RuntimeError("killed half-way")
        result = StageResult(output, out.uri, rows_in=7, rows_out=5, seconds=1.5)
        result.drops.update({"too_short": 2})
        out.mark_success(result.summary())
        return result
    return run


def _client(run_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{run_dir}/mlflow/mlflow.db")


def _runs(client, **tags):
    experiment = client.get_experiment_by_name("character")
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment.experiment_id], query)


def test_a_stage_logs_counts_and_files_into_a_nested_run_and_a_skipped_stage_logs_nothing(tmp_path, make_config):
    config = make_config(tmp_path, "tracking.backend=mlflow")
    _stage()(config)
    client = _client(tmp_path)
    (parent,) = _runs(client, **{"character.stage": "run"})
    (stage,) = _runs(client, **{"character.stage": "synthesize"})
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage.info.status == "FINISHED"
    assert stage.data.metrics["stage.rows_in"] == 7 and stage.data.metrics["stage.rows_out"] == 5
    assert stage.data.metrics["stage.dropped"] == 2 and stage.data.metrics["stage.drops.too_short"] == 2
    assert parent.info.status == "FINISHED"
    assert parent.data.params["synthesize.messages_per_trait"] == str(config.synthesize.messages_per_trait)
    assert parent.data.params["model.name"] == "tiny-llama" and stage.data.params["tracking.backend"] == "mlflow"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", parent.data.tags["mlflow.source.git.commit"])
    assert client.get_run(parent.info.run_id).data.metrics["synthesize.seconds"] == 1.5
    files = {a.path for a in client.list_artifacts(stage.info.run_id)}
    assert files == {"stats.json"}
    assert _stage()(config).skipped
    assert len(_runs(client, **{"character.stage": "synthesize"})) == 1  # complete: no second run


def test_the_evaluation_numbers_go_to_the_stage_and_the_run_directory(tmp_path, make_config):
    interval = {"mean": 0.625, "lo": 0.5, "hi": 0.75}
    summary = {"samples": 2, "interval": "t, clustered", "judge": "model:x",
               "overall": {"held_out": {"split": "held_out", "n_messages": 4, "win_rate": interval,
                                        "length_base": {"mean": 9.0, "lo": None, "hi": None}}},
               "groups": {"honesty/held_out": {"trait": "honesty", "split": "held_out", "pm_delta": interval}}}
    _stage("evaluate", "eval", files={"summary.json": summary})(make_config(tmp_path, "tracking.backend=mlflow"))
    client = _client(tmp_path)
    (stage,) = _runs(client, **{"character.stage": "evaluate"})
    (parent,) = _runs(client, **{"character.stage": "run"})
    expected = {"eval.overall.held_out.n_messages": 4, "eval.groups.honesty/held_out.pm_delta.lo": 0.5,
                **{f"eval.overall.held_out.win_rate.{k}": v for k, v in interval.items()},
                **{f"eval.groups.honesty/held_out.pm_delta.{k}": v for k, v in interval.items()}}
    assert {k: v for k, v in stage.data.metrics.items() if k.startswith("eval.")} == expected
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("eval.")} == expected
    assert {a.path for a in client.list_artifacts(stage.info.run_id)} == {"stats.json", "summary.json"}


def test_an_interrupted_stage_continues_its_run_and_a_forced_one_starts_another(tmp_path, make_config):
    config = make_config(tmp_path, "tracking.backend=mlflow")
    with pytest.raises(RuntimeError, match="half-way"):
        _stage(fail=True)(config)
    client = _client(tmp_path)
    (failed,) = _runs(client, **{"character.stage": "synthesize"})
    assert failed.info.status == "FAILED"
    _stage()(config)  # resumed
    (resumed,) = _runs(client, **{"character.stage": "synthesize"})
    assert resumed.info.run_id == failed.info.run_id and resumed.info.status == "FINISHED"
    _stage()(config, force=True)
    runs = _runs(client, **{"character.stage": "synthesize"})
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len(_runs(client, **{"character.stage": "run"})) == 1  # one run per run directory


def test_step_metrics_after_a_restart_are_not_logged_twice(tmp_path, make_config):
    from character.tracking import runs as tracking

    config = make_config(tmp_path, "tracking.backend=mlflow")
    handle = tracking.open_stage(config, "train-pm", force=False)
    first = tracking.StepLog(config, "pm", handle, enabled=True)
    for step in range(1, 7):
        first.log({"train_loss": 1.0 / step, "flag": True, "name": "x"}, step)
    first.close()
    again = tracking.StepLog(config, "pm", handle, enabled=True)  # a restart from the step-4 checkpoint
    assert again.after == 6
    for step in range(5, 11):
        again.log({"train_loss": 1.0 / step}, step)
    assert tracking.StepLog(config, "pm", handle, enabled=False).tracker is None  # other ranks: nothing
    history = _client(tmp_path).get_metric_history(handle.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 11))
    assert [m.value for m in history] == pytest.approx([1.0 / s for s in range(1, 11)])
    assert (tmp_path / "tensorboard" / "pm").is_dir()


def test_no_tracking_writes_nothing(tmp_path, make_config):
    _stage()(make_config(tmp_path, "tracking.backend=none"))
    assert StageOutput(str(tmp_path), "messages").complete()
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "_tracking").exists()
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_writes_a_run_directory_with_the_stage_and_its_steps(tmp_path, make_config, monkeypatch):
    from character.tracking import runs as tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config(tmp_path, "tracking.backend=wandb", "tracking.experiment=character-test")
    _stage()(config)
    record = json.loads((tmp_path / "_tracking" / "synthesize.json").read_text())
    assert record["backend"] == "wandb" and record["finished"] is True
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{record['run_id']}"))
    assert runs and (runs[0] / f"run-{record['run_id']}.wandb").stat().st_size > 0
    handle = tracking.open_stage(config, "train-pm", force=False)
    steps = tracking.StepLog(config, "pm", handle, enabled=True)
    steps.log({"train_loss": 0.5}, 1)
    steps.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{handle.run_id}/run-{handle.run_id}.wandb"))


def test_progress_line_prints_a_line_per_tenth_in_a_log():
    from character.tracking.progress import ProgressLine

    out = io.StringIO()
    with ProgressLine("respond: generate", 200, interactive=False, file=out) as bar:
        for _ in range(40):
            bar.update(5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("respond: generate:  10% 20/200 rows [") and "left" in lines[0]
    assert lines[-1].startswith("respond: generate: 100% 200/200 rows")


def test_step_clock_prints_the_first_step_and_each_tenth(capfd):
    from character.training.stepping import StepClock

    clock = StepClock("train-pm step", 0, 50, enabled=True)
    for done in range(1, 51):
        clock.tick(done)
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[train-pm step]")]
    assert [int(line.split()[2].split("/")[0]) for line in printed] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]


def test_run_ends_with_a_table_of_stages():
    from character.tracking.progress import stage_table

    table = stage_table([{"stage": "synthesize", "rows_in": 40, "rows_out": 31, "seconds": 12.04, "skipped": False},
                         {"stage": "train-pm", "rows_in": 0, "rows_out": 0, "seconds": 0, "skipped": True}])
    head, first, second = table.splitlines()
    assert head.split() == ["stage", "rows", "in", "rows", "out", "seconds", "status"]
    assert first.split() == ["synthesize", "40", "31", "12.0", "done"]
    assert second.split() == ["train-pm", "-", "-", "-", "skipped", "(complete)"]


def test_a_half_made_store_is_moved_aside_and_a_store_with_runs_is_kept(tmp_path, make_config, capsys):
    """A store whose creation stopped midway (here: its schema version gone, as a migration cut short by a full
    disk leaves it) blocked every rerun; it holds no runs, so it is moved aside and built anew. A store that
    holds runs is never touched."""
    import sqlite3

    from character.tracking.backends import ensure_local_store, half_made_store

    config = make_config(tmp_path, "tracking.backend=mlflow")
    ensure_local_store(config)
    db = tmp_path / "mlflow" / "mlflow.db"
    assert db.is_file() and not half_made_store(str(db)) and not list(db.parent.glob(".tmp-*"))
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM alembic_version")
    assert half_made_store(str(db))
    _stage()(config)
    assert "was left half-made (no runs, schema not complete): moved to" in capsys.readouterr().out
    assert len(list(db.parent.glob("mlflow.db.broken-*"))) == 1
    (run,) = _runs(_client(tmp_path), **{"character.stage": "synthesize"})
    assert run.info.status == "FINISHED"
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM alembic_version")
    assert not half_made_store(str(db))  # it holds runs: MLflow's own error says what to do, nothing is moved
