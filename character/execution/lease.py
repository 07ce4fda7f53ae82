"""One writer per run directory: a lease under `<run>/_lock/lease.json` that `character run` and every stage
command take before any compute, and give back when they end.

The lease names its holder (host, pid, start time, the stage it runs) and carries a heartbeat, rewritten every
HEARTBEAT_S seconds by a daemon thread. A second command on the same directory stops with the holder named. A
lease is taken over (and the takeover printed) when its holder is gone: the same host and its pid no longer
alive, or a heartbeat older than STALE_S (another host, or a holder that hangs); `--break-lock` takes it whatever
it says.

Why by hand: neither Ray nor pyarrow has a lease over a run directory that may be a local path or a bucket, and
`filelock`'s OS locks are local-only. Taking it is write-then-read-back: the lease is written whole (atomic
rename locally, one PUT on object storage) with a random token, read again after SETTLE_S, and held only if the
token read is ours. Two takers racing for a free or stale lease both read the last writer's token, so one of
them stops. A bucket without conditional writes cannot make this exact: two takers whose writes land more than
SETTLE_S apart, each reading its own token back before the other's write, both go on (docs/cluster.md).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

from character.core.store import StageOutput

FOLDER, NAME = "_lock", "lease.json"
HEARTBEAT_S = float(os.environ.get("CHARACTER_LEASE_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("CHARACTER_LEASE_STALE_S", 300))
SETTLE_S = float(os.environ.get("CHARACTER_LEASE_SETTLE_S", 0.2))


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lease."""


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(0) said it exists
        return True


def why_stale(lease: dict, now: float | None = None) -> str | None:
    """Why a lease no longer holds ("pid 123 is gone", "no heartbeat for 412 s"), or None while it does."""
    now = _now() if now is None else now
    if lease.get("host") == socket.gethostname() and not pid_alive(int(lease.get("pid", -1))):
        return f"pid {lease.get('pid')} is gone"
    silent = now - float(lease.get("heartbeat_at", 0))
    if silent > STALE_S:
        return f"no heartbeat for {silent:.0f} s (stale after {STALE_S:.0f} s)"
    return None


class RunLease:
    """`with RunLease(output_dir, stage):` holds the run directory for this process, or raises RunInUseError
    before anything runs."""

    def __init__(self, output_dir: str, stage: str, break_lock: bool = False):
        self.out, self.stage, self.break_lock = StageOutput(output_dir, FOLDER), stage, break_lock
        self.output_dir = output_dir
        self.token = uuid.uuid4().hex
        self.started_at = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at,
                "heartbeat_at": _now(), "stage": self.stage, "token": self.token}

    def _read(self) -> dict | None:
        if not self.out.exists(NAME):
            return None
        try:
            return json.loads(self.out.read_text(NAME))
        except (ValueError, OSError):  # half-written by a process killed mid-write: nobody holds it
            return None

    def acquire(self) -> str | None:
        """Take the lease; returns the takeover line when it took over a stale (or broken) one."""
        held = self._read()
        takeover = None
        if held is not None and held.get("token") != self.token:
            why = "--break-lock" if self.break_lock else why_stale(held)
            if why is None:
                raise RunInUseError(self._in_use(held))
            takeover = (f"[lease] took over the lease of {held.get('host')} pid {held.get('pid')} on "
                        f"{self.output_dir} ({why})")
        self.out.write_text(NAME, json.dumps(self._record()))
        time.sleep(SETTLE_S)
        now_held = self._read()
        if now_held is None or now_held.get("token") != self.token:
            raise RunInUseError(self._in_use(now_held or {}))
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return takeover

    def _in_use(self, held: dict) -> str:
        return (f"run directory {self.output_dir} is in use by {held.get('host')} pid {held.get('pid')} since "
                f"{_iso(float(held.get('started_at', 0)))} (running {held.get('stage')}); wait for it, or pass "
                f"--break-lock if that process is gone")

    def set_stage(self, stage: str) -> None:
        """The stage now running (`character run` moves through several): written with the next heartbeat."""
        self.stage = stage

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = self._read()
            if held is not None and held.get("token") != self.token:
                return  # broken by --break-lock elsewhere: not ours to rewrite
            try:
                self.out.write_text(NAME, json.dumps(self._record()))
            except OSError:
                continue  # a full disk or a store's hiccup: the stage says it if it matters; beat again later

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("token") == self.token:
            self.out.reset()

    def __enter__(self) -> RunLease:
        if (line := self.acquire()) is not None:
            print(line, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
