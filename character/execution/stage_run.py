"""The preamble and the commit every stage runs, written once: skip a complete output (or reset a forced one),
check the config for this stage, require the complete outputs it reads, run the stage's own input checks,
record the resolved config, start Ray, time the work, and commit `_SUCCESS` with the result's summary; all inside
the stage's tracker run (character/tracking/runs.py)."""
from __future__ import annotations

from typing import Any, Callable

from character.core.config import Config
from character.core.store import StageOutput, require_complete
from character.execution.checks import check_stage_config
from character.execution.registry import STAGES, StageSpec
from character.execution.runtime import StageResult, Timer, init_ray, skip_or_reset, write_resolved_config
from character.tracking.runs import tracked


def run_stage(config: Config, spec: StageSpec, force: bool, work: Callable[[StageOutput, StageResult, Any], None],
              inputs: Callable[[StageOutput], Any] | None = None,
              made: Callable[[StageOutput, StageResult, Any], None] | None = None, stats: bool = False) -> StageResult:
    """Runs the stage `spec` (character/execution/registry.py):
    - `inputs(out)`, after the upstream outputs are found complete and before anything is written or Ray
      starts: the stage's own checks of what it reads (raising StageInputError, naming the upstream cause);
      what it returns is handed to `work`;
    - `work(out, result, inputs)`: the stage itself, filling `result` (rows, drops, extra);
    - with `stats`, the result's summary is written to `<output>/stats.json`, even when `made` then refuses it;
    - `made(out, result, inputs)`: the stage's checks of what it made (raising StageInputError when, say, every row was
      set aside), before `_SUCCESS`, which is written only when all of these return."""

    @tracked(spec.name, spec.output)
    def tracked_run(config: Config, force: bool = False) -> StageResult:
        out = StageOutput(config.run.output_dir, spec.output)
        if (skipped := skip_or_reset(out, force)) is not None:
            return skipped
        check_stage_config(config, spec.name)
        for upstream in spec.reads(config):
            read = STAGES[upstream]
            require_complete(StageOutput(config.run.output_dir, read.output), spec.name, read.schema)
        found = inputs(out) if inputs is not None else None
        if spec.starts_ray:
            write_resolved_config(config)
            init_ray(config.ray)
        result = StageResult(spec.output, out.uri)
        with Timer() as timer:
            work(out, result, found)
        result.seconds = timer.seconds
        if stats:
            out.write_json("stats.json", result.summary())
        if made is not None:
            made(out, result, found)
        out.mark_success(result.summary())
        return result

    return tracked_run(config, force=force)
