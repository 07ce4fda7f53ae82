"""PPO: the per-iteration time split of the real train-ppo stage, and vLLM vs Hugging Face rollouts.

What it measures, in two parts (--parts), on one model (--model, default the built-in tiny-llama):

  stage    `character.stages.train_ppo.run(config)` on configs/tiny.yaml with the rule reward
           (ppo.reward=rule ppo.critic_init=policy judge.kind=rule judge.rule.type=length
           judge.rule.target_words=0), ppo.iterations=--iterations, in a FRESH subprocess per repetition
           (its own local Ray, Ray Train workers, DeepSpeed engines, vLLM rollout actor). The messages/ stage
           it needs is synthesized ONCE (`character.stages.synthesize.run`, --messages-per-trait) in a
           temporary folder and copied into each repetition's run folder. From policy/metrics.jsonl (the
           per-iteration lines) it reports time_generation, time_scoring, time_training, time_sync and
           their sum ("total": eval, checkpoints and the metric all-reduce are outside it), as medians
           over the iterations after the first (warm-up), and the sync share = time_sync / total
           (median of the per-iteration shares; target <= 5%: PASS/FAIL). time_sync is the whole
           in-place weight sync of ppo_loop: gather/clone of the full state dict, ray.put, the actor's
           update_weights (vLLM reload_weights + prefix-cache reset) and a barrier.
  rollout  in ONE fresh subprocess, the same policy weights sampled two ways, interleaved (the order
           rotates per repetition), for each batch size in --prompts:
             vllm  `character.inference.rollout.RolloutEngine` instantiated in-process (no Ray) on config.engine;
                   its `generate` (one seed per prompt, as ppo_loop derives them) is timed; engine
                   start-up is reported once and excluded.
             hf    `AutoModelForCausalLM.generate` (left padding, do_sample=True, top_k=0, the same
                   temperature/top_p/max_new_tokens) on the same weights, one batch of all prompts,
                   `torch.set_num_threads(2)`; model load excluded.
           Prompts are the chat prefixes ppo_loop uses (`character.data.pm_data.chat_prefix`, cut to
           ppo.max_prompt_tokens) of the synthesized training messages; sampling is ppo.sampling
           (temperature 1, top_p 1, max_tokens 32 in tiny.yaml). Each contender gets one untimed
           warm-up call first. Figures: tokens/s (new tokens actually generated, eos included, padding
           excluded) and rollouts/s, and the ratio vllm/hf (target: > 1, vLLM faster). Also the in-place
           weight sync alone (`RolloutEngine.update_weights` with the HF model's state_dict, no Ray, no
           gather) next to one rollout batch's vLLM generation time, and a plain copy (clone) of the same
           weights: the floor a sync cannot beat.

Quote MEDIANS over the repetitions together with the machine load printed at start and end: on a 2-core
box anything else running (a test suite) skews absolute figures; the interleaved ratios are more robust.

Run (from the repository root):
  .venv/bin/python benchmarks/ppo.py                                  # full: tiny-llama, 8 iterations, 3 reps
  .venv/bin/python benchmarks/ppo.py --model random-llama-5m          # bigger weights: a more telling sync share
  .venv/bin/python benchmarks/ppo.py --iterations 3 --reps 1 --prompts 16   # quick check
  # the real model: rollouts and the weight sync next to a plain copy of the weights
  .venv/bin/python benchmarks/ppo.py --model smollm2-135m-instruct --parts rollout --prompts 16 --reps 3 --messages-per-trait 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/ppo.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (ROOT, add_model, argument_parser, child_env, comma_list, emit_result,  # noqa: E402
                                 fmt, load_line, rotation, run_worker, script_command)

PHASES = ("time_generation", "time_scoring", "time_training", "time_sync")
SYNC_TARGET = 0.05  # time_sync / total per iteration
RULE = ["ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule", "judge.rule.type=length",
        "judge.rule.target_words=0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_model(p)
    p.add_argument("--parts", default="stage,rollout", help="comma list out of stage,rollout")
    p.add_argument("--iterations", type=int, default=8, help="PPO iterations per stage run (the first is warm-up)")
    p.add_argument("--stage-prompts", type=int, default=None,
                   help="ppo.prompts_per_iteration of the stage runs (default: the config's, 16)")
    p.add_argument("--prompts", default="32,64", help="rollout batch sizes (comma list)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (stage runs; interleaved rollout rounds)")
    p.add_argument("--messages-per-trait", type=int, default=40, help="synthesized once, reused by every run")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    p.add_argument("--worker", choices=["synth", "stage", "rollout"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)  # worker: run folder
    return p.parse_args(argv)


def make_config(args, out: str, *extra: str):
    from character.core.config import load_config

    return load_config(args.config, [f"run.output_dir={out}", f"traits.path={ROOT / 'configs/traits/tiny.yaml'}",
                                     f"model.name={args.model}", *RULE, *extra])


# --------------------------------------------------------------------------------------------- workers


def worker_synth(args) -> None:
    from character.stages import synthesize

    t0 = time.perf_counter()
    result = synthesize.run(make_config(args, args.out, f"synthesize.messages_per_trait={args.messages_per_trait}"))
    emit_result({"rows": result.rows_out, "seconds": time.perf_counter() - t0})


def worker_stage(args) -> None:
    import ray

    from character.stages import train_ppo

    extra = [f"ppo.iterations={args.iterations}", "ppo.eval_every=100000", "train.checkpoint_every=100000"]
    if args.stage_prompts:
        extra.append(f"ppo.prompts_per_iteration={args.stage_prompts}")
    t0 = time.perf_counter()
    result = train_ppo.run(make_config(args, args.out, *extra))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    emit_result({"seconds": seconds, "fit_s": result.seconds})


def worker_rollout(args) -> None:
    """One process: vLLM RolloutEngine and HF generate on the same weights, interleaved."""
    from character.models.loading import load_causal_lm, load_tokenizer
    from character.data.pm_data import chat_prefix
    from character.inference.rollout import RolloutEngine, arrays_for_engines
    from character.training.ppo.loop import iteration_seeds
    from character.data.splits import ppo_messages

    config = make_config(args, args.out)
    cfg, seed = config.ppo, config.run.seed
    sizes = [int(x) for x in comma_list(args.prompts)]
    train, _ = ppo_messages(config)
    tokenizer = load_tokenizer(config.model.name)
    rows = [train[k % len(train)] for k in range(max(sizes))]  # wraps around like ppo_loop's epochs
    prompts = [chat_prefix(tokenizer, r["text"])[-cfg.max_prompt_tokens:] for r in rows]
    sampling = cfg.sampling.model_dump()

    t0 = time.perf_counter()
    engine = RolloutEngine(config.model.name, config.model.dtype, config.engine.model_dump(), seed)
    startup = time.perf_counter() - t0
    import torch

    torch.set_num_threads(2)  # vLLM's CPU worker may already pin it (create_llm sets num_cpus_per_actor)
    t0 = time.perf_counter()
    model = load_causal_lm(config.model.name, config.model.dtype).eval()
    load = time.perf_counter() - t0
    tie = bool(model.config.tie_word_embeddings)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def run_vllm(n: int, rep: int) -> tuple[int, float]:
        t = time.perf_counter()
        outs = engine.generate(prompts[:n], iteration_seeds(rows[:n], rep, seed), sampling)["samples"]
        return sum(len(o["token_ids"]) for o in outs), time.perf_counter() - t

    def run_hf(n: int, rep: int) -> tuple[int, float]:
        t = time.perf_counter()
        width = max(len(p) for p in prompts[:n])
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts[:n]])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts[:n]])
        torch.manual_seed(seed + rep)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                 temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                 max_new_tokens=cfg.sampling.max_tokens, min_new_tokens=0,
                                 eos_token_id=eos, pad_token_id=pad)
        tokens = sum(seq.index(eos) + 1 if eos in seq else len(seq) for seq in out[:, width:].tolist())
        return tokens, time.perf_counter() - t

    warm = {"vllm": run_vllm(min(sizes), -2)[1], "hf": run_hf(min(sizes), -2)[1]}
    runs, syncs, copy_s = [], [], []
    for rep in range(args.reps):
        for n in sizes:
            for name in rotation(["vllm", "hf"], rep):
                tokens, seconds = (run_vllm if name == "vllm" else run_hf)(n, rep)
                runs.append({"rep": rep, "n": n, "name": name, "tokens": tokens, "s": seconds})
        t = time.perf_counter()
        engine.update_weights(arrays_for_engines(model.state_dict(), tie), tie, rep + 1)
        syncs.append(time.perf_counter() - t)
        weights = [v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")]
        t = time.perf_counter()
        copies = [v.clone() for v in weights]  # the floor: one plain memory copy of what the engine receives
        copy_s.append(time.perf_counter() - t)
        del copies
    emit_result({"startup_s": startup, "load_s": load, "warm": warm, "threads": torch.get_num_threads(), "runs": runs,
          "sync_s": syncs, "copy_s": copy_s, "params": sum(p.numel() for p in model.parameters()),
          "mb": sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20})


def run_part(kind: str, args, out: str) -> dict:
    """One fresh subprocess of this script (`--worker kind`), its wall time as "process_s"."""
    cmd = script_command(__file__, "--worker", kind, "--out", out, "--model", args.model, "--config", args.config,
                         "--iterations", str(args.iterations), "--prompts", args.prompts, "--reps", str(args.reps),
                         "--messages-per-trait", str(args.messages_per_trait))
    if args.stage_prompts:
        cmd += ["--stage-prompts", str(args.stage_prompts)]
    env = child_env(VLLM_LOGGING_LEVEL="WARNING", RAY_DEDUP_LOGS="1")
    return run_worker(cmd, env, what=f"{kind} worker", wall_key="process_s")


# -------------------------------------------------------------------------------------------- reporting


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def stage_part(args, base: str) -> None:
    print(f"=== 1. train-ppo stage: {args.iterations} iterations x {args.reps} fresh run(s); "
          f"prompts_per_iteration {args.stage_prompts or 'from the config'}; first iteration = warm-up, skipped",
          flush=True)
    header = f"  {'run':<8}" + "".join(f"{p[5:]:>12}" for p in PHASES) + f"{'total':>10}{'sync %':>9}{'wall':>8}"
    print(header + "   (seconds per iteration, medians over iterations)")
    pooled: dict[str, list[float]] = {k: [] for k in (*PHASES, "total", "share")}
    for rep in range(args.reps):
        out = os.path.join(base, f"stage-{rep}")
        shutil.copytree(os.path.join(base, "synth", "messages"), os.path.join(out, "messages"))
        r = run_part("stage", args, out)
        lines = [json.loads(x) for x in open(os.path.join(out, "policy", "metrics.jsonl"))]
        its = [x for x in lines if "reward" in x]
        its = its[1:] if len(its) > 1 else its
        row = {k: [x[k] for x in its] for k in PHASES}
        row["total"] = [sum(x[k] for k in PHASES) for x in its]
        row["share"] = [x["time_sync"] / t for x, t in zip(its, row["total"])]
        for k, v in row.items():
            pooled[k] += v
        print(f"  {'rep ' + str(rep + 1):<8}" + "".join(f"{med(row[k]):>12.3f}" for k in PHASES)
              + f"{med(row['total']):>10.3f}{100 * med(row['share']):>8.1f}%{r['process_s']:>7.0f}s"
              + f"   (load {os.getloadavg()[0]:.2f}; fit {r['fit_s']:.0f}s)", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    share = med(pooled["share"])
    print(f"  {'median':<8}" + "".join(f"{med(pooled[k]):>12.3f}" for k in PHASES)
          + f"{med(pooled['total']):>10.3f}{100 * share:>8.1f}%   (over {len(pooled['total'])} iterations)")
    total = med(pooled["total"])
    print("  split of the median total: " + ", ".join(f"{p[5:]} {100 * med(pooled[p]) / total:.0f}%" for p in PHASES))
    print(f"  sync share {100 * share:.1f}% (target <= {100 * SYNC_TARGET:.0f}%): "
          f"{'PASS' if share <= SYNC_TARGET else 'FAIL'}\n", flush=True)


def rollout_part(args, base: str) -> None:
    r = run_part("rollout", args, os.path.join(base, "synth"))
    print(f"=== 2. rollouts, vLLM RolloutEngine (in-process) vs HF generate, same weights ({r['params'] / 1e6:.2f}M "
          f"params, {r['mb']:.1f} MB fp32); {args.reps} interleaved round(s); torch threads {r['threads']}")
    print(f"  vLLM engine start-up {r['startup_s']:.1f}s, HF model load {r['load_s']:.1f}s (neither timed below); "
          f"untimed warm-up calls: vllm {r['warm']['vllm']:.2f}s, hf {r['warm']['hf']:.2f}s")
    print(f"  {'batch':>6}{'rep':>5}  {'name':<6}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'rollouts/s':>12}")
    for x in r["runs"]:
        print(f"  {x['n']:>6}{x['rep'] + 1:>5}  {x['name']:<6}{x['tokens']:>8}{x['s']:>9.2f}"
              f"{fmt(x['tokens'] / x['s']):>9}{x['n'] / x['s']:>12.1f}")
    print(f"  medians over {args.reps} round(s):")
    print(f"  {'batch':>6}  {'vllm tok/s':>11}{'hf tok/s':>10}{'vllm roll/s':>13}{'hf roll/s':>11}"
          f"{'vllm/hf tok/s':>15}{'vllm/hf roll/s':>16}  [roll/s ratio per round]")
    gen_s = {}
    for n in sorted({x["n"] for x in r["runs"]}):
        pick = {name: [x for x in r["runs"] if x["n"] == n and x["name"] == name] for name in ("vllm", "hf")}
        tps = {k: med([x["tokens"] / x["s"] for x in v]) for k, v in pick.items()}
        rps = {k: med([n / x["s"] for x in v]) for k, v in pick.items()}
        per = [b["s"] / a["s"] for a, b in zip(pick["vllm"], pick["hf"])]  # rollouts/s ratio per round
        gen_s[n] = med([x["s"] for x in pick["vllm"]])
        verdict = "PASS" if rps["vllm"] > rps["hf"] else "FAIL"
        print(f"  {n:>6}  {fmt(tps['vllm']):>11}{fmt(tps['hf']):>10}{rps['vllm']:>13.1f}{rps['hf']:>11.1f}"
              f"{tps['vllm'] / tps['hf']:>14.2f}x{rps['vllm'] / rps['hf']:>15.2f}x  [{', '.join(f'{p:.2f}' for p in per)}] {verdict} (vLLM faster)")
    sync = med(r["sync_s"])
    print(f"  in-place weight sync (update_weights, in-process): median {1000 * sync:.0f} ms "
          f"[{', '.join(f'{1000 * s:.0f}' for s in r['sync_s'])}] vs one vLLM rollout batch: "
          + ", ".join(f"{n} prompts {s:.2f}s ({100 * sync / s:.1f}%)" for n, s in gen_s.items()))
    copy = med(r["copy_s"])
    print(f"  a plain copy of the weights the engine receives (clone, tied head once): median {1000 * copy:.0f} ms; "
          f"sync / copy {sync / copy:.1f}x (vLLM on CPU re-packs every linear weight for oneDNN on load)\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return {"synth": worker_synth, "stage": worker_stage, "rollout": worker_rollout}[args.worker](args)
    parts = comma_list(args.parts)
    if not parts or set(parts) - {"stage", "rollout"}:
        sys.exit("--parts: comma list out of stage,rollout")
    from character.models.loading import resolve_model

    resolve_model(args.model)  # build/cache a built-in model once, outside every timing
    print(f"model {args.model}; config {args.config} with {' '.join(RULE)}; reps {args.reps}")
    print(load_line("start"), flush=True)
    base = tempfile.mkdtemp(prefix="character-bench-ppo-")
    try:
        s = run_part("synth", args, os.path.join(base, "synth"))
        print(f"messages/: {s['rows']} messages synthesized once ({args.messages_per_trait} per trait) in "
              f"{s['seconds']:.0f}s (not timed below){'; kept in ' + base if args.keep else ''}\n", flush=True)
        if "stage" in parts:
            stage_part(args, base)
        if "rollout" in parts:
            rollout_part(args, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
