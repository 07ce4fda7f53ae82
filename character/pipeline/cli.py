"""`character <stage> --config FILE [--force] [key.sub=value ...]` — the one command-line entrypoint
(and `character compare RUN [RUN ...]`: runs side by side; `character review --run DIR`: a page to review a
run trait by trait, character/review/app.py; `character config [--config FILE] [SECTION]`: every setting).

The stages and their order come from the registry (character/execution/registry.py). The config (and the
constitution it names) is validated before Ray or any engine starts; a bad file stops the command with a
message naming the file and the field, and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from character.core.config import Config, ConfigError, load_config
from character.core.space import find_no_space
from character.core.store import StageInputError, StageOutput
from character.core.traits import load_constitution
from character.execution.checks import check_stage_config
from character.execution.lease import RunInUseError, RunLease
from character.execution.registry import STAGES, run_order, stage_work
from character.pipeline import config_help
from character.reporting.compare import compare
from character.review.app import serve
from character.review.marks import active_constitution, announce, check_marks_traits, load_marks
from character.tracking.backends import server_problem
from character.tracking.progress import RunProgress, stage_table
from character.tracking.quiet import LOG_LEVEL_ENV, filter_stderr
from character.tracking.runs import ui_command
from character.training.deepspeed_setup import read_deepspeed_json

pipeline = run_order  # the stages `character run` goes through, in order


def validate(config: Config, stages: list[str]) -> None:
    """Checks that need more than the config file itself, still before any compute (a reviewer's
    verdicts.yaml among them)."""
    load_constitution(config.traits.path, config.traits.only)
    every_trait = [t.name for t in load_constitution(config.traits.path).traits]
    check_marks_traits(load_marks(config.run.output_dir), every_trait, config.run.output_dir)
    for stage in stages:
        check_stage_config(config, stage)
    read_deepspeed_json(config.train.deepspeed_config)
    if config.tracking.backend != "none":
        if importlib.util.find_spec(config.tracking.backend) is None:
            raise ConfigError(f"{config.source}: tracking.backend is '{config.tracking.backend}' but the package is "
                              f"not installed (pip install {config.tracking.backend}), or set tracking.backend: none")
    uri = config.tracking.uri or ""
    if config.tracking.backend == "mlflow" and uri.startswith(("http://", "https://")):
        if (why := server_problem(uri)) is not None:  # an outage later is kept (character/tracking/outage.py)
            raise ConfigError(f"{config.source}: tracking.uri {uri} does not answer ({why}): start the server, "
                              f"or set tracking.backend: none")


def run_progress(config: Config, names: list[str], marks):
    constitution = active_constitution(config, "run", quiet=True, marks=marks)
    work = stage_work(config, len(constitution.traits), sum(len(t.questions) for t in constitution.traits))
    return RunProgress(names, work)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="character", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*STAGES, "run"]:
        p = sub.add_parser(name, help="every stage in order, skipping complete ones" if name == "run"
                           else f"stage '{name}': {STAGES[name].summary}")
        p.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny.yaml)")
        p.add_argument("--force", action="store_true", help="redo the stage even if its output is complete")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synthesize.messages_per_trait=16")
        p.add_argument("--break-lock", action="store_true",
                       help="take the run directory's lease even from a holder that looks alive (it is gone)")
        p.add_argument("--debug", action="store_true", default=os.environ.get("CHARACTER_DEBUG") == "1",
                       help="show the traceback of a stage's input error (also CHARACTER_DEBUG=1)")
        p.add_argument("--verbose", action="store_true",
                       help=f"every line Ray writes, its INFO progress blocks too (also {LOG_LEVEL_ENV}=verbose)")
        if name == "run":
            p.add_argument("--from", dest="from_stage", choices=list(STAGES), default=None,
                           help="redo this stage and every later one (e.g. rank, after `character review`)")
    p = sub.add_parser("review", help="a local web page to review a run trait by trait and mark what is wrong")
    p.add_argument("--run", required=True, help="the run directory (local path or URI)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; elsewhere a token is "
                                                      "required)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--reviewer", default=None, help="name recorded with verdicts and flags (default: $USER)")
    p = sub.add_parser("config", help="every setting: type, default, description (and a file's resolved value)")
    p.add_argument("--config", default=None, help="a YAML config file whose resolved values to show")
    p.add_argument("args", nargs="*", help="a section (e.g. ppo, engine.actors) and/or key.sub=value overrides")
    p = sub.add_parser("compare", help="runs side by side: a table here and one HTML page")
    p.add_argument("runs", nargs="+", help="run directories (local paths or URIs)")
    p.add_argument("--output", default="compare.html", help="the HTML page to write (default: compare.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "config":
        return config_help.main([*(["--config", args.config] if args.config else []), *args.args])
    if args.command == "compare":
        table, _ = compare(args.runs, args.output)
        print(table, f"\npage: {args.output}", sep="\n")
        return 0
    if args.command == "review":
        serve(args.run, args.host, args.port, args.reviewer)
        return 0
    if getattr(args, "verbose", False):
        os.environ[LOG_LEVEL_ENV] = "verbose"  # read by the Ray set-up of every stage (character/tracking/quiet.py)
    try:
        config = load_config(args.config, args.overrides)
        names = pipeline(config) if args.command == "run" else [args.command]
        validate(config, names)
        from_stage = getattr(args, "from_stage", None)
        if from_stage and from_stage not in names:
            raise ConfigError(f"--from {from_stage}: not a stage of this run ({', '.join(names)})")
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    try:
        with RunLease(config.run.output_dir, names[0], args.break_lock) as lease:
            return _run_stages(args, config, names, from_stage, lease)
    except RunInUseError as exc:  # raised only while taking the lease: nothing ran
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the lease itself could not be written
        if args.debug or not (full := find_no_space(exc, config.run.output_dir)):
            raise
        print(f"{names[0]}: {full}", file=sys.stderr)
        return 1


def _run_stages(args, config: Config, names: list[str], from_stage: str | None, lease: RunLease) -> int:
    """The stages of the command in order, under the run directory's lease; the exit status."""
    # Once a stage does work, every later stage is redone: its inputs have changed.
    redo = args.force
    worked, results = [], []
    progress = None
    if args.command == "run":
        marks = load_marks(config.run.output_dir)
        announce("run", config.run.output_dir, marks)
        progress = run_progress(config, names, marks)
    for index, name in enumerate(names):
        stage = importlib.import_module(STAGES[name].module)
        redo = redo or name == from_stage
        lease.set_stage(name)
        if progress:
            print(progress.begin(index), flush=True)
        try:
            result = stage.run(config, force=redo)
        except Exception as exc:
            # What a user can fix (an upstream not run, an unreadable part, no usable rows, a full disk) is one
            # line; a defect of a single stage command keeps its traceback, and --debug shows every one.
            if not args.debug and (full := find_no_space(exc, config.run.output_dir)):
                print(f"{name}: {full}", file=sys.stderr)
                return 1
            if args.debug or (args.command != "run" and not isinstance(exc, StageInputError)):
                raise
            what = str(exc) if isinstance(exc, StageInputError) else f"failed: {type(exc).__name__}: {exc}"
            resume = (f"\nstopped; fix the cause and rerun `character run` to resume from '{name}'"
                      if args.command == "run" else "")
            print(f"[{name}] {what}{resume}", file=sys.stderr)
            return 1
        print(result.line(), flush=True)
        results.append(dict(result.summary(), stage=name, skipped=result.skipped))
        if progress:
            progress.end(index, result.skipped)
        if not result.skipped:
            redo = True
            worked.append(name)
    if args.command == "run":
        print(stage_table(results))
        print("nothing to do: every stage is complete" if not worked else f"stages run: {', '.join(worked)}")
        print(f"report: {StageOutput(config.run.output_dir, STAGES['report'].output).path('index.html')}", flush=True)
    if config.tracking.backend == "mlflow" and worked:
        print(f"tracking: {ui_command(config)}", flush=True)
    return 0


def command(argv: list[str] | None = None) -> int:
    """The `character` command and `python -m rayjobs ...`: main() with a log a person can read (known-harmless
    lines dropped from stderr; character/tracking/quiet.py). Tests call main() and keep their own stderr."""
    if not {"--verbose"} & set(sys.argv[1:] if argv is None else argv):
        filter_stderr()
    return main(argv)


if __name__ == "__main__":
    sys.exit(command())
