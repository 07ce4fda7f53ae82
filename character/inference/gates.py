"""Batch gates for tests and fault drills: an event lands inside a generation stage by construction.

A test that adds a node, removes one or kills a driver while a stage generates must not race the stage:
sized to outlast the event on one machine, the workload is too small on a faster one. With
`CHARACTER_TEST_GATES=<folder>` in a stage driver's environment (it reaches the engine actors through their
runtime_env: character.inference.engine.engine_env), every generation batch an engine actor runs is paced:

1. it claims the next batch number n: the exclusive file `<folder>/claim-<n>`, holding the claimant's
   {"node_id", "pid"}. Numbers count batches across every actor, node and retry that share the folder;
2. for each k in `<folder>/holds.json` (a list of ints, written by the test before the run) with n > k it
   waits until `<folder>/open-<k>` exists;
3. it generates and commits the batch, then writes `<folder>/done-<n>`.

So a test knows which batches are committed and which actor, on which node, holds which batch, and it opens
a hold once its event has happened: nothing sleeps, nothing depends on how long a batch takes. Unset (every
real run), the gate costs one environment lookup per batch.

Why files rather than a Ray primitive (a named actor, a `ray.util.queue`): a node removed or a driver
SIGKILLed takes actors and queues with it, and the test must still read what happened; every process of
the tests' local clusters sees one folder.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

GATES_ENV = "CHARACTER_TEST_GATES"
POLL_SECONDS = 0.05


def gates_folder() -> Path | None:
    folder = os.environ.get(GATES_ENV)
    return Path(folder) if folder else None


def claim_next(folder: Path, record: dict) -> int:
    """The lowest free batch number, claimed atomically with `record` as its content: a hard link fails if
    the name exists, so two claimants never share a number and a reader never sees a half-written claim."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    try:
        number = len(list(folder.glob("claim-*"))) + 1  # numbers are claimed without gaps
        while True:
            try:
                os.link(tmp, folder / f"claim-{number:06d}")
                return number
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)


def wait_for_holds(folder: Path, number: int) -> None:
    holds_file = folder / "holds.json"
    holds = json.loads(holds_file.read_text()) if holds_file.is_file() else []
    for hold in sorted(int(k) for k in holds):
        while number > hold and not (folder / f"open-{hold}").exists():
            time.sleep(POLL_SECONDS)


@contextmanager
def paced_batch():
    """Around one batch's generation and commit: claim, wait for the holds, mark done (only when gated)."""
    folder = gates_folder()
    if folder is None:
        yield
        return
    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    number = claim_next(folder, {"node_id": node_id, "pid": os.getpid()})
    wait_for_holds(folder, number)
    yield
    (folder / f"done-{number:06d}").touch()


# ---- the test's side ------------------------------------------------------------------------------------

def prepare(folder: Path, holds: list[int]) -> dict[str, str]:
    """An empty gates folder holding `holds`; returns the environment entry a stage driver needs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "holds.json").write_text(json.dumps(sorted(holds)))
    return {GATES_ENV: str(folder)}


def open_hold(folder: Path, hold: int) -> None:
    (folder / f"open-{hold}").touch()


def claims(folder: Path) -> dict[int, dict]:
    """Every claimed batch number with its claimant's record."""
    return {int(p.name.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("claim-*")}


def done(folder: Path) -> set[int]:
    """The batch numbers generated and committed."""
    return {int(p.name.split("-")[1]) for p in folder.glob("done-*")}


def wait_done(folder: Path, count: int, driver, log: Path, timeout_s: float = 300) -> None:
    """Wait until `count` batches are committed, while the stage driver (a Popen) lives; a driver that exits or
    a bound reached (for a broken run only) fails with the end of its log."""
    deadline = time.time() + timeout_s
    while len(done(folder)) < count:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{count} batches not committed within {timeout_s:.0f} s"
        time.sleep(0.1)
