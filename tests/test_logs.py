"""Readable logs (character/tracking/quiet.py): the stderr filter drops the known-harmless lines, even when a
burst of output cuts them across the pipe's reads, and passes every other byte on, a partial line included."""
import subprocess
import sys

HARMLESS = ("[2026-12-07 19:03:40,538 E 9166 9203] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
            "and ID: 'ab' has constructor arguments in the object store and max_restarts > 0. If the arguments ...")

CHILD = f"""
import os, sys, time
from character.tracking.quiet import filter_stderr
filter_stderr()
burst = "".join(f"{{i:05d}} " + ({HARMLESS!r} if i % 2 else "a line for people") + "\\n" for i in range(3000))
os.write(2, burst.encode())  # ~300 KB in one write: the reader's 64 KB reads end inside lines
os.write(2, b"progress 50%\\r")  # a partial line, then nothing for a while
time.sleep(1.0)
print("last words", file=sys.stderr)
"""


def test_harmless_lines_are_dropped_whole_and_the_rest_kept_in_order(repo, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:  # not a terminal, as in a Ray job's log
        proc = subprocess.run([sys.executable, "-c", CHILD], cwd=repo, stderr=err, timeout=60)
    assert proc.returncode == 0
    text = log.read_bytes().decode()  # \r kept as it is
    assert "constructor arguments" not in text and "max_restarts" not in text
    kept = text.split("\n")
    assert kept[:1500] == [f"{i:05d} a line for people" for i in range(0, 3000, 2)]
    assert kept[1500:] == ["progress 50%\rlast words", ""]


def test_verbose_keeps_every_line(repo, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        subprocess.run([sys.executable, "-c", CHILD], cwd=repo, stderr=err, timeout=60,
                       env={**__import__("os").environ, "CHARACTER_LOG_LEVEL": "verbose"})
    assert log.read_text().count("has constructor arguments in the object store") == 1500
