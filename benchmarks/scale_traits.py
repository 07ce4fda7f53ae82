"""Scaling of the real `synthesize` stage with the number of traits: driver peak memory and wall time.

What it measures: for each size N (default 10 and 1000) a constitution of N generated traits
(`trait_0000`..., statement "I value thing N ...", clarification "...") is written to a temp folder, and
`character.stages.synthesize.run(config)` runs on it in a FRESH subprocess (configs/tiny.yaml with
overrides: that constitution, an output dir in the temp folder, few short messages per trait). Printed
per size: the driver's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss` of that subprocess; the
Ray workers are separate processes, which is the point: rows must stay in the workers and only counts
may reach the driver), the wall time of the whole call (Ray start included) and the stage's own timer,
the time per trait, and the marginal time per extra trait between the smallest and largest size. Then
the ratios largest/smallest: memory must be <= 1.2 (a FAIL line otherwise), time should grow roughly
linearly (fixed costs such as Ray and actor start-up dominate small sizes, hence the marginal figure).

Run (from the repository root):
  .venv/bin/python benchmarks/scale_traits.py                      # full: 10 and 1000 traits
  .venv/bin/python benchmarks/scale_traits.py --sizes 10,50        # quick check
  .venv/bin/python benchmarks/scale_traits.py --reps 3             # interleaved repetitions, medians

Quote figures as MEDIANS (use --reps 3 for figures you report) and note the machine load printed at
start and end: the wall time is sensitive to whatever else runs on the box; peak RSS much less so.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/scale_traits.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (ROOT, argument_parser, child_env, comma_list, emit_result,  # noqa: E402
                                 load_line, run_worker, script_command)

MEMORY_LIMIT = 1.2  # peak driver RSS, largest / smallest size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--sizes", default="10,1000", help="comma list of trait counts")
    p.add_argument("--messages-per-trait", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8, help="synthesize.sampling.max_tokens")
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions (medians are printed)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, repeatable (e.g. engine.batch_size=128)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (constitutions and outputs)")
    # subprocess mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--traits-file", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_constitution(path: Path, n: int) -> None:
    import yaml

    traits = [{"name": f"trait_{i:04d}",
               "statement": f"I value thing {i} and try to let it show in how I answer people.",
               "clarification": f"This is generated trait number {i}, for a scaling benchmark; it means nothing."}
              for i in range(n)]
    path.write_text(yaml.safe_dump({"name": f"scale-{n}", "description": f"{n} generated traits",
                                    "traits": traits}, sort_keys=False))


def worker(args) -> None:
    """Fresh process: one synthesize run; prints peak RSS of this (driver) process and timings."""
    import resource

    from character.core.config import load_config
    from character.stages import synthesize

    overrides = [f"traits.path={args.traits_file}", f"run.output_dir={args.output_dir}",
                 f"synthesize.messages_per_trait={args.messages_per_trait}",
                 f"synthesize.sampling.max_tokens={args.max_tokens}", *args.override]
    config = load_config(args.config, overrides)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = synthesize.run(config, force=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    import ray

    ray.shutdown()
    emit_result({
        "wall_s": wall, "stage_s": result.seconds, "rows_in": result.rows_in, "rows_out": result.rows_out,
        "drops": dict(result.drops), "requested": result.extra.get("requested"),
        "new_tokens": result.extra.get("new_tokens_this_run"), "traits_out": len(result.extra.get("per_trait", {})),
        "peak_rss_mib": peak_kib / 1024, "rss_before_run_mib": rss_before / 1024,
    })


def run_size(args, n: int, tmp: Path, rep: int) -> dict:
    traits_file = tmp / f"constitution-{n}.yaml"
    if not traits_file.exists():
        write_constitution(traits_file, n)
    out_dir = tmp / f"run-{n}-rep{rep}"
    cmd = script_command(__file__, "--worker", "--traits-file", str(traits_file), "--output-dir", str(out_dir),
                         "--config", args.config, "--messages-per-trait", str(args.messages_per_trait),
                         "--max-tokens", str(args.max_tokens))
    for item in args.override:
        cmd += ["--override", item]
    result = run_worker(cmd, child_env(VLLM_LOGGING_LEVEL="WARNING"), what=f"synthesize with {n} traits",
                        wall_key="process_s")
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sizes = sorted({int(s) for s in comma_list(args.sizes)})
    if not sizes or min(sizes) < 1:
        sys.exit("--sizes: give positive trait counts, e.g. 10,1000")
    from character.core.config import load_config
    from character.models.loading import resolve_model

    base = load_config(args.config, args.override)  # fail early on a bad config or override
    resolve_model(base.model.name)  # build/cache a built-in model once, outside every timing
    print(f"synthesize on generated constitutions of {sizes} traits; {args.messages_per_trait} messages/trait, "
          f"max_tokens {args.max_tokens}; model {base.model.name}; engine actors "
          f"{base.engine.actors.min}..{base.engine.actors.max}, batch_size {base.engine.batch_size}; "
          f"ray num_cpus {base.ray.num_cpus}; each run in a fresh subprocess; reps {args.reps}")
    print(load_line("start"), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="scale_traits-"))
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    try:
        for rep in range(args.reps):
            order = sizes if rep % 2 == 0 else sizes[::-1]
            print(f"\n--- repetition {rep + 1}/{args.reps}, order {order}, load {os.getloadavg()[0]:.2f}")
            print(f"  {'traits':>7}{'requests':>9}{'rows in':>8}{'kept':>7}{'peak RSS MiB':>13}{'wall s':>8}"
                  f"{'stage s':>8}{'s/trait':>9}  drops")
            for n in order:
                r = run_size(args, n, tmp, rep)
                runs[n].append(r)
                drops = ", ".join(f"{k}={v}" for k, v in sorted(r["drops"].items())) or "none"
                print(f"  {n:>7}{r['requested']:>9}{r['rows_in']:>8}{r['rows_out']:>7}{r['peak_rss_mib']:>13.0f}"
                      f"{r['wall_s']:>8.1f}{r['stage_s']:>8.1f}{r['wall_s'] / n:>9.3f}  {drops}; "
                      f"traits with output {r['traits_out']}; RSS before run {r['rss_before_run_mib']:.0f} MiB",
                      flush=True)
                if r["traits_out"] != n:
                    print(f"  WARNING: only {r['traits_out']} of {n} traits have kept messages")
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in ("peak_rss_mib", "wall_s", "stage_s")}
           for n in sizes}
    print(f"\n=== medians over {args.reps} repetition(s) (quote these, with the load below)")
    print(f"  {'traits':>7}{'peak RSS MiB':>13}{'wall s':>8}{'stage s':>8}{'wall s/trait':>13}")
    for n in sizes:
        print(f"  {n:>7}{med[n]['peak_rss_mib']:>13.0f}{med[n]['wall_s']:>8.1f}{med[n]['stage_s']:>8.1f}"
              f"{med[n]['wall_s'] / n:>13.4f}")
    small, large = sizes[0], sizes[-1]
    if large != small:
        mem_ratio = med[large]["peak_rss_mib"] / med[small]["peak_rss_mib"]
        time_ratio = med[large]["wall_s"] / med[small]["wall_s"]
        marginal = (med[large]["wall_s"] - med[small]["wall_s"]) / (large - small)
        fixed = med[small]["wall_s"] - marginal * small
        verdict = "PASS" if mem_ratio <= MEMORY_LIMIT else "FAIL"
        print(f"  driver peak memory {large}/{small}: {mem_ratio:.3f}  (limit {MEMORY_LIMIT}) {verdict}")
        print(f"  wall time {large}/{small}: {time_ratio:.2f} (trait ratio {large / small:.0f}); marginal "
              f"{marginal:.4f} s per extra trait, fixed part ~{fixed:.1f} s (Ray + actor start-up)")
        if marginal <= 0:
            print("  (a non-positive marginal time means fixed costs and noise dominate: use larger sizes or --reps)")
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
