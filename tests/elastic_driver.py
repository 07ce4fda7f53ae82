"""Driver for test_elastic.py (its own process: it owns a multi-node `ray.cluster_utils.Cluster`).

Runs `synthesize` on a cluster whose head has room for one engine actor; once generation is under way it
adds a node (the Ray Data actor pool grows to two engines), then removes that node mid-generation.
Prints one JSON line with what it saw."""
import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from character.config import load_config
from character.stages import synthesize
from character.store import StageOutput


def alive_engines() -> int:
    actors = ray._private.state.actors().values()
    return sum(1 for a in actors if a["State"] == "ALIVE" and "ChatGenerator" in a.get("ActorClassName", "")
               and "MapWorker" in a.get("ActorClassName", ""))


def main(out_dir: str, config_path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 * 2**20})
    ray.init(address=cluster.address)
    config = load_config(config_path, [
        f"run.output_dir={out_dir}", "engine.actors.min=1", "engine.actors.max=2", "engine.num_cpus_per_actor=1",
        "engine.batch_size=8", "model.name=random-llama-5m", "synthesize.messages_per_trait=120",
        "synthesize.sampling.max_tokens=48", "synthesize.drop_truncated=false"])
    errors = []
    worker = threading.Thread(target=lambda: _run(config, errors))
    worker.start()
    out = StageOutput(out_dir, "messages")
    seen_max, added, removed = 0, None, False
    deadline = time.time() + 900
    while worker.is_alive() and time.time() < deadline:
        generated = [p for p in out.part_files("_work") if "seed-questions" not in p]
        seen_max = max(seen_max, alive_engines())
        if added is None and len(generated) >= 1:
            added = cluster.add_node(num_cpus=1, object_store_memory=300 * 2**20)
        elif added is not None and not removed and seen_max >= 2 and len(generated) >= 4:
            cluster.remove_node(added)  # the second engine goes away mid-generation
            removed = True
        time.sleep(0.5)
    worker.join(timeout=60)
    print(json.dumps({"max_engines": seen_max, "node_added": added is not None, "node_removed": removed,
                      "errors": errors, "complete": out.complete()}), flush=True)
    ray.shutdown()
    cluster.shutdown()


def _run(config, errors):
    try:
        synthesize.run(config)
    except Exception as exc:  # reported to the test
        errors.append(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
