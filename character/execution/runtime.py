"""Ray start-up and the plumbing every Ray Data stage shares: resume filters, part writers, progress."""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from character.core.config import Config, RayConfig, dump_config
from character.core.store import StageOutput, join_uri, split_uri, stable_id
from character.core.traits import load_constitution
from character.execution.registry import writer
from character.tracking.progress import ProgressLine
from character.tracking.quiet import quiet_ray_data

log = logging.getLogger("character")


def init_ray(cfg: RayConfig) -> None:
    """Connect to a cluster (config or RAY_ADDRESS) or start a local Ray sized by the config."""
    import ray

    quiet_ray_data()  # Ray Data's INFO lines to its file log only, unless verbose
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # "local": a new Ray sized by this config, even when another cluster runs on the machine
    # (plain ray.init() would join it); to use a cluster, name it in ray.address or RAY_ADDRESS.
    kwargs: dict = {"address": "local"}
    if cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus  # logical CPUs: a 2-core box needs overcommit, see FEASIBILITY.md
    if cfg.object_store_memory_mb is not None:
        kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    ray.init(**kwargs)


def format_counts(counts: dict, empty: str = "none") -> str:
    """"too_short=31, empty=9"-style text of reason counts (sorted by reason), or `empty`."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or empty


@dataclass
class StageResult:
    stage: str
    path: str
    rows_in: int = 0
    rows_out: int = 0
    drops: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    skipped: bool = False
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        if self.skipped:
            return f"[{self.stage}] already complete at {self.path}: nothing to do (use --force to redo)"
        drops = format_counts(self.drops)
        return (f"[{self.stage}] rows in {self.rows_in}, rows out {self.rows_out}, dropped {sum(self.drops.values())} "
                f"({drops}), {self.seconds:.1f}s -> {self.path}")

    def summary(self) -> dict:
        return {"stage": self.stage, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "drops": dict(self.drops), "seconds": round(self.seconds, 2), **self.extra}


def skip_or_reset(out: StageOutput, force: bool) -> StageResult | None:
    """A complete stage is skipped unless forced; a forced one starts from nothing, its Ray Train state
    under `_train/<stage>` included; an interrupted one resumes, after moving unreadable parts aside."""
    if force:
        out.reset()
        reset_train_state(out)
    elif out.complete():
        return StageResult(out.stage, out.uri, skipped=True)
    else:
        for moved in out.quarantine_unreadable():
            print(f"[{writer(out.stage)}] quarantined {moved['file']} -> {moved['moved_to']}: "
                  f"{moved['reason']}; its rows are made again", flush=True)
    return None


def upstream_cause(output: StageOutput) -> str:
    """What an upstream stage kept, from its `_SUCCESS` record: "synthesize kept 0 of 40 (too_short=31, empty=9)"."""
    info = output.success_info() if output.complete() else {}
    drops = format_counts(info.get("drops") or {}, "nothing set aside")
    return (f"{writer(output.stage)} kept {info.get('rows_out', '?')} of {info.get('rows_in', '?')} "
            f"({drops})")


def reset_train_state(out: StageOutput) -> None:
    """Delete a training stage's Ray Train state (checkpoints, resume settings) under `_train/<stage>`."""
    StageOutput(out.output_dir, f"_train/{out.stage}").reset()


def without_done(batch: pa.Table, column: str, done: list[str]) -> pa.Table:
    """Drop rows whose id was committed by an earlier (interrupted) run."""
    if not done:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column(column), value_set=pa.array(done, pa.string()))))


def keep_split(batch: pa.Table, split: str) -> pa.Table:
    """Only the rows of one split of messages/ (training stages read `train`)."""
    return batch.filter(pc.equal(batch.column("split"), split))


def batch_key(ids: list[str]) -> str:
    """Deterministic part name: a retried batch overwrites its own part instead of duplicating rows."""
    return stable_id(*sorted(ids))


def write_split(batch: pa.Table, out: StageOutput, id_column: str, kept: pa.Table | None,
                rejected: pa.Table | None, sub: tuple[str, ...] = ()) -> pa.Table:
    """Write the kept rows and the set-aside rows of one batch; return a one-row count table."""
    key = batch_key(batch.column(id_column).to_pylist())
    if kept is not None and kept.num_rows:
        out.write_part(kept, *sub, key=key)
    reasons: Counter = Counter()
    if rejected is not None and rejected.num_rows:
        out.write_part(rejected, *sub, "rejected", key=key)
        reasons.update(rejected.column("reason").to_pylist())
    return pa.table({
        "rows_in": [batch.num_rows],
        "rows_out": [kept.num_rows if kept is not None else 0],
        "drops": [",".join(f"{k}:{v}" for k, v in reasons.items())],
        "new_tokens": [int(pc.sum(batch.column("new_tokens")).as_py() or 0) if "new_tokens" in batch.column_names else 0],
    })


def consume_counts(ds, desc: str, total: int | None) -> tuple[int, int, Counter, int]:
    """Stream the per-batch count rows to the driver with a progress line; only counts cross."""
    rows_in = rows_out = tokens = 0
    drops: Counter = Counter()
    with ProgressLine(desc, total) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                rows_in += row["rows_in"]
                rows_out += row["rows_out"]
                tokens += row["new_tokens"]
                for item in filter(None, row["drops"].split(",")):
                    reason, count = item.rsplit(":", 1)
                    drops[reason] += int(count)
                bar.update(row["rows_in"])
    return rows_in, rows_out, drops, tokens


def committed_counts(out: StageOutput, id_column: str) -> tuple[int, Counter]:
    """Rows kept and set aside over all runs of a stage, read back from what is committed."""
    kept = len(out.ids(id_column))
    drops: Counter = Counter()
    if out.part_files("rejected"):
        drops.update(out.read("rejected", columns=["reason"]).column("reason").to_pylist())
    return kept, drops


def write_resolved_config(config: Config) -> None:
    """config.yaml and the constitution it names (constitution.yaml) into the run directory: the run carries
    the traits it was made from (`character review` shows them wherever the traits file is)."""
    import yaml

    constitution = load_constitution(config.traits.path, config.traits.only).model_dump()
    for name, text in (("config.yaml", dump_config(config)),
                       ("constitution.yaml", yaml.safe_dump(constitution, sort_keys=False, allow_unicode=True))):
        fs, path = split_uri(join_uri(config.run.output_dir, name))
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as sink:
            sink.write(text.encode())


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
