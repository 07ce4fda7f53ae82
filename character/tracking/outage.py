"""Tracking that survives an outage: a tracking server that stops answering mid-stage does not stop the stage.

Every MLflow call a stage makes after it started (params, per-step metrics, tags, files, finishing the run) goes
through `KeptTracker`. When the server fails to answer, the call is kept as a small JSON record under
`<run>/_tracking/pending/<tracker run>/<host>-<pid>/`, a warning is printed once per process, and the stage goes
on. The records are sent in order on the process's next call that reaches the server (at most every
RETRY_AFTER_S while it is down, so a dead server costs a training loop one short try every few seconds, not a
wait per step), and by the driver when a stage starts or ends (`replay_pending`), which also sends what a Ray
Train worker kept before it exited. A metric point the server already holds (a call that failed after the server
stored it) is not sent twice: replayed points are checked against the metric's history, by step.

An unreachable server when the command starts stays a config error (character.pipeline.cli.validate).
W&B is not wrapped: its SDK already keeps and uploads a run's data from its own background service.
Why by hand: MLflow's client retries a request, then raises; it has no local buffer for a longer outage.
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import time

import pyarrow.fs as pafs

from character.core.space import is_no_space
from character.core.store import StageOutput
from character.tracking.quiet import quiet_tracker_logs

RECORDS = "_tracking"  # <run>/_tracking/<stage>.json: the tracker run of each stage (and run.json: the parent)
PENDING = "pending"  # <run>/_tracking/pending/<tracker run id>/<host>-<pid>/<time>-<n>.json
RETRY_AFTER_S = float(os.environ.get("CHARACTER_TRACKING_RETRY_S", "10"))
# MLflow's defaults retry a refused request 7 times with a doubling back-off (minutes); a kept call needs none of
# that. The user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_warned: set[str] = set()  # tracking URIs this process has warned about
_down_since: dict[str, float] = {}  # tracking URI -> when this process last found it not answering (monotonic)


def records(run_dir: str) -> StageOutput:
    return StageOutput(run_dir, RECORDS)


class KeptTracker:
    """One process's calls to one MLflow run, kept through an outage (see the module's docstring)."""

    def __init__(self, inner, handle):
        self.inner, self.handle = inner, handle
        self.out = records(handle.run_dir)
        self.folder = posixpath.join(PENDING, handle.run_id, f"{socket.gethostname()}-{os.getpid()}")
        self.check_steps = False  # the history could not be read at start: every point is checked before sending
        self.kept = 0
        self.pending = False  # records kept by this process not yet sent
        quiet_tracker_logs()
        if (handle.uri or "").startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # --- the tracker interface (character.tracking.backends.MlflowTracker) ---------------------------------------
    def log_params(self, params: dict) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self._call("log_metrics", metrics, step, int(time.time() * 1000))

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str) -> None:
        self._call("log_artifact", path)

    def finish(self, failed: bool = False) -> None:
        self._call("finish", failed)

    def reopen(self) -> None:
        self._call("reopen")

    def exists(self) -> bool:
        """Whether the run can be continued; while the store does not answer, the recorded run is taken to be
        there (its calls are kept for it, not for a new run made in the middle of an outage)."""
        try:
            return self.inner.exists()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is an outage here
            self._down(exc)
            return True

    def last_step(self) -> int:
        try:
            return self.inner.last_step()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is an outage here
            self._down(exc)
            self.check_steps = True
            return -1

    def close(self) -> None:
        self.inner.close()

    # --- keeping and sending ------------------------------------------------------------------------------------
    def _call(self, op: str, *args) -> None:
        down = _down_since.get(self.uri)
        if down is not None and time.monotonic() - down < RETRY_AFTER_S:
            self._keep(op, args)
            return
        try:
            sent = send_kept(self.inner, self.out, self.folder) if self.pending else 0
            self.pending = False
            if op == "log_metrics" and self.check_steps:
                self.inner.log_metrics_once(*args)
            else:
                getattr(self.inner, op)(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker failure must not end the stage
            self._down(exc)
            self._keep(op, args)
            return
        if _down_since.pop(self.uri, None) is not None:
            print(f"[tracking] {self.handle.uri} answers again: sent {sent} kept record(s)", flush=True)

    @property
    def uri(self) -> str:
        return self.handle.uri or "the tracking store"

    def _down(self, exc: Exception) -> None:
        """The store did not answer: an outage of its URI for this process (every run's calls are kept)."""
        _down_since[self.uri] = time.monotonic()
        uri = self.uri
        if uri not in _warned:
            _warned.add(uri)
            cause = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"[tracking] warning: {uri} did not answer ({type(exc).__name__}: {cause}); the stage goes on and "
                  f"keeps what it logs under {self.out.path(PENDING)} until it answers", flush=True)

    def _keep(self, op: str, args: tuple) -> None:
        self.kept += 1
        name = f"{time.time_ns():020d}-{self.kept:06d}.json"
        try:
            self.out.write_text(posixpath.join(self.folder, name), json.dumps({"op": op, "args": list(args)}))
        except OSError as exc:  # tracking never ends a stage; a full disk, the stage's next write will say
            if not is_no_space(exc) and "keep" not in _warned:
                _warned.add("keep")
                print(f"[tracking] warning: could not keep a record under {self.out.path(PENDING)} "
                      f"({type(exc).__name__}: {exc}); it is lost", flush=True)
            return
        self.pending = True


def send_kept(inner, out: StageOutput, folder: str) -> int:
    """Send the records kept in `folder`, oldest first, each deleted once sent; metric points the run already
    holds are skipped. Raises at the first one that fails (the rest stay). Returns how many were sent."""
    fs, root = out.filesystem, out.root
    where = posixpath.join(root, folder)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        return 0
    names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(where)) if i.base_name.endswith(".json")
                   and not i.base_name.startswith(".tmp-"))
    for path in names:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read().decode("utf-8"))
        op = "log_metrics_once" if record["op"] == "log_metrics" else record["op"]
        getattr(inner, op)(*record["args"])
        fs.delete_file(path)
    return len(names)


def replay_pending(handle_for, run_dir: str) -> int:
    """The driver's replay at a stage's start and end: every process's kept records for every tracker run of the
    run directory (`handle_for(run_id)` gives that run's handle). A failure leaves the rest kept and is printed
    once; it never fails the stage. Returns how many were sent."""
    out = records(run_dir)
    fs, root = out.filesystem, posixpath.join(out.root, PENDING)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return 0
    sent, uris = 0, set()
    for run in fs.get_file_info(pafs.FileSelector(root)):
        if run.type != pafs.FileType.Directory:
            continue
        handle = handle_for(run.base_name)
        inner = handle.tracker().inner
        uris.add(handle.tracker().uri)
        for proc in fs.get_file_info(pafs.FileSelector(run.path)):
            if proc.type != pafs.FileType.Directory:
                continue
            try:
                sent += send_kept(inner, out, posixpath.join(PENDING, run.base_name, proc.base_name))
            except Exception as exc:  # noqa: BLE001 - still down: kept for the next stage
                handle.tracker()._down(exc)
                return sent
            fs.delete_dir(proc.path)
        if not fs.get_file_info(pafs.FileSelector(run.path)):
            fs.delete_dir(run.path)
    for uri in uris:  # it answered every kept call: no longer down
        _down_since.pop(uri, None)
    return sent
