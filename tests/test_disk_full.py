"""A full disk met by a stage's writers or by the tracking store's creation: one line naming the file, exit 1,
and a rerun once there is room that completes with every id once (issue 31).

The drill (character.core.space.FULL_DISK_ENV) makes the matching writes fail with ENOSPC, inside the write;
batch gates (character.inference.gates) land the fault after two batches are committed, by construction."""
import os
import subprocess
import sys

import pytest
from processes import kill_tree

from character.core import schemas
from character.core.space import FULL_DISK_ENV
from character.core.store import StageOutput
from character.inference import gates

pytestmark = pytest.mark.slow

PER_TRAIT = 20  # 3 x (20 + 4) generation requests in batches of 8: the disk fills after two batches
COMMITTED = 2


def _stage_cmd(repo, out_dir):
    return [sys.executable, "-m", "character.pipeline.cli", "synthesize", "--config", str(repo / "configs/tiny.yaml"),
            f"run.output_dir={out_dir}", f"synthesize.messages_per_trait={PER_TRAIT}", "engine.batch_size=8",
            "synthesize.sampling.max_tokens=48", "tracking.backend=mlflow"]


def _no_traceback(proc_or_text) -> str:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stdout + proc_or_text.stderr
    assert "Traceback" not in text, text[-4000:]
    return text


def test_full_disk_is_one_line_and_a_rerun_completes(tmp_path, repo):
    out = StageOutput(str(tmp_path), "messages")
    flag = tmp_path / "disk-full"
    env = {k: v for k, v in os.environ.items() if k not in (gates.GATES_ENV, FULL_DISK_ENV)}
    env.update({"RAY_ADDRESS": "", FULL_DISK_ENV: str(flag)})

    # 1. No room for the tracking store: stopped before any compute, the store not half made.
    flag.write_text("mlflow.db")
    first = subprocess.run(_stage_cmd(repo, tmp_path), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1
    line = _no_traceback(first).strip().splitlines()[-1]
    db = tmp_path / "mlflow" / "mlflow.db"
    assert line.startswith(f"synthesize: no space left writing {db} (") and line.endswith(
        " bytes free); free space and rerun: what is written is kept"), line
    assert not db.exists() and not list((tmp_path / "mlflow").glob(".tmp-*"))

    # 2. Room for the store; the stage's own writes fill the disk after two committed batches.
    flag.write_text(f"{tmp_path}/messages/")
    flag.rename(tmp_path / "disk-full-later")
    folder = tmp_path / "gates"
    log = open(tmp_path / "second.log", "w")
    proc = subprocess.Popen(_stage_cmd(repo, tmp_path), cwd=repo, env={**env, **gates.prepare(folder, [COMMITTED])},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        gates.wait_done(folder, COMMITTED, proc, tmp_path / "second.log")
        (tmp_path / "disk-full-later").rename(flag)  # the disk is full from here on
        gates.open_hold(folder, COMMITTED)
        assert proc.wait(timeout=300) == 1
    finally:
        kill_tree(proc)
    text = _no_traceback((tmp_path / "second.log").read_text())
    line = text.strip().splitlines()[-1]
    assert line.startswith(f"synthesize: no space left writing {tmp_path}/messages/"), text[-3000:]
    assert line.endswith(" bytes free); free space and rerun: what is written is kept")
    assert ".tmp-" not in line and not list(tmp_path.glob("messages/**/.tmp-*"))
    assert not out.complete()
    kept_before = out.read("_work", schema=schemas.RAW_MESSAGES)
    assert kept_before.num_rows >= COMMITTED * 8  # what was written is kept

    # 3. Room again: the rerun resumes and every request is there once.
    flag.unlink()
    third = subprocess.run(_stage_cmd(repo, tmp_path), cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert out.complete()
    kept = out.read().to_pylist()
    rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist()
    request_ids = [r["request_id"] for r in kept] + [r["row_id"] for r in rejected]
    assert len(request_ids) == len(set(request_ids)) == 3 * (PER_TRAIT + 4) + 6
    final = out.read("_work", schema=schemas.RAW_MESSAGES)
    assert final.num_rows == len(set(final.column("request_id").to_pylist())) == 3 * (PER_TRAIT + 4) + 6
    before = dict(zip(kept_before.column("request_id").to_pylist(), kept_before.column("raw_text").to_pylist()))
    after = dict(zip(final.column("request_id").to_pylist(), final.column("raw_text").to_pylist()))
    assert all(after[k] == v for k, v in before.items())  # committed work was kept, not redone
