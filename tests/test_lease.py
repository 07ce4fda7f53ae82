"""One writer per run directory (character/execution/lease.py): a second command stops before any compute with
the holder named; a stale lease (pid gone, heartbeat silent) is taken over and said so; --break-lock takes any;
two takers racing for a free lease cannot both hold it. No Ray: the commands here stop before it starts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from character.execution import lease as lease_mod
from character.execution.lease import FOLDER, NAME, RunInUseError, RunLease


@pytest.fixture
def cli_args(tmp_path, make_config, monkeypatch):
    from character.execution import stage_run

    def refuse(*_):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(stage_run, "init_ray", refuse)
    return ["--config", make_config(tmp_path).source, f"run.output_dir={tmp_path}", "tracking.backend=none"]


def _hold(run, pid: int, host: str | None = None, age_s: float = 0.0, stage: str = "train-pm") -> dict:
    record = {"host": host or socket.gethostname(), "pid": pid, "started_at": time.time() - 3600,
              "heartbeat_at": time.time() - age_s, "stage": stage, "token": "theirs"}
    (run / FOLDER).mkdir(exist_ok=True)
    (run / FOLDER / NAME).write_text(json.dumps(record))
    return record


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_holder_not_yet_reaped_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # exited, a zombie
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not lease_mod.pid_alive(child.pid) and lease_mod.pid_alive(os.getpid())
    child.wait()
    assert not lease_mod.pid_alive(child.pid)


def test_a_second_command_on_a_held_run_directory_stops_before_any_compute_naming_the_holder(tmp_path, cli_args,
                                                                                             capsys):
    from character.pipeline import cli

    held = _hold(tmp_path, os.getppid())  # alive, and not us
    assert cli.main(["run", *cli_args]) == 1
    err = capsys.readouterr().err
    assert (f"error: run directory {tmp_path} is in use by {socket.gethostname()} pid {os.getppid()} since "
            in err and "(running train-pm); wait for it, or pass --break-lock if that process is gone" in err), err
    assert json.loads((tmp_path / FOLDER / NAME).read_text()) == held  # untouched
    assert not (tmp_path / "messages").exists()  # nothing ran

    assert cli.main(["rank", *cli_args, "--break-lock"]) == 1  # taken, then rank stops: no responses/ yet
    out = capsys.readouterr()
    assert f"took over the lease of {socket.gethostname()} pid {os.getppid()}" in out.out and "(--break-lock)" in out.out
    assert "run that stage first" in out.err
    assert not (tmp_path / FOLDER / NAME).exists()  # given back at the end


@pytest.mark.parametrize("holder", ["pid gone", "silent heartbeat"])
def test_a_stale_lease_is_taken_over_and_the_takeover_printed(tmp_path, cli_args, capsys, holder):
    from character.pipeline import cli

    if holder == "pid gone":
        pid = _dead_pid()
        _hold(tmp_path, pid)
        why = f"(pid {pid} is gone)"
    else:  # another host: its pid cannot be checked, only its heartbeat
        pid = os.getpid()
        _hold(tmp_path, pid, host="elsewhere", age_s=lease_mod.STALE_S + 60)
        why = "(no heartbeat for "
    assert cli.main(["rank", *cli_args]) == 1
    out = capsys.readouterr()
    assert "[lease] took over the lease of " in out.out and why in out.out, out.out
    assert "in use" not in out.err and "run that stage first" in out.err


def test_the_holder_beats_and_names_its_stage_and_gives_the_lease_back(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    with RunLease(str(tmp_path), "synthesize") as held:
        first = json.loads((tmp_path / FOLDER / NAME).read_text())
        assert (first["pid"], first["stage"]) == (os.getpid(), "synthesize")
        held.set_stage("respond")
        time.sleep(0.5)
        later = json.loads((tmp_path / FOLDER / NAME).read_text())
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["stage"] == "respond"
        with pytest.raises(RunInUseError, match=r"\(running respond\)"):
            RunLease(str(tmp_path), "rank").acquire()  # same host, live pid: held
    assert not (tmp_path / FOLDER / NAME).exists()


def test_two_takers_racing_for_a_free_lease_cannot_both_hold_it(tmp_path, monkeypatch):
    """Both found it free and wrote; the one whose write was overwritten reads the other's token back and stops."""
    first, second = RunLease(str(tmp_path), "rank"), RunLease(str(tmp_path), "respond")
    real_sleep = time.sleep

    def second_writes_meanwhile(seconds):
        second.out.write_text(NAME, json.dumps(second._record()))
        real_sleep(seconds)
    monkeypatch.setattr(lease_mod.time, "sleep", second_writes_meanwhile)
    with pytest.raises(RunInUseError, match=r"\(running respond\)"):
        first.acquire()
    monkeypatch.setattr(lease_mod.time, "sleep", real_sleep)
    assert second.acquire() is None  # its own token read back: it holds the lease
    second.release()
    first.release()  # not the holder: gives nothing back, breaks nothing
    assert not (tmp_path / FOLDER / NAME).exists()
