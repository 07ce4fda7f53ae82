"""Stopping a process the tests started, with everything it started, by construction rather than by a grace period.

A stage driver or `ray start --block`, started with `start_new_session=True`, spawns Ray's processes; Ray puts its
workers in process groups of their own and its job entrypoints in sessions of their own, so `killpg` on the leader
misses them and leaves them to notice a lost raylet in their own time, busy meanwhile on a 2-core box. `kill_tree`
freezes the leader's descendants and session with SIGSTOP until no new process appears (a stopped process cannot
fork), then kills them all and returns once none is alive.

Why by hand: psutil is not a dependency of the project, and `ray stop` stops every Ray on the machine, the
session's in-process one included.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, session id), from /proc/<pid>/stat."""
    rows = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        rows[int(entry.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return rows


def _tree(leader: int, table: dict[int, tuple[str, int, int]]) -> set[int]:
    """The leader, its descendants and the members of its session."""
    found = {leader} | {pid for pid, (_, _, sid) in table.items() if sid == leader}
    while True:
        more = {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL `proc` (a session leader) and every process it started, and wait until all of them are gone."""
    deadline = time.monotonic() + timeout
    frozen: set[int] = set()
    while more := _tree(proc.pid, _table()) - frozen:
        _signal(more, signal.SIGSTOP)
        frozen |= more
    _signal(frozen, signal.SIGKILL)
    proc.wait(timeout=timeout)
    while alive := {pid for pid, (state, _, _) in _table().items() if pid in frozen and state != "Z"}:
        assert time.monotonic() < deadline, f"processes {sorted(alive)} outlived SIGKILL for {timeout} s"
        time.sleep(0.05)
