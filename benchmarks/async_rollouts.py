"""Asynchronous rollouts: seconds per train-ppo iteration, synchronous vs ppo.async, and the idle time each side lost.

What it runs: the real `character.stages.train_ppo.run` on --model (default SmolLM2-135M-Instruct) with
configs/small.yaml's PPO recipe (GRPO, 4 prompts x 4 samples, 48 new tokens, bf16 training, fp32 engine), the
rule reward (fewer words; no preference model to train first) and policy.sft false (PPO starts from the base
model). The vLLM engine and the Ray Train worker get separate CPU reservations in ONE Ray session: one engine
actor with engine.num_cpus_per_actor (--engine-cpus, 1) and one worker with train.cpus_per_worker
(--trainer-cpus, 1); vLLM and torch size their thread pools to them. The messages are synthesized once; each
run trains from scratch in its own run folder.

The contenders, interleaved (the order rotates per repetition), --reps times each:
  sync   ppo.async.enabled false: generate, then score and train, then sync the weights.
  async  ppo.async.enabled true, max_staleness 1: the engine generates batch i+1 while the worker scores and
         trains on batch i.
Per iteration, policy/metrics.jsonl gives time_iteration (rollouts, scoring, training, the wait for the batches
in flight and the weight sync; held-out evaluation and checkpoints are outside it), the phases, engine_idle_s
(seconds of the iteration the engine generated nothing) and trainer_idle_s (seconds the worker waited for
rollouts). The first iteration of every run is warm-up and left out; figures are medians over the remaining
iterations of all repetitions. A paper estimate for a GPU split follows: from the measured share of the
overlappable time that the overlap actually hid, the speed-up at a generation fraction of 0.5 to 0.9.

Quote the figures with the load lines printed at start and end: anything else running on a 2-core box
skews them.

Run (from the repository root):
  .venv/bin/python benchmarks/async_rollouts.py                        # SmolLM2-135M, 4 iterations, 3 reps
  .venv/bin/python benchmarks/async_rollouts.py --model tiny-llama --reps 1 --iterations 3   # quick check
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/async_rollouts.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT, add_model, argument_parser, load_line, rotation  # noqa: E402

MODES = {"sync": ["ppo.async.enabled=false"], "async": ["ppo.async.enabled=true", "ppo.async.max_staleness=1"]}
RULE = ["ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule", "judge.rule.type=length",
        "judge.rule.target_words=0"]
PHASES = ("time_generation", "time_scoring", "time_training", "time_sync", "engine_idle_s", "trainer_idle_s")


def parse_args(argv: list[str] | None = None):
    p = argument_parser(__doc__)
    add_model(p, default="smollm2-135m-instruct")
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations per run (the first is warm-up)")
    p.add_argument("--reps", type=int, default=3, help="runs per contender, interleaved")
    p.add_argument("--engine-cpus", type=int, default=1, help="engine.num_cpus_per_actor")
    p.add_argument("--trainer-cpus", type=int, default=1, help="train.cpus_per_worker (one worker)")
    p.add_argument("--messages-per-trait", type=int, default=24, help="synthesized once, reused by every run")
    p.add_argument("--set", action="append", default=[], help="more config overrides (key=value), for every run")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    return p.parse_args(argv)


def make_config(args, out: Path, *extra: str):
    from character.core.config import load_config

    return load_config(args.config, [
        f"run.output_dir={out}", f"model.name={args.model}", "policy.sft=false", "tracking.backend=none", *RULE,
        f"engine.num_cpus_per_actor={args.engine_cpus}", f"train.cpus_per_worker={args.trainer_cpus}",
        "train.num_workers=1", "ppo.rollout_engines=1", f"ppo.iterations={args.iterations}",
        f"ppo.eval_every={10 * args.iterations}", "ppo.eval_prompts=1", "train.checkpoint_every=100000",
        *args.set, *extra])


def overlap_estimate(sync_s: float, async_s: float, generation_s: float, rest_s: float) -> float:
    """The share of the overlappable time (the shorter of generation and the rest of an iteration) that the
    asynchronous loop hid: (sync - async) / min(generation, rest), in [0, 1] when the overlap helped."""
    return (sync_s - async_s) / max(min(generation_s, rest_s), 1e-9)


def gpu_speedup(generation_fraction: float, hidden: float) -> float:
    """Paper estimate: an iteration of generation fraction f (the rest 1 - f: scoring, training, sync) on
    separate GPUs, of which the share `hidden` of min(f, 1 - f) is overlapped: 1 / (1 - hidden * min(f, 1 - f))."""
    f = generation_fraction
    return 1.0 / (1.0 - max(0.0, min(hidden, 1.0)) * min(f, 1.0 - f))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray

    from character.stages import synthesize, train_ppo

    print(load_line("start"), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-async-"))
    ray.init(num_cpus=args.engine_cpus + args.trainer_cpus, include_dashboard=False, log_to_driver=False)
    try:
        synthesize.run(make_config(args, root / "data", f"synthesize.messages_per_trait={args.messages_per_trait}"))
        runs = {mode: [] for mode in MODES}
        for rep in range(args.reps):
            for mode in rotation(list(MODES), rep):
                out = root / f"{mode}-{rep}"
                out.mkdir()
                shutil.copytree(root / "data" / "messages", out / "messages")
                t0 = time.perf_counter()
                train_ppo.run(make_config(args, out, *MODES[mode]))
                lines = [json.loads(x) for x in (out / "policy" / "metrics.jsonl").read_text().splitlines()]
                iterations = [x for x in lines if "reward" in x]
                runs[mode].append({"wall_s": time.perf_counter() - t0, "iterations": iterations})
                print(f"[bench] rep {rep} {mode}: {runs[mode][-1]['wall_s']:.0f} s", flush=True)
                shutil.rmtree(out / "_train", ignore_errors=True)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, runs)
    print(load_line("end"), flush=True)


def report(args, runs: dict) -> None:
    med = {}
    for mode, found in runs.items():
        measured = [x for run in found for x in run["iterations"][1:]]  # the first iteration warms up
        med[mode] = {key: statistics.median(x[key] for x in measured) for key in ("time_iteration", *PHASES)}
        per_rep = [statistics.median(x["time_iteration"] for x in run["iterations"][1:]) for run in found]
        med[mode]["per_rep"] = per_rep
    print(f"\n=== seconds per train-ppo iteration, {args.model}, engine {args.engine_cpus} CPU / trainer "
          f"{args.trainer_cpus} CPU, {args.reps} reps interleaved, iterations 2..{args.iterations} of each run")
    print(f"{'':6} {'s/iter':>7} {'per rep':>22} " + " ".join(f"{k.replace('time_', ''):>15}" for k in PHASES))
    for mode, m in med.items():
        reps = ", ".join(f"{x:.1f}" for x in m["per_rep"])
        print(f"{mode:6} {m['time_iteration']:7.1f} {reps:>22} " + " ".join(f"{m[k]:15.2f}" for k in PHASES))
    sync, asyn = med["sync"], med["async"]
    speedup = sync["time_iteration"] / asyn["time_iteration"]
    generation = sync["time_generation"]
    rest = sync["time_iteration"] - generation
    hidden = overlap_estimate(sync["time_iteration"], asyn["time_iteration"], generation, rest)
    print(f"\nasync / sync: {speedup:.2f}x faster per iteration; generation is "
          f"{generation / sync['time_iteration']:.0%} of a synchronous iteration; the overlap hid {hidden:.0%} of "
          f"min(generation, rest) = {min(generation, rest):.1f} s")
    print("paper estimate, engines and trainers on separate GPUs, the same share hidden:")
    for f in (0.5, 0.6, 0.7, 0.8, 0.9):
        print(f"  generation fraction {f:.1f}: {gpu_speedup(f, hidden):.2f}x "
              f"(perfect overlap: {gpu_speedup(f, 1.0):.2f}x)")


if __name__ == "__main__":
    main()
