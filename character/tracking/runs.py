"""Experiment tracking: one tracker run per run directory with a nested run per stage; MLflow by default (a
SQLite store inside the run directory, no server), W&B when asked, nothing with `tracking.backend: none`.

Every stage's `run` is wrapped by `tracked(...)`: it opens (or continues) the stage's run before the stage
works, and when the stage ends logs its counts, seconds, results (eval summary, PM metrics) and small output
files (stats, summaries, the report page) and marks the run finished. Which tracker run is whose is kept in
`<run>/_tracking/<stage>.json`, so a stage that was interrupted continues its own run when resumed and a stage
redone (--force, or after its output was deleted) starts a new one. Ray Train workers log per-step metrics
from rank 0 (`StepLog`), as Ray Train's guide to native tracking libraries does, through a picklable
`TrackingHandle`: the store must be reachable from that worker (a tracking server, or a path every node
shares; the default in-run-directory store is on the driver's machine).

MLflow's client and W&B's SDK do the tracking; written here is only which run a stage logs to and what.
"""
from __future__ import annotations

import contextvars
import functools
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from character.core.config import Config
from character.core.space import is_no_space
from character.core.store import StageOutput, is_remote, join_uri, split_uri
from character.tracking.backends import BACKENDS, MlflowTracker, ensure_local_store, local_dir, store_uri
from character.tracking.outage import KeptTracker, records, replay_pending

# Small stage files worth keeping with the tracker run (artifacts); models are named by tags, not copied.
ARTIFACTS = ("stats.json", "summary.json", "metrics.json", "metrics.jsonl", "index.html")
_kept: dict[tuple, KeptTracker] = {}
_current: contextvars.ContextVar = contextvars.ContextVar("character_tracking", default=None)


@dataclass(frozen=True)
class TrackingHandle:
    """What any process (the driver, a Ray Train worker) needs to log to one stage's run."""

    backend: str
    uri: str | None  # MLflow tracking URI
    run_id: str
    experiment: str
    run_dir: str
    stage: str
    local_dir: str  # W&B's run files; MLflow's local store

    def tracker(self):
        """The run's tracker in this process; MLflow's kept through an outage (character/tracking/outage.py), one
        per run and process so that an outage is met once, not once per call."""
        if self.backend != "mlflow":
            return BACKENDS[self.backend](self)
        key = (self.uri, self.run_id, os.getpid())
        if key not in _kept:
            _kept[key] = KeptTracker(BACKENDS[self.backend](self), self)
        return _kept[key]


def ui_command(config: Config) -> str:
    """The command that opens this run's MLflow store in the browser."""
    where = store_uri(config)
    if is_remote(config.run.output_dir) and not config.tracking.uri:
        where = f"sqlite:///mlflow.db   (after copying {join_uri(config.run.output_dir, 'mlflow', 'mlflow.db')} here)"
    return f"mlflow ui --backend-store-uri {where}"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists kept as values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def numeric(tree: dict) -> dict[str, float]:
    """The finite-or-NaN numbers of a (nested) dict, flattened; booleans and strings left out."""
    return {k: float(v) for k, v in flatten(tree).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The commit of the code that runs (its checkout's HEAD), or "unknown" (a Ray job's working dir has no .git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _records(config: Config) -> StageOutput:
    return records(config.run.output_dir)


def _handle(config: Config, stage: str, run_id: str) -> TrackingHandle:
    t = config.tracking
    return TrackingHandle(t.backend, store_uri(config), run_id, t.experiment, config.run.output_dir, stage,
                          local_dir(config))


def _same_store(record: dict | None, config: Config) -> bool:
    return bool(record) and (record["backend"], record["uri"], record["experiment"]) == (
        config.tracking.backend, store_uri(config), config.tracking.experiment)


def _run_tags(config: Config) -> dict:
    return {"character.run_dir": config.run.output_dir, "character.model": config.model.name,
            "character.constitution": config.traits.path, "character.recipe": recipe(config),
            "mlflow.source.git.commit": git_commit(), "mlflow.user": _user()}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def recipe(config: Config) -> str:
    return recipe_name(config.policy.method, config.ppo.advantage, config.policy.sft)


def recipe_name(method: str | None, advantage: str | None, sft: bool | None = False) -> str:
    """"dpo", "ppo" (with a critic), "grpo" or "rloo" (critic-free), from policy.method and ppo.advantage (None:
    the defaults, for configs written before either existed), after "sft+" with policy.sft."""
    name = "dpo" if method == "dpo" else "ppo" if advantage in (None, "gae") else advantage
    return f"sft+{name}" if sft else name


def parent_run(config: Config) -> str | None:
    """The run directory's own run (MLflow; W&B groups instead), created with the resolved config as params."""
    if config.tracking.backend != "mlflow":
        return None
    records = _records(config)
    record = records.read_json("run.json") if records.exists("run.json") else None
    if _same_store(record, config) and _handle(config, "run", record["run_id"]).tracker().exists():
        return record["run_id"]
    name = os.path.basename(config.run.output_dir.rstrip("/"))
    run_id = MlflowTracker.create(config, name, {**_run_tags(config), "character.stage": "run"}, None)
    _handle(config, "run", run_id).tracker().log_params(flatten(config.model_dump(mode="json", exclude={"source"})))
    records.write_json("run.json", {"backend": "mlflow", "uri": store_uri(config),
                                    "experiment": config.tracking.experiment, "run_id": run_id})
    return run_id


def open_stage(config: Config, stage: str, force: bool) -> TrackingHandle:
    """The stage's run: the same one as before if the stage did not finish (a resumed stage), else a new one."""
    _fetch_store(config)
    ensure_local_store(config)
    parent = parent_run(config)
    _replay(config)
    if parent:
        _handle(config, "run", parent).tracker().reopen()
    records = _records(config)
    record = records.read_json(f"{stage}.json") if records.exists(f"{stage}.json") else None
    if _same_store(record, config) and not record["finished"]:
        earlier = _handle(config, stage, record["run_id"])
        if config.tracking.backend != "mlflow":  # a W&B run resumes by id (wandb.init is the check)
            if not force:
                return earlier
        elif (tracker := earlier.tracker()).exists():
            if not force:
                tracker.reopen()
                return earlier
            tracker.finish(failed=True)  # an interrupted run redone afresh: it ends, as failed
    backend = BACKENDS[config.tracking.backend]
    run_id = backend.create(config, stage, {**_run_tags(config), "character.stage": stage}, parent)
    handle = _handle(config, stage, run_id)
    tracker = handle.tracker()
    tracker.log_params(flatten(config.model_dump(mode="json", exclude={"source"})))
    tracker.close()
    records.write_json(f"{stage}.json", {"backend": config.tracking.backend, "uri": store_uri(config),
                                         "experiment": config.tracking.experiment, "run_id": run_id,
                                         "finished": False})
    return handle


EVAL_FIELDS = ("win_rate", "hard_win_rate", "pm_delta", "pm_base", "pm_trained", "length_change")


def finish_stage(config: Config, handle: TrackingHandle, result, failed: bool = False) -> None:
    """Log what the stage did (counts, seconds, results, small files) and close its run; the run directory's
    run gets the stage's counts as `<stage>.*`, the evaluation's numbers and the report page."""
    _replay(config)  # what the stage's workers kept through an outage, before the stage's run is closed
    tracker = handle.tracker()
    counts, evaluation = {}, {}
    if result is not None:
        # "stage.*": the stage's summary, apart from the per-step histories rank 0 logged under plain names
        counts = numeric({k: v for k, v in result.summary().items() if k != "stage"})
        counts["dropped"] = float(sum(result.drops.values()))
        out = StageOutput(config.run.output_dir, result.stage)
        if result.stage == "eval" and out.exists("summary.json"):
            evaluation = {f"eval.{k}": v for k, v in numeric(out.read_json("summary.json")).items()
                          if k.endswith(".n_messages") or k.split(".")[-2:-1] in [[f] for f in EVAL_FIELDS]}
        tracker.log_metrics({**{f"stage.{k}": v for k, v in counts.items()}, **evaluation})
        tracker.set_tags({"character.output": out.uri})
        _log_files(tracker, out)
    tracker.finish(failed)
    records = _records(config)
    records.write_json(f"{handle.stage}.json", {**records.read_json(f"{handle.stage}.json"), "finished": not failed})
    parent = parent_run(config)
    if parent:
        top = _handle(config, "run", parent).tracker()
        if result is not None:
            top.log_metrics({**{f"{handle.stage}.{k}": v for k, v in counts.items()}, **evaluation})
            if result.stage in ("pm", "policy", "dpo"):
                top.set_tags({f"character.export.{result.stage}": out.uri})
            if result.stage == "report":
                _log_files(top, out)
        # the run directory's run shows how its last stage ended (open_stage sets it running again)
        top.finish(failed)
    _publish_store(config)


def _replay(config: Config) -> None:
    if config.tracking.backend == "mlflow":
        replay_pending(lambda run_id: _handle(config, "replay", run_id), config.run.output_dir)


def _log_files(tracker, out: StageOutput) -> None:
    """The stage's small files as artifacts; from object storage through a local copy (the trackers take paths)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            if not out.exists(name):
                continue
            path = out.path(name)
            if is_remote(path):
                path = os.path.join(tmp, name)
                with open(path, "w") as f:
                    f.write(out.read_text(name))
            tracker.log_artifact(path)


def _remote_db(config: Config) -> str | None:
    """The store's copy in a run directory on object storage (default MLflow store only)."""
    if config.tracking.backend != "mlflow" or config.tracking.uri or not is_remote(config.run.output_dir):
        return None
    return join_uri(config.run.output_dir, "mlflow", "mlflow.db")


_fetched: set[str] = set()  # run directories whose store this process has fetched


def _fetch_store(config: Config) -> None:
    """For a run directory on object storage, its copy of the store is the one that counts: the local working
    copy is replaced by it, or removed if the run has none yet (a local file of an earlier run of the same
    URI would otherwise carry that run's tracking into this one)."""
    import pyarrow.fs as pafs

    remote = _remote_db(config)
    if not remote or remote in _fetched:
        return
    # Once per process, before any client here opens the file: replacing a SQLite file under an open
    # connection leaves that connection on the old, unlinked file ("attempt to write a readonly database").
    _fetched.add(remote)
    local = os.path.join(local_dir(config), "mlflow.db")
    fs, path = split_uri(remote)
    if fs.get_file_info(path).type == pafs.FileType.File:
        os.makedirs(local_dir(config), exist_ok=True)
        pafs.copy_files(path, local + ".part", source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(local + ".part", local)
    elif os.path.exists(local):
        os.remove(local)


def _publish_store(config: Config) -> None:
    """Copy the local store into the run directory on object storage (the run carries its tracking)."""
    import pyarrow.fs as pafs

    remote = _remote_db(config)
    if remote:
        fs, path = split_uri(remote)
        fs.create_dir(os.path.dirname(path), recursive=True)
        pafs.copy_files(os.path.join(local_dir(config), "mlflow.db"), path + ".part",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        fs.move(path + ".part", path)


def current() -> TrackingHandle | None:
    """The handle of the stage running in this process (for its Ray Train workers), None if untracked."""
    return _current.get()


def tracked(stage: str, output: str):
    """Wraps a stage's `run(config, force, ...)`: a tracker run for the stage, unless it is skipped."""
    def wrap(run):
        @functools.wraps(run)
        def tracked_run(config: Config, force: bool = False, **kwargs):
            if config.tracking.backend == "none":
                return run(config, force=force, **kwargs)
            complete = StageOutput(config.run.output_dir, output).complete() and not force
            handle = None if complete else open_stage(config, stage, force)
            token = _current.set(handle)
            try:
                result = run(config, force=force, **kwargs)
            except BaseException:
                if handle is not None:
                    try:
                        finish_stage(config, handle, None, failed=True)
                    except Exception as exc:  # noqa: BLE001 - the stage's own failure is the one to raise
                        if not is_no_space(exc):  # a full disk: the stage's own message says it
                            print(f"[tracking] could not close the run of {stage}: {type(exc).__name__}: {exc}",
                                  file=sys.stderr)
                raise
            finally:
                _current.reset(token)
            if handle is not None or not result.skipped:
                finish_stage(config, handle or open_stage(config, stage, force), result)
            return result
        return tracked_run
    return wrap


class StepLog:
    """Per-step metrics of a Ray Train loop on rank 0: TensorBoard (local run directories) and the tracker.
    Steps up to the last one the tracker already holds are not sent again: a resumed stage reruns the steps
    after its checkpoint, and the tracker keeps one history per metric."""

    def __init__(self, config: Config, tag: str, handle: TrackingHandle | None, enabled: bool):
        self.writer = self.tracker = None
        self.after = -1
        if not enabled:
            return
        if not is_remote(config.run.output_dir):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(config.run.output_dir, "tensorboard", tag))
        if handle is None:
            return
        db = handle.uri[len("sqlite:///"):] if (handle.uri or "").startswith("sqlite:///") else None
        if db and not os.path.exists(db):
            print(f"[tracking] {handle.uri} is not on this node ({os.uname().nodename}): {tag} logs no per-step "
                  f"metrics; set tracking.uri to a server or a path every node shares", file=sys.__stdout__)
            return
        self.tracker = handle.tracker()
        self.after = self.tracker.last_step()

    def log(self, metrics: dict, step: int, prefix: str = "") -> None:
        scalars = numeric(metrics)
        if self.writer:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)
        if self.tracker is not None and step > self.after:
            self.tracker.log_metrics(scalars, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.close()
