"""What the benchmarks share: the fresh-subprocess protocol, command-line pieces and the reporting helpers.

A benchmark that times something in a fresh process runs itself again as a child (`script_command(__file__,
"--worker", ...)` through `run_worker`); the child does its work and prints one line `RESULT {json}`
(`emit_result`), and the parent takes the last such line of its stdout. Anything else the child prints
(vLLM, Ray and library noise) is ignored unless the child fails, when the end of it is in the error.

Import it as `from benchmarks._harness import ...`. A script run as `python benchmarks/<name>.py` has
benchmarks/ itself as sys.path[0], so it first puts the repository root there (`if __package__ !=
"benchmarks"`); run as `python -m benchmarks.<name>` from the repository root, or imported, it needs nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence, TypeVar

ROOT = Path(__file__).resolve().parents[1]

RESULT_PREFIX = "RESULT "
T = TypeVar("T")

# ------------------------------------------------------------------------------------ parent and child


def emit_result(result: dict) -> None:
    """The child's answer to its parent: one `RESULT {json}` line on stdout, flushed."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last `RESULT` line of a child's stdout, parsed; None where there is none."""
    found = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(found[-1][len(RESULT_PREFIX):]) if found else None


def script_command(script: str | Path, *args: str) -> list[str]:
    """This interpreter running `script` (a benchmark's own `__file__`) with `args`."""
    return [sys.executable, str(Path(script).resolve()), *args]


def child_env(**defaults: str) -> dict[str, str]:
    """A copy of os.environ with `defaults` set where the variable is not set already."""
    env = dict(os.environ)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def run_worker(cmd: Sequence[str | Path], env: dict[str, str] | None = None, cwd: str | Path = ROOT, *,
               what: str = "worker", wall_key: str | None = None, tail_lines: int = 40) -> dict:
    """Run `cmd` to the end (output captured) and return the dict of its last `RESULT` line.

    env: the child's whole environment (None: this process's). wall_key: also store the seconds the
    subprocess took, seen from here (interpreter start and imports included), under that key of the result
    (it replaces a key of that name the child sent). A non-zero exit, or an exit without a RESULT line,
    raises RuntimeError naming `what`, the return code and the command, followed by the last `tail_lines`
    lines of the child's stdout then stderr (so the end of stderr is always there).
    """
    t0 = time.perf_counter()
    proc = subprocess.run([str(x) for x in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        why = f"rc {proc.returncode}" if proc.returncode else "rc 0, no RESULT line"
        tail = "\n".join((proc.stdout.splitlines() + proc.stderr.splitlines())[-tail_lines:])
        raise RuntimeError(f"{what} failed ({why}): {shlex.join(str(x) for x in cmd)}\n{tail}")
    if wall_key:
        result[wall_key] = wall
    return result


# ---------------------------------------------------------------------------------------- command line


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring, showing it as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(p: argparse.ArgumentParser, default: str = "tiny-llama") -> None:
    p.add_argument("--model", default=default, help="built-in random model, local path or HF id")


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma list ("a, b,,c" -> ["a", "b", "c"])."""
    return [x.strip() for x in text.split(",") if x.strip()]


def choose(text: str, choices: Sequence[str], option: str = "--contenders") -> list[str]:
    """The items of a comma list, each one of `choices`; exits with a message otherwise or when it is empty."""
    picked = comma_list(text)
    unknown = set(picked) - set(choices)
    if unknown or not picked:
        sys.exit(f"{option}: unknown {sorted(unknown)}; choose from {choices}")
    return picked


def rotation(items: Sequence[T], rep: int) -> list[T]:
    """The order of repetition `rep` of interleaved contenders: `items` rotated by `rep` (two items alternate)."""
    k = rep % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


# ------------------------------------------------------------------------------------------- reporting


def other_pythons() -> list[str]:
    """Python processes that are neither this one nor its descendants (e.g. a test run next door)."""
    try:
        import psutil
    except ImportError:
        return ["(psutil not installed)"]
    me = psutil.Process()
    mine = {me.pid} | {c.pid for c in me.children(recursive=True)}
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.info["pid"] in mine or "python" not in (proc.info["name"] or "").lower():
                continue
            cmd = " ".join(proc.info["cmdline"] or []) or "(no command line: exiting or zombie)"
            found.append(f"{proc.info['pid']}: {cmd[:90]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def load_line(label: str) -> str:
    """The machine's load average and the other python processes seen: printed at a benchmark's start and end."""
    one, five, fifteen = os.getloadavg()
    others = other_pythons()
    text = f"{label}: load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs); " \
           f"{len(others)} other python process(es)"
    if others:
        text += "\n" + "\n".join("    " + o for o in others[:8]) + ("\n    ..." if len(others) > 8 else "")
    return text


def fmt(rate: float) -> str:
    """A rate (tokens/s, pairs/s, ...): no decimals from 100 up, one below."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"
