"""Elastic scale-out on a multi-node local cluster (`ray.cluster_utils.Cluster`, simulated nodes).

`synthesize` runs as its own driver process against the cluster, with an engine pool of (min 1, max 2)
actors of 2 CPUs each. The head has room for one actor only, so the pool can grow only onto a node added
during generation. Then that node is removed mid-generation (its actor dies with it) and a replacement
joins; Ray Data restarts the actor there and retries its batches. Every generation request must end up
exactly once in the output: kept as a message or set aside with a reason, none lost, none twice.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Enough work that generation outlasts the node changes: here the added node's actor was up and the node
# removed after ~530 of ~1,130 parts at 1,500 a trait; with 1,000 about 750 parts are made in all.
PER_TRAIT = 1000


def _alive_engines(address: str) -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a for a in actors if "ChatGenerator" in (a.get("class_name") or "")]


def _wait_for(what: str, predicate, driver: subprocess.Popen, log: Path, timeout: float = 240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert driver.poll() is None, f"the driver exited before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # Logical CPUs: 3 on the head = one 2-CPU engine actor + a CPU for the pipeline's light tasks. Its own
    # dashboard port: with the session's Ray (ray_local) already on 8265, the head's dashboard failed to bind and
    # the state API (_alive_engines) found no dashboard address in the cluster's GCS.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "object_store_memory": 512 * 1024 ** 2,
                                                      "dashboard_port": dashboard_port})
    try:
        yield c
    finally:
        c.shutdown()


def test_pool_grows_onto_an_added_node_and_survives_a_removed_one(cluster, tmp_path, repo, make_config):
    run_dir = tmp_path / "run"
    overrides = [f"run.output_dir={run_dir}", f"traits.path={repo / 'configs/traits/tiny.yaml'}",
                 f"ray.address={cluster.address}", f"synthesize.messages_per_trait={PER_TRAIT}",
                 "engine.actors.min=1", "engine.actors.max=2", "engine.batch_size=4", "engine.num_cpus_per_actor=2"]
    config = make_config(run_dir, *overrides)  # the same config the driver loads: validate it here too
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "driver.log"
    driver = subprocess.Popen([sys.executable, "-m", "rayjobs.synthesize", "--config", str(repo / "configs/tiny.yaml"),
                               *overrides], cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    work = run_dir / "messages" / "_work"
    parts = lambda: len(list(work.glob("part-*.parquet"))) if work.is_dir() else 0  # noqa: E731
    try:
        _wait_for("the first generated part", lambda: parts() >= 2, driver, log)  # seed questions + one batch
        assert len(_alive_engines(cluster.address)) == 1  # the head holds one engine actor, no more

        added = cluster.add_node(num_cpus=4)
        engines = _wait_for("the pool to grow onto the added node",
                            lambda: e if len(e := _alive_engines(cluster.address)) == 2 else None, driver, log)
        assert added.node_id in {e["node_id"] for e in engines}
        parts_before_removal = parts()

        cluster.remove_node(added, allow_graceful=False)  # its engine actor dies mid-generation
        cluster.add_node(num_cpus=4)  # a replacement node, where Ray restarts the lost actor
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert parts_before_removal < parts(), "the node was removed after generation had finished"

    from character.synthesis import expand_requests, seed_question_rows
    from character.store import StageOutput
    from character.traits import load_constitution

    traits = load_constitution(config.traits.path).traits
    expected = [r["request_id"] for t in traits
                for r in expand_requests({"trait_json": t.model_dump_json()}, per_trait=PER_TRAIT,
                                         kinds=list(config.synthesize.kinds), seed=config.run.seed,
                                         adversarial=config.evaluate.adversarial_per_trait)]
    expected += seed_question_rows(traits).column("request_id").to_pylist()
    out = StageOutput(str(run_dir), "messages")
    assert out.complete(), text[-3000:]
    kept = out.read(columns=["request_id"]).column("request_id").to_pylist()
    set_aside = out.read("rejected", columns=["row_id"]).column("row_id").to_pylist() if out.part_files("rejected") else []
    produced = kept + set_aside
    assert len(produced) == len(set(produced)), "a request appears twice"
    assert sorted(produced) == sorted(expected), "a request was lost"
