"""kill_tree (tests/processes.py): a session leader and everything it started are gone when it returns, a child that
left the session and a grandchild in a process group of its own included."""
import subprocess
import sys
import time

from processes import _table, kill_tree

SPAWNER = """
import os, subprocess, sys, time
escaped = subprocess.Popen(["sleep", "300"], start_new_session=True)  # as Ray's job entrypoints
grouped = subprocess.Popen(["sleep", "300"], process_group=0)  # as Ray's workers
print(escaped.pid, grouped.pid, flush=True)
time.sleep(300)
"""


def test_kill_tree_leaves_no_descendant_alive():
    leader = subprocess.Popen([sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    children = {int(pid) for pid in leader.stdout.readline().split()}
    assert len(children) == 2 and all(_table()[pid][0] != "Z" for pid in children)
    started = time.monotonic()
    kill_tree(leader)
    assert time.monotonic() - started < 10  # no grace period waited out
    assert leader.returncode == -9
    table = _table()
    assert all(pid not in table or table[pid][0] == "Z" for pid in children)
