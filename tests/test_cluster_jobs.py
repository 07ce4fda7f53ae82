"""A real local Ray cluster with token authentication: `ray job submit` of the tiny pipeline succeeds with
the token and is refused without it; the cluster is shut down at the end, also on failure."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")

# The tiny pipeline, made smaller still: every stage runs, each on a handful of rows.
SMALL = ["synthesize.messages_per_trait=4", "respond.candidates=2", "pm.epochs=1", "pm.micro_batch_size=2",
         "train.checkpoint_every=2", "ppo.iterations=2", "ppo.prompts_per_iteration=4", "ppo.minibatch_size=2",
         "ppo.eval_prompts=4", "ppo.eval_every=2", "evaluate.max_messages_per_trait=1",
         "evaluate.adversarial_per_trait=1", "evaluate.samples=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_cluster(tmp_path):
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--object-store-memory=536870912", f"--temp-dir={tmp_path / 'ray'}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up within 120 s")
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the cluster's processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_submit_pipeline_with_token_and_refuse_without(token_cluster, tmp_path, repo):
    url, env = token_cluster
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    stranger["HOME"] = str(tmp_path / "nobody")  # no ~/.ray/auth_token either
    refused = subprocess.run([RAY, "job", "submit", "--address", url, "--", "python", "-c", "print('hi')"],
                             env=stranger, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()

    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(repo), "--",
         "python", "-m", "rayjobs.pipeline", "--config", "configs/tiny.yaml", f"run.output_dir={run_dir}", *SMALL],
        env=env, capture_output=True, text=True, timeout=1500)
    log = submit.stdout[-4000:] + submit.stderr[-2000:]
    assert submit.returncode == 0, log
    assert "succeeded" in submit.stdout.lower(), log
    for stage in ("messages", "responses", "preferences", "pm", "policy", "eval", "report"):
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    assert (run_dir / "report" / "index.html").stat().st_size > 1000
    jobs = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
    assert "SUCCEEDED" in jobs.stdout
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(summary["overall"]) == {"held_out", "adversarial"}
