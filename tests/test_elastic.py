"""Elastic scale-out on a simulated multi-node cluster: the engine actor pool grows when a node joins,
and a node removed mid-generation loses and duplicates no row."""
import json
import subprocess
import sys

import pytest

from character import schemas
from character.store import StageOutput

pytestmark = pytest.mark.slow


def test_actor_pool_grows_and_survives_a_lost_node(tmp_path, repo):
    proc = subprocess.run([sys.executable, str(repo / "tests" / "elastic_driver.py"), str(tmp_path),
                           str(repo / "configs" / "tiny.yaml")], cwd=repo, capture_output=True, text=True,
                          timeout=1200, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(lines[-1])
    assert seen["errors"] == [] and seen["complete"], seen
    assert seen["node_added"] and seen["max_engines"] >= 2, seen  # the pool grew with the cluster
    assert seen["node_removed"], seen
    out = StageOutput(str(tmp_path), "messages")
    kept = out.read().to_pylist()
    rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist()
    ids = [r["request_id"] for r in kept] + [r["row_id"] for r in rejected]
    assert len(ids) == len(set(ids)) == 3 * 120 + 6  # every request exactly once, none lost
