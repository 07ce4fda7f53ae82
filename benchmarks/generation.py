"""Generation throughput: Ray Data + vLLM actors vs direct in-process vLLM vs batched Hugging Face generate.

What it measures (tokens/s = new tokens actually generated / seconds), on the same model, the same chat
prompts (built like the synthesize stage: `synthesis_prompt` over the traits of
configs/traits/constitution.yaml, chat template via `character.inference.engine.chat_token_ids`, one seed per
row) and the same sampling settings (temperature, top_p, n, max_tokens; top-k off everywhere):

  ray    Ray Data end to end: `ray.data.from_items(rows).map_batches(ChatGenerator, ...,
         **generation_pool_args(engine))` consumed with `iter_batches`; timed from dataset creation to the
         last row, INCLUDING the actor's start-up (import vllm + vllm.LLM() happen in the actor). A local
         Ray (`ray.init(num_cpus=4, object_store_memory=...)`) is started ONCE before the repetitions and
         is not timed; it stays up (idle) while the other contenders run.
  direct `character.inference.engine.create_llm` + `character.inference.engine.generate_chat` in a fresh subprocess per
         repetition. "cold" = from before create_llm (which imports vllm) to the end; "warm" = the
         generate_chat call only, in the same subprocess.
  hf     transformers `model.generate` (left padding, do_sample, temperature/top_p, top_k=0,
         num_return_sequences=n, `torch.set_num_threads(2)`) in batches of --hf-batch-size prompts, in a
         fresh subprocess per repetition; timed over generation only (chat templating + padding +
         generate); the model load time is reported separately.

Engine: `EngineConfig(num_cpus_per_actor=2, kv_cache_gib=1, max_model_len=512, actors 1..1)`, so the
OpenMP thread count (2) is the same in all three. The Ray path runs `--batch-size` rows per call and up to
`engine.concurrent_batches` calls at once per actor (character/inference/shared_engine.py; `--concurrent-batches`). The tiny random models rarely emit eos and
SamplingConfig has no ignore_eos, so outputs are nearly fixed-length; the actual new tokens are counted
(vLLM: sum of len(token_ids); HF: tokens up to and including the first eos, padding excluded).

Contenders are interleaved: each repetition runs all of them, the order rotating per repetition. A
table per repetition, then medians and the ratios ray/direct_cold and direct_warm/hf, plus the load
average at start and end and the other python processes seen. Quote figures as MEDIANS over the
repetitions together with the machine load printed at start and end (a busy machine skews everything;
the interleaved ratios are more robust than the absolute numbers).

Run (from the repository root):
  # full size: 400 prompts x n=4 x 32 tokens = 51.2k new tokens per contender and repetition
  .venv/bin/python benchmarks/generation.py
  # a bigger model with a smaller workload
  .venv/bin/python benchmarks/generation.py --model random-qwen2-100m --prompts 64 --n 2 --max-tokens 32
  # the real model, in-character chats that stop at eos (ragged lengths), as the respond stage runs them
  .venv/bin/python benchmarks/generation.py --model smollm2-135m-instruct --prompts-from respond --prompts 64 \
      --n 4 --max-tokens 64 --contenders direct,hf --reps 3
  # quick check
  .venv/bin/python benchmarks/generation.py --reps 1 --prompts 40 --n 2 --max-tokens 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/generation.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (ROOT, add_dtype, add_model, argument_parser, child_env, choose,  # noqa: E402
                                 emit_result, fmt, load_line, ratio, rotation, run_worker, script_command)

CONTENDERS = ("ray", "direct", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_model(p)
    add_dtype(p)
    p.add_argument("--prompts", type=int, default=400, help="chat prompts (rows)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list out of ray,direct,hf")
    p.add_argument("--batch-size", type=int, default=64, help="rows per map_batches call (Ray path)")
    p.add_argument("--concurrent-batches", type=int, default=None,
                   help="map_batches calls per engine actor at once (Ray path; default: EngineConfig's)")
    p.add_argument("--hf-batch-size", type=int, default=64,
                   help="prompts per HF generate call (x n sequences with num_return_sequences)")
    p.add_argument("--object-store-mb", type=int, default=1024, help="object store of the local Ray")
    p.add_argument("--ray-logs", action="store_true", help="forward Ray worker logs (vLLM warnings) to the driver")
    p.add_argument("--traits", default=str(ROOT / "configs" / "traits" / "constitution.yaml"))
    p.add_argument("--prompts-from", choices=["synthesis", "respond"], default="synthesis",
                   help="synthesis: the synthesize stage's list prompts (a random model runs to max tokens); "
                        "respond: the respond stage's in-character chats (trait system prompt + a seed question), "
                        "where a real model stops at eos after ragged lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["direct", "hf"], help=argparse.SUPPRESS)  # subprocess mode
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- shared


def engine_config(args):
    from character.core.config import EngineConfig

    extra = {} if args.concurrent_batches is None else {"concurrent_batches": args.concurrent_batches}
    return EngineConfig(num_cpus_per_actor=2, kv_cache_gib=1, max_model_len=512,
                        actors={"min": 1, "max": 1}, batch_size=args.batch_size, **extra)


def sampling_config(args):
    from character.core.config import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, n=args.n)


def build_rows(args) -> list[dict]:
    """Chat prompts over the constitution's traits (--prompts-from), one seed per row."""
    from character.core.config import SynthesizeConfig
    from character.data.prompts import SYNTH_SYSTEM, character_system_prompt, synthesis_prompt
    from character.core.store import seed_from_id, stable_id
    from character.core.traits import load_constitution

    constitution = load_constitution(args.traits)
    traits = constitution.traits
    kinds = list(SynthesizeConfig().kinds)
    rows = []
    for i in range(args.prompts):
        trait = traits[i % len(traits)]
        index = i // len(traits)
        if args.prompts_from == "respond":
            question = trait.questions[index % len(trait.questions)] if trait.questions else trait.statement
            request_id = stable_id(trait.name, "respond", str(index), str(args.seed))
            rows.append({"request_id": request_id, "system": character_system_prompt(trait, constitution, "trait"),
                         "user": question, "assistant_prefix": "", "seed": seed_from_id(request_id, args.seed)})
            continue
        kind = kinds[index % len(kinds)]
        request_id = stable_id(trait.name, kind, str(index), str(args.seed))
        user, prefix = synthesis_prompt(trait, kind, index)
        rows.append({"request_id": request_id, "system": SYNTH_SYSTEM, "user": user, "assistant_prefix": prefix,
                     "seed": seed_from_id(request_id, args.seed)})
    return rows


# --------------------------------------------------------------------------------------------- workers


def worker_direct(args) -> None:
    """Fresh process: create_llm (imports vllm) + generate_chat; cold and warm timings."""
    from character.inference.engine import create_llm, generate_chat

    engine, sampling, rows = engine_config(args), sampling_config(args), build_rows(args)
    t0 = time.perf_counter()
    llm = create_llm(args.model, args.dtype, engine, args.seed)
    from character.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    t1 = time.perf_counter()
    results = generate_chat(llm, tokenizer, [r["system"] for r in rows], [r["user"] for r in rows],
                            [r["seed"] for r in rows], sampling, engine.max_model_len,
                            [r["assistant_prefix"] for r in rows])
    t2 = time.perf_counter()
    rejected = sum(1 for r in results if r["reject_reason"])
    tokens = sum(r.get("new_tokens", 0) for r in results)
    samples = sum(len(r["outputs"]) for r in results)
    emit_result({"tokens": tokens, "samples": samples, "rejected": rejected, "startup_s": t1 - t0,
          "cold_s": t2 - t0, "warm_s": t2 - t1})


def worker_hf(args) -> None:
    """Fresh process: batched transformers generate with left padding; load and generation timed apart."""
    import torch

    torch.set_num_threads(2)
    from character.inference.engine import chat_token_ids
    from character.models.loading import load_causal_lm, load_tokenizer

    rows, engine = build_rows(args), engine_config(args)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    model = load_causal_lm(args.model, args.dtype).eval()
    t1 = time.perf_counter()
    eos = tokenizer.eos_token_id
    tokens = samples = rejected = 0
    with torch.inference_mode():
        for start in range(0, len(rows), args.hf_batch_size):
            batch = rows[start:start + args.hf_batch_size]
            ids = [chat_token_ids(tokenizer, r["system"], r["user"], r["assistant_prefix"]) for r in batch]
            keep = [x for x in ids if len(x) + args.max_tokens <= engine.max_model_len]  # as generate_chat
            rejected += len(ids) - len(keep)
            if not keep:
                continue
            enc = tokenizer.pad({"input_ids": keep}, padding=True, return_tensors="pt")
            torch.manual_seed(batch[0]["seed"])  # one seed per batch: HF has no per-row seeds
            out = model.generate(
                **enc, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                max_new_tokens=args.max_tokens, min_new_tokens=0, num_return_sequences=args.n,
                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for seq in new:
                # Up to and including the first eos (vLLM counts the eos token too); the rest is padding.
                tokens += seq.index(eos) + 1 if eos in seq else len(seq)
            samples += len(new)
    t2 = time.perf_counter()
    emit_result({"tokens": tokens, "samples": samples, "rejected": rejected, "load_s": t1 - t0, "gen_s": t2 - t1})


def run_contender(kind: str, args) -> dict:
    """One fresh subprocess of this script (`--worker kind`); "process_s" = interpreter start + imports +
    everything, seen from outside."""
    cmd = script_command(
        __file__, "--worker", kind, "--model", args.model, "--dtype", args.dtype, "--prompts", str(args.prompts),
        "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
        "--top-p", str(args.top_p), "--batch-size", str(args.batch_size),
        *(["--concurrent-batches", str(args.concurrent_batches)] if args.concurrent_batches else []),
        "--hf-batch-size", str(args.hf_batch_size), "--traits", args.traits, "--seed", str(args.seed),
        "--prompts-from", args.prompts_from)
    return run_worker(cmd, child_env(VLLM_LOGGING_LEVEL="WARNING"), what=f"{kind} worker", wall_key="process_s")


# ------------------------------------------------------------------------------------------- Ray path


def start_ray(args) -> float:
    import ray

    t0 = time.perf_counter()
    # Worker logs are not forwarded by default (they interleave with the tables); actor errors still raise.
    ray.init(num_cpus=4, object_store_memory=args.object_store_mb * 1024 * 1024, log_to_driver=args.ray_logs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return time.perf_counter() - t0


def run_ray(args, rows: list[dict]) -> dict:
    import ray.data

    from character.inference.engine import ChatGenerator, generation_pool_args

    engine, sampling = engine_config(args), sampling_config(args)
    tokens = samples = rejected = n_rows = 0
    first = None
    t0 = time.perf_counter()
    ds = ray.data.from_items(rows).map_batches(
        ChatGenerator,
        fn_constructor_kwargs=dict(model_name=args.model, dtype=args.dtype, engine=engine.model_dump(),
                                   sampling=sampling.model_dump(), seed=args.seed),
        **generation_pool_args(engine),
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first or time.perf_counter() - t0
        n_rows += batch.num_rows
        tokens += sum(batch.column("new_tokens").to_pylist())
        samples += sum(len(o) for o in batch.column("outputs").to_pylist())
        rejected += sum(1 for r in batch.column("reject_reason").to_pylist() if r)
    seconds = time.perf_counter() - t0
    if n_rows != len(rows):
        raise RuntimeError(f"ray path returned {n_rows} rows, expected {len(rows)}")
    return {"tokens": tokens, "samples": samples, "rejected": rejected, "e2e_s": seconds, "first_s": first}


# -------------------------------------------------------------------------------------------- reporting


def metrics(name: str, r: dict) -> dict[str, float]:
    """tokens/s figures of one contender run, keyed by the column names of the summary."""
    if name == "ray":
        return {"ray_e2e": r["tokens"] / r["e2e_s"]}
    if name == "direct":
        return {"direct_cold": r["tokens"] / r["cold_s"], "direct_warm": r["tokens"] / r["warm_s"]}
    return {"hf_gen": r["tokens"] / r["gen_s"]}


def describe(name: str, r: dict) -> str:
    if name == "ray":
        return f"e2e {r['e2e_s']:.1f}s (actor start-up included; first batch back at {r['first_s']:.1f}s)"
    if name == "direct":
        return (f"cold {r['cold_s']:.1f}s = start-up {r['startup_s']:.1f}s + gen {r['warm_s']:.1f}s; "
                f"process {r['process_s']:.1f}s")
    return f"load {r['load_s']:.1f}s (import transformers + tokenizer + weights; not timed) + gen {r['gen_s']:.1f}s; process {r['process_s']:.1f}s"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "direct":
        return worker_direct(args)
    if args.worker == "hf":
        return worker_hf(args)

    contenders = choose(args.contenders, CONTENDERS)
    rows = build_rows(args)
    from character.models.loading import resolve_model

    resolve_model(args.model)  # build/cache a built-in model once, outside every timing
    requested = args.prompts * args.n * args.max_tokens
    print(f"model {args.model} ({args.dtype}); {args.prompts} prompts x n={args.n} x max_tokens={args.max_tokens} "
          f"= {requested} new tokens requested per run; temperature {args.temperature}, top_p {args.top_p}, "
          f"top_k off; engine num_cpus_per_actor=2, kv_cache_gib=1, max_model_len=512; Ray path batch_size "
          f"{args.batch_size}, concurrent_batches {engine_config(args).concurrent_batches}; reps {args.reps}")
    print(load_line("start"))
    if "ray" in contenders:
        seconds = start_ray(args)
        print(f"Ray: local ray.init(num_cpus=4, object_store_memory={args.object_store_mb} MB) started ONCE before "
              f"the repetitions in {seconds:.1f}s (not timed; it idles while the other contenders run); each Ray "
              f"repetition includes actor start-up. Worker logs {'forwarded' if args.ray_logs else 'off (--ray-logs)'}.")
    print(flush=True)

    per_metric: dict[str, list[float]] = {}
    tokens_seen: dict[str, list[int]] = {}
    per_rep_ratios: dict[str, list[float]] = {"ray_e2e/direct_cold": [], "direct_warm/hf_gen": []}
    for rep in range(args.reps):
        order = rotation(contenders, rep)
        print(f"--- repetition {rep + 1}/{args.reps}, order {' -> '.join(order)}, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"  {'contender':<12}{'tokens':>8}{'samples':>9}{'tok/s':>10}  detail")
        rep_metrics: dict[str, float] = {}
        for name in order:
            r = run_ray(args, rows) if name == "ray" else run_contender(name, args)
            tokens_seen.setdefault(name, []).append(r["tokens"])
            detail = describe(name, r) + (f"  [{r['rejected']} prompts rejected]" if r["rejected"] else "")
            for key, value in metrics(name, r).items():
                per_metric.setdefault(key, []).append(value)
                rep_metrics[key] = value
                print(f"  {key:<12}{r['tokens']:>8}{r['samples']:>9}{fmt(value):>10}  {detail}", flush=True)
                detail = '"'
        if "ray_e2e" in rep_metrics and "direct_cold" in rep_metrics:
            per_rep_ratios["ray_e2e/direct_cold"].append(rep_metrics["ray_e2e"] / rep_metrics["direct_cold"])
        if "direct_warm" in rep_metrics and "hf_gen" in rep_metrics:
            per_rep_ratios["direct_warm/hf_gen"].append(rep_metrics["direct_warm"] / rep_metrics["hf_gen"])

    print(f"\n=== medians over {args.reps} repetition(s) (tokens/s; quote these, with the load below)")
    med = {k: statistics.median(v) for k, v in per_metric.items()}
    for key, values in per_metric.items():
        print(f"  {key:<12}{fmt(med[key]):>10}   runs: {', '.join(fmt(v) for v in values)}")
    print("  ratios of tokens/s (ratio of medians; per-repetition ratios in brackets; < 1: the first is slower):")
    for label, (a, b) in {"ray_e2e/direct_cold": ("ray_e2e", "direct_cold"),
                          "direct_warm/hf_gen": ("direct_warm", "hf_gen")}.items():
        reps = ", ".join(f"{x:.2f}" for x in per_rep_ratios[label])
        print(f"    {label:<22}{ratio(med.get(a), med.get(b)):>8}   [{reps}]")
    from benchmarks.limits import decode_limit_line

    print("  " + decode_limit_line(resolve_model(args.model), {k: med[k] for k in ("direct_warm", "ray_e2e") if k in med}))
    counts = {name: sorted(set(v)) for name, v in tokens_seen.items()}
    print(f"  new tokens per run: {counts} (requested {requested}; vLLM paths use the same per-row seeds)")
    if "ray" in contenders:
        import ray

        ray.shutdown()  # first, so that our own Ray processes are not counted as "other" below
        time.sleep(2)
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
