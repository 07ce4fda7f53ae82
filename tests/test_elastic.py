"""Elastic scale-out on a multi-node local cluster (`ray.cluster_utils.Cluster`, simulated nodes).

`synthesize` runs as its own driver process against the cluster, with an engine pool of (min 1, max 2)
actors of 2 CPUs each. The head has room for one actor only, so the pool can grow only onto a node added
during generation. Then that node is removed mid-batch (its actor dies with it) and a replacement joins;
Ray Data restarts the actor there and retries its batches. Every generation request must end up exactly
once in the output (kept as a message or set aside with a reason, none lost, none twice), with the texts
of an undisturbed run.

The node changes land inside the stage by construction, whatever the machine's speed or the workload's
size: batch gates (character.inference.gates) hold every batch after the first until the pool has grown, and every
batch after the third until the added node, which has committed a batch and holds the next, is gone.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from character.inference import gates

pytestmark = pytest.mark.slow

# 3 x (40 + 4) requests in batches of 4, one batch at a time per actor: 33 batches, of which the holds need 5.
PER_TRAIT = 40
GROWN, REMOVED = 1, 3  # batches after the first wait for the added node; after the third, for its removal
WAIT_S = 240.0  # a bound for a broken run only: every wait below is for an event the gates make happen


def _alive_engines(address: str) -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a for a in actors if "ChatGenerator" in (a.get("class_name") or "")]


def _wait_for(what: str, predicate, driver: subprocess.Popen, log: Path, timeout: float = WAIT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert driver.poll() is None, f"the driver exited before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
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


def _overrides(repo, run_dir: Path, cluster) -> list[str]:
    return [f"run.output_dir={run_dir}", f"traits.path={repo / 'configs/traits/tiny.yaml'}",
            f"ray.address={cluster.address}", f"synthesize.messages_per_trait={PER_TRAIT}", "engine.actors.min=1",
            "engine.actors.max=2", "engine.batch_size=4", "engine.concurrent_batches=1", "engine.num_cpus_per_actor=2"]


def _driver(repo, run_dir: Path, cluster, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rayjobs.synthesize", "--config", str(repo / "configs/tiny.yaml"),
                             *_overrides(repo, run_dir, cluster)],
                            cwd=repo, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _raw_texts(run_dir: Path) -> dict[str, str]:
    from character.core import schemas
    from character.core.store import StageOutput

    raw = StageOutput(str(run_dir), "messages").read("_work", schema=schemas.RAW_MESSAGES)
    return dict(zip(raw.column("request_id").to_pylist(), raw.column("raw_text").to_pylist()))


def test_pool_grows_onto_an_added_node_and_survives_a_removed_one(cluster, tmp_path, repo, make_config):
    run_dir, folder = tmp_path / "run", tmp_path / "gates"
    base_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", gates.GATES_ENV)}
    config = make_config(run_dir, *_overrides(repo, run_dir, cluster))  # the driver's config: validate it here too
    log = tmp_path / "driver.log"
    driver = _driver(repo, run_dir, cluster, {**base_env, **gates.prepare(folder, [GROWN, REMOVED])}, log)
    try:
        _wait_for("the first batch", lambda: gates.done(folder), driver, log)
        assert len(_alive_engines(cluster.address)) == 1  # the head holds one engine actor, no more

        added = cluster.add_node(num_cpus=4)
        engines = _wait_for("the pool to grow onto the added node",
                            lambda: e if len(e := _alive_engines(cluster.address)) == 2 else None, driver, log)
        assert added.node_id in {e["node_id"] for e in engines}
        added_claims = lambda: {n for n, c in gates.claims(folder).items() if c["node_id"] == added.node_id}  # noqa: E731
        _wait_for("the added node's actor to take a batch", added_claims, driver, log)
        gates.open_hold(folder, GROWN)

        def committed_one_and_holds_the_next():
            mine, finished = added_claims(), gates.done(folder)
            return mine & finished and any(n > REMOVED and n not in finished for n in mine)

        _wait_for("the added node's actor to commit a batch and hold the next", committed_one_and_holds_the_next,
                  driver, log)
        lost = {n for n in added_claims() if n not in gates.done(folder)}
        cluster.remove_node(added, allow_graceful=False)  # its engine actor dies mid-batch
        cluster.add_node(num_cpus=4)  # a replacement node, where Ray restarts the lost actor
        gates.open_hold(folder, REMOVED)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    # The removed node's batch died with it, and every other batch (its retry included) was committed.
    assert not lost & gates.done(folder) and set(gates.claims(folder)) == gates.done(folder) | lost

    from character.stages.synthesize import expand_requests, seed_question_rows
    from character.core.store import StageOutput
    from character.core.traits import load_constitution

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

    # The same texts as a run that no node change disturbed (per-request seeds: who generated what is moot).
    undisturbed_dir, undisturbed_log = tmp_path / "undisturbed", tmp_path / "undisturbed.log"
    undisturbed = _driver(repo, undisturbed_dir, cluster, base_env, undisturbed_log)
    assert undisturbed.wait(timeout=600) == 0, undisturbed_log.read_text()[-3000:]
    assert _raw_texts(run_dir) == _raw_texts(undisturbed_dir)
