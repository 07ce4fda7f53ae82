"""The tracker backends behind character/tracking/runs.py: an MLflow run through `MlflowClient` and a W&B run, with
one small interface (params, metrics at a step, tags, files, finish) so the stages log the same way to either."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid

from character.core.config import Config
from character.core.space import check_full_disk_drill, is_no_space, no_space_error
from character.core.store import is_remote, stable_id
from character.models.loading import cache_root


def local_dir(config: Config) -> str:
    """The local tracking folder: <run>/mlflow (or <run> for W&B's wandb/), or for a run directory on object
    storage a folder under $CHARACTER_CACHE keyed by the run's URI."""
    out = config.run.output_dir
    if is_remote(out):
        return str(cache_root() / "tracking" / stable_id(out))
    return os.path.join(out, "mlflow") if config.tracking.backend == "mlflow" else out


def store_uri(config: Config) -> str | None:
    if config.tracking.backend != "mlflow":
        return None
    return config.tracking.uri or f"sqlite:///{os.path.join(local_dir(config), 'mlflow.db')}"


def server_problem(uri: str) -> str | None:
    """Why the MLflow tracking server at an http(s) `uri` cannot be reached, or None when it answers (any HTTP
    answer counts: a server behind a login still answers)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def ensure_local_store(config: Config) -> None:
    """The default in-run-directory MLflow store exists whole before any client opens it.

    MLflow creates a SQLite store in place and migrates it step by step; a full disk midway leaves a file whose
    every later open fails ("table ... already exists"). So the store is built under a temporary name and
    renamed into place once its schema is complete, and a store that holds no runs and whose schema is not
    complete (left by a version of this code that built it in place) is moved aside and built again."""
    if config.tracking.backend != "mlflow" or config.tracking.uri:
        return
    folder = local_dir(config)
    db = os.path.join(folder, "mlflow.db")
    if os.path.exists(db):
        if not half_made_store(db):
            return
        aside = f"{db}.broken-{int(time.time())}"
        os.replace(db, aside)
        print(f"[tracking] {db} was left half-made (no runs, schema not complete): moved to {aside}, made anew",
              flush=True)
    from mlflow.tracking import MlflowClient

    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-mlflow.db")
    client = None
    try:
        os.makedirs(folder, exist_ok=True)
        client = MlflowClient(f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # creates and migrates the store
        client._tracking_client.store.engine.dispose()  # no connection left on the file once it is renamed
        check_full_disk_drill(db)  # fault drills: fail as a full disk would at the end of a migration
        os.replace(tmp, db)
    except Exception as exc:
        if client is not None:
            try:  # an open connection would keep the removed file's space taken
                client._tracking_client.store.engine.dispose()
            except Exception:  # noqa: BLE001 - the store was never made: nothing holds the file
                pass
        for leftover in (tmp, tmp + "-journal"):
            if os.path.exists(leftover):
                os.remove(leftover)
        if is_no_space(exc):
            raise no_space_error(db, exc) from exc
        raise


def half_made_store(db: str) -> bool:
    """True for a SQLite file that holds no runs and whose schema is not MLflow's latest (or is unreadable):
    nothing in it to keep. A store holding runs is never called half-made (MLflow's own error says what to do)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "runs" in tables and conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]:
                return False
            version = (conn.execute("SELECT version_num FROM alembic_version").fetchone()
                       if "alembic_version" in tables else None)
    except sqlite3.DatabaseError:
        return True  # not a database at all (cut short before its header)
    return version is None or version[0] != _get_latest_schema_revision()


class MlflowTracker:
    """A run in an MLflow store, through `MlflowClient` (no global active run: the driver and the workers each
    name the run they log to)."""

    def __init__(self, handle):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(handle.uri), handle.run_id

    @staticmethod
    def create(config: Config, name: str, tags: dict, parent_id: str | None) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store_uri(config))
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        if experiment is None:
            artifacts = None if config.tracking.uri else os.path.join(local_dir(config), "artifacts")
            experiment_id = client.create_experiment(config.tracking.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        if parent_id:
            tags = {**tags, "mlflow.parentRunId": parent_id}
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def exists(self) -> bool:
        """The run is in the store and not deleted; a store that does not answer raises (an outage is not a
        missing run: character/tracking/outage.py)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(self.run_id).info.lifecycle_stage == "active"
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params  # params cannot change once logged
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items() if k not in have]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=[Param(p.key, p.value[:6000]) for p in items[i:i + 100]])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_metrics_once(self, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        """log_metrics without the points the run already holds at `step` (a kept call sent again)."""
        held = self.client.get_run(self.run_id).data.metrics
        new = {k: v for k, v in metrics.items()
               if k not in held or all(m.step != step for m in self.client.get_metric_history(self.run_id, k))}
        if new:
            self.log_metrics(new, step, timestamp_ms)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def last_step(self) -> int:
        """The largest step logged for any metric (-1: none)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for k in keys for m in self.client.get_metric_history(self.run_id, k)), default=-1)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def close(self) -> None:
        pass


class WandbTracker:
    """A W&B run (offline with WANDB_MODE=offline), resumed by id; the stages of one run directory share its
    group, each stage is a job_type (W&B has no nested runs)."""

    def __init__(self, handle):
        import wandb

        os.makedirs(handle.local_dir, exist_ok=True)
        self.run = wandb.init(project=handle.experiment, id=handle.run_id, resume="allow", dir=handle.local_dir,
                              group=stable_id(handle.run_dir), job_type=handle.stage, name=handle.stage,
                              reinit="finish_previous")

    @staticmethod
    def create(config: Config, name: str, tags: dict, parent_id: str | None) -> str:
        import uuid

        return uuid.uuid4().hex[:16]

    def exists(self) -> bool:
        return True

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp_ms: int | None = None) -> None:
        if step is not None:
            self.run.log(metrics, step=step)
        else:
            self.run.summary.update(metrics)

    def set_tags(self, tags: dict) -> None:
        self.run.config.update({f"tag.{k}": str(v) for k, v in tags.items()}, allow_val_change=True)

    def log_artifact(self, path: str) -> None:
        self.run.save(path, base_path=os.path.dirname(path), policy="now")

    def last_step(self) -> int:
        return int(getattr(self.run, "starting_step", 0) or 0) - 1

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def reopen(self) -> None:
        pass  # wandb.init(resume="allow") already reopened it

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"mlflow": MlflowTracker, "wandb": WandbTracker}
