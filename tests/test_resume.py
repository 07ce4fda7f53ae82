"""A stage killed midway (SIGKILL to the driver and its local Ray) and rerun loses and repeats nothing."""
import os
import signal
import subprocess
import sys
import time

import pytest

from character import schemas
from character.store import StageOutput

pytestmark = pytest.mark.slow

PER_TRAIT = 60  # 3 x (60 + 4) generation requests in batches of 8: the first run is killed after two batches


def _stage_cmd(repo, out_dir, *overrides):
    return [sys.executable, "-m", "rayjobs.synthesize", "--config", str(repo / "configs/tiny.yaml"),
            f"run.output_dir={out_dir}", f"synthesize.messages_per_trait={PER_TRAIT}", "engine.batch_size=8",
            "synthesize.sampling.max_tokens=64", *overrides]


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_synthesize_killed_midway_resumes_exactly_once(tmp_path, repo):
    out = StageOutput(str(tmp_path), "messages")
    env = {**os.environ, "RAY_ADDRESS": ""}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_stage_cmd(repo, tmp_path), cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            generated = [p for p in out.part_files("_work") if "seed-questions" not in p]
            if len(generated) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("no generation parts committed within 300 s")
    finally:
        _kill_group(proc)
    assert not out.complete()
    first = out.read("_work", schema=schemas.RAW_MESSAGES)
    first_texts = dict(zip(first.column("request_id").to_pylist(), first.column("raw_text").to_pylist()))
    assert 0 < len(first_texts) < 3 * (PER_TRAIT + 4) + 6  # interrupted midway (4 adversarial requests per trait for evaluation)

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
