"""A stage killed midway (SIGKILL to the driver and its local Ray) and rerun loses and repeats nothing."""
import os
import subprocess
import sys

import pytest
from processes import kill_tree

from character.inference import gates
from character.core import schemas
from character.core.store import StageOutput

pytestmark = pytest.mark.slow

PER_TRAIT = 60  # 3 x (60 + 4) generation requests in batches of 8: the first run is killed after two batches
COMMITTED = 2  # batch gates (character.inference.gates) hold every later batch, so the kill lands midway by construction


def _stage_cmd(repo, out_dir, *overrides):
    return [sys.executable, "-m", "rayjobs.synthesize", "--config", str(repo / "configs/tiny.yaml"),
            f"run.output_dir={out_dir}", f"synthesize.messages_per_trait={PER_TRAIT}", "engine.batch_size=8",
            "synthesize.sampling.max_tokens=64", *overrides]


def test_synthesize_killed_midway_resumes_exactly_once(tmp_path, repo):
    out = StageOutput(str(tmp_path), "messages")
    env = {k: v for k, v in os.environ.items() if k != gates.GATES_ENV}
    env["RAY_ADDRESS"] = ""
    folder = tmp_path / "gates"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_stage_cmd(repo, tmp_path), cwd=repo, env={**env, **gates.prepare(folder, [COMMITTED])},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        gates.wait_done(folder, COMMITTED, proc, tmp_path / "first.log")
    finally:
        kill_tree(proc)  # the driver, its local Ray and Ray's workers, all gone when it returns
    assert not out.complete()
    assert gates.done(folder) == set(range(1, COMMITTED + 1))  # the held batches died with the driver
    first = out.read("_work", schema=schemas.RAW_MESSAGES)
    first_texts = dict(zip(first.column("request_id").to_pylist(), first.column("raw_text").to_pylist()))
    assert 6 < len(first_texts) <= 6 + COMMITTED * 8  # the seed questions and two batches of at most 8, no more

    second = subprocess.run(_stage_cmd(repo, tmp_path), cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert out.complete()
    kept = out.read().to_pylist()
    rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist()
    request_ids = [r["request_id"] for r in kept] + [r["row_id"] for r in rejected]
    assert len(request_ids) == len(set(request_ids)) == 3 * (PER_TRAIT + 4) + 6  # every request exactly once
    message_ids = [r["message_id"] for r in kept]
    assert len(message_ids) == len(set(message_ids))
    final = out.read("_work", schema=schemas.RAW_MESSAGES)
    final_texts = dict(zip(final.column("request_id").to_pylist(), final.column("raw_text").to_pylist()))
    assert all(final_texts[k] == v for k, v in first_texts.items())  # committed work was kept, not redone
    assert final.num_rows == len(final_texts) == 3 * (PER_TRAIT + 4) + 6  # and no request generated twice
    stats = out.read_json("stats.json")
    assert stats["new_tokens_this_run"] < (3 * PER_TRAIT) * 64  # the rerun generated only what was missing
