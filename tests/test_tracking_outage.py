"""A tracking server that goes down mid-stage (issue 31): the stage goes on, what it logs is kept under
<run>/_tracking/pending/ and sent once the server is back, every step once; an unreachable server at start is
a config error. A real `mlflow server` on a loopback port, killed (SIGKILL) and restarted on the same store."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


class MlflowServer:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder}/store.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.folder, stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 90  # a bound for a broken start only
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, (self.folder / "server.log").read_text()
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    running = MlflowServer(tmp_path / "server")
    running.start()
    yield running
    running.kill()


def _history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _pending(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "_tracking" / "pending").glob("*/*/*.json"))


def test_steps_logged_through_an_outage_reach_the_server_once(tmp_path, make_config, server, monkeypatch, capfd):
    from character.tracking import outage
    from character.tracking import runs as tracking

    monkeypatch.setattr(outage, "RETRY_AFTER_S", 0.0)
    monkeypatch.setattr(outage, "_warned", set())
    monkeypatch.setattr(outage, "_down_since", {})
    run_dir = tmp_path / "run"
    config = make_config(run_dir, "tracking.backend=mlflow", f"tracking.uri={server.uri}")
    handle = tracking.open_stage(config, "train-pm", force=False)
    log = tracking.StepLog(config, "pm", handle, enabled=True)
    for step in range(1, 4):
        log.log({"train_loss": 1.0 / step}, step)
    server.kill()
    for step in range(4, 7):
        log.log({"train_loss": 1.0 / step}, step)  # the stage goes on
    assert len(_pending(run_dir)) == 3
    assert capfd.readouterr().out.count(f"[tracking] warning: {server.uri} did not answer") == 1  # said once
    server.start()
    log.log({"train_loss": 1.0 / 7}, 7)  # the first call that reaches it sends the kept ones first
    assert "answers again: sent 3 kept record(s)" in capfd.readouterr().out
    assert _history(server.uri, handle.run_id, "train_loss") == list(range(1, 8)) and not _pending(run_dir)

    # A call that failed after the server stored it is kept all the same: sent again, it adds nothing.
    kept = run_dir / "_tracking" / "pending" / handle.run_id / "driver-1" / "00000000000000000001-000001.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps({"op": "log_metrics", "args": [{"train_loss": 0.5, "other": 2.0}, 2, 1]}))
    assert outage.replay_pending(lambda run_id: tracking._handle(config, "x", run_id), str(run_dir)) == 1
    assert _history(server.uri, handle.run_id, "train_loss") == list(range(1, 8))
    assert _history(server.uri, handle.run_id, "other") == [2] and not _pending(run_dir)


def test_an_unreachable_server_at_start_is_a_config_error(tmp_path, repo, capsys):
    from character.pipeline import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    code = cli.main(["respond", "--config", str(repo / "configs/tiny.yaml"), f"run.output_dir={tmp_path}",
                     f"tracking.uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and f"tracking.uri http://127.0.0.1:{port} does not answer (" in err
    assert "start the server, or set tracking.backend: none" in err and not (tmp_path / "_lock").exists()


def test_train_pm_completes_through_a_server_killed_and_restarted(tmp_path, preferences, make_config, server,
                                                                 monkeypatch):
    """Rank 0 is held at steps 4, 8 and 10 (a drill in character.training.checkpoints.maybe_inject_fault).
    1. Killed at step 4, restarted at step 8 and given the retry interval: the worker sends what it kept at its
       next step (at step 10 the history is 1..10 and nothing is kept).
    2. Killed again at step 10 and left down: the stage completes all the same, its last steps and the closing of
       its run kept. Restarted, the next stage's start sends them: steps 1..12 each once, the run FINISHED."""
    import shutil

    from conftest import RULE_PAIRS
    from character.stages import train_pm
    from character.tracking import outage

    monkeypatch.setattr(outage, "_down_since", {})
    shutil.copytree(preferences, tmp_path / "preferences")
    (tmp_path / "_train").mkdir()
    (tmp_path / "_train" / "inject_fault.json").write_text(json.dumps({"hold": [4, 8, 10]}))
    config = make_config(tmp_path, *RULE_PAIRS, "pm.score_pairs=false", "pm.max_steps=12", "pm.micro_batch_size=8",
                         "train.checkpoint_every=6", "tracking.backend=mlflow", f"tracking.uri={server.uri}")
    outcome: dict = {}
    stage = threading.Thread(target=lambda: outcome.update(result=train_pm.run(config)), daemon=True)
    stage.start()

    def at(step: int) -> None:
        deadline = time.time() + 600  # a bound for a broken run only
        while not (tmp_path / "_train" / f"held-{step}").exists():
            assert stage.is_alive() and time.time() < deadline, f"train-pm never reached step {step}"
            time.sleep(0.1)

    def release(step: int) -> None:
        (tmp_path / "_train" / f"release-{step}").touch()

    try:
        _kill_and_restart(tmp_path, config, server, stage, outcome, at, release)
    finally:
        # A failed check must not leave rank 0 held: the run would keep its Ray Train workers and their CPUs, and
        # every later training test would wait for them forever (seen on an overloaded box: held at step 8).
        for step in (4, 8, 10):
            release(step)
        stage.join(timeout=600)


def _kill_and_restart(tmp_path, config, server, stage, outcome, at, release) -> None:
    from mlflow.tracking import MlflowClient

    from character.tracking import outage
    from character.tracking import runs as tracking

    at(4)
    server.kill()
    release(4)
    at(8)
    assert _pending(tmp_path), "the steps logged while the server was down were not kept"
    server.start()
    time.sleep(outage.RETRY_AFTER_S + 1)  # the worker's next call tries the server again
    release(8)
    at(10)
    (run_id,) = {p.parent.parent.name for p in (tmp_path / "_tracking" / "pending").glob("*/*/*")} or {None}
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("character").experiment_id],
                                "tags.`character.stage` = 'train-pm'")
    assert _history(server.uri, run.info.run_id, "train_loss") == list(range(1, 11)) and run_id is None
    server.kill()
    release(10)
    stage.join(timeout=600)
    assert "result" in outcome, "train-pm did not complete with its tracking server down"
    assert _pending(tmp_path)
    server.start()
    tracking.open_stage(config, "train-ppo", force=False)  # the next stage
    assert not _pending(tmp_path)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "eval_accuracy" in run.data.metrics
    assert _history(server.uri, run.info.run_id, "train_loss") == list(range(1, 13))
