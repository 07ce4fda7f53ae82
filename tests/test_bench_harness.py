"""benchmarks/_harness.py: the parent side of the fresh-subprocess protocol (run_worker) on tiny python children."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` alone does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks._harness import child_env, choose, comma_list, rotation, run_worker  # noqa: E402


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_returns_the_last_result_line_among_noise():
    cmd = child("import sys\n"
                "print('loading weights... RESULT lines only count at the start of a line')\n"
                "print('RESULT {\"n\": 1}')\n"
                "print('warning: something', file=sys.stderr)\n"
                "print('RESULT {\"n\": 2, \"name\": \"x\"}')\n"
                "print('shutting down')\n")
    assert run_worker(cmd) == {"n": 2, "name": "x"}


def test_emit_result_and_wall_time():
    # The child speaks through the harness itself (cwd defaults to the repository root, so it imports).
    cmd = child("from benchmarks._harness import emit_result; print('noise'); emit_result({'tokens': 3, 'wall_s': -1})")
    result = run_worker(cmd, wall_key="wall_s")
    assert result["tokens"] == 3
    assert 0 < result["wall_s"] < 120  # the parent's measurement replaces the child's key


def test_environment_is_passed():
    cmd = child("import json, os; print('RESULT ' + json.dumps({'v': os.environ.get('BENCH_HARNESS_TEST')}))")
    assert run_worker(cmd, child_env(BENCH_HARNESS_TEST="set")) == {"v": "set"}
    assert run_worker(cmd, {**child_env(), "BENCH_HARNESS_TEST": "whole env"}) == {"v": "whole env"}


def test_no_result_line_raises_with_the_childs_stderr():
    cmd = child("import sys\nprint('some output')\nprint('the real cause is here', file=sys.stderr)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd, what="hf worker")
    message = str(info.value)
    assert "hf worker failed" in message and "no RESULT line" in message
    assert "the real cause is here" in message
    assert sys.executable in message  # the command


def test_nonzero_exit_is_reported_even_with_a_result_line():
    cmd = child("import sys\nprint('RESULT {\"n\": 1}')\nprint('Traceback: boom', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd)
    assert "rc 3" in str(info.value) and "Traceback: boom" in str(info.value)


def test_tail_keeps_the_end_of_stderr():
    cmd = child("import sys\nfor i in range(100): print(f'out {i}')\n"
                "for i in range(100): print(f'err {i}', file=sys.stderr)\n")
    with pytest.raises(RuntimeError) as info:
        run_worker(cmd, tail_lines=5)
    message = str(info.value)
    assert "err 99" in message and "err 95" in message and "err 94" not in message and "out 99" not in message


def test_command_line_helpers():
    assert comma_list(" a, b,,c ,") == ["a", "b", "c"]
    assert choose("hf, direct", ("ray", "direct", "hf")) == ["hf", "direct"]
    with pytest.raises(SystemExit, match="unknown \\['gpu'\\]"):
        choose("hf,gpu", ("ray", "direct", "hf"))
    with pytest.raises(SystemExit):
        choose(" , ", ("ray",))
    assert [rotation(["a", "b", "c"], r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                                ["a", "b", "c"]]
    assert [rotation(["x", "y"], r) for r in range(3)] == [["x", "y"], ["y", "x"], ["x", "y"]]
