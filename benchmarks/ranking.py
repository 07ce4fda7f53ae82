"""Ranking throughput: log-probability scoring (the judge's way) vs generating a verdict and parsing it.

What it measures (comparisons/s = comparisons judged / seconds of the judging call, chat templating and
tokenisation included), on ONE in-process `vllm.LLM` created once with
`character.inference.engine.create_llm(model, dtype, EngineConfig(num_cpus_per_actor=2, kv_cache_gib=1), seed=0)`;
its start-up is printed but excluded from every timing and shared by all contenders:

  scoring     `character.judging.judge.ModelJudge.prob_first` (RankConfig() as the rank stage uses it, no chain of
              thought): one prefill of the chat prompt + "Answer:" and ONE sampled token whose
              log-probabilities for the option tokens (`logprob_token_ids`) give P(A). Always yields a
              usable probability; the judge is built on the shared engine (no second vllm.LLM).
  generation  the chat prompt of `comparison_prompt` with RankConfig(chain_of_thought=True,
              cot_max_tokens=M) (asks to reason, then end with 'Answer: A' or 'Answer: B'),
              `SamplingParams(max_tokens=M, temperature=0, ignore_eos=True)`, then the LAST 'Answer: A/B' is
              taken from the text with a regex. Texts without one are counted as unparseable: with a
              random model that is almost all of them, and a real model also fails some of the time -- an
              unparseable verdict is a lost comparison, which scoring never has (part of the point).
              ignore_eos (`--eos ignore`, the default) makes every verdict cost its M tokens, as a real
              model's reasoning roughly does; the built-in tiny models carry an eos bias and would
              otherwise stop after ~1 token (`--eos model` measures that degenerate case).
  cot-scoring (optional, --contenders) ModelJudge with chain_of_thought=True: reasoning is generated
              (stopping at 'Answer:' or the model's eos: ~1 token on the tiny models), then scored with
              the one-token prefill.

Workload: N comparisons (`character.judging.judge.Comparison`): trait texts of configs/traits/constitution.yaml
(round-robin), a message and two candidates drawn (seeded) from lines of
character/models/assets/tokenizer_corpus.txt (1-2 lines per candidate), resampled until the chain-of-thought
prompt + M new tokens fit max_model_len, so every contender judges all N. Each (repetition, contender)
gets a FRESH set from the same distribution (the rank stage never judges a comparison twice, and vLLM's
prefix caching, on by default as in the stages, would make a repeated prompt nearly free;
`--prefix-caching off` turns it off). An untimed warm-up runs each contender on its own small set
first. Repetitions are interleaved (the order rotates); per repetition a table, then medians, the ratio
scoring/generation and the load average at start and end. Quote MEDIANS with the load printed at start
and end; the ratio is more robust than the absolute figures. "usable/s" counts only comparisons that
gave a probability (scoring) or a parsed verdict (generation).

Run (from the repository root):
  .venv/bin/python benchmarks/ranking.py                                   # full: 512 comparisons x 3 reps
  .venv/bin/python benchmarks/ranking.py --model random-llama-5m           # a bigger built-in model
  .venv/bin/python benchmarks/ranking.py --contenders scoring,generation,cot-scoring
  .venv/bin/python benchmarks/ranking.py --comparisons 32 --reps 1         # quick check
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/ranking.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (ROOT, add_dtype, add_model, argument_parser, choose, fmt, load_line,  # noqa: E402
                                 ratio, rotation)

CONTENDERS = ("scoring", "generation", "cot-scoring")
VERDICT = re.compile(r"Answer:\s*\(?\s*([AB])\b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_model(p)
    add_dtype(p)
    p.add_argument("--comparisons", type=int, default=512, help="comparisons judged per contender and repetition")
    p.add_argument("--cot-max-tokens", type=int, default=64, help="new tokens of a generated verdict (M)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--contenders", default="scoring,generation", help=f"comma list out of {','.join(CONTENDERS)}")
    p.add_argument("--warmup", type=int, default=32, help="comparisons per contender in the untimed warm-up")
    p.add_argument("--eos", choices=["ignore", "model"], default="ignore",
                   help="generation: ignore eos (every verdict costs M tokens, as a real model's reasoning "
                        "roughly does) or stop where the model emits it (tiny-llama's eos bias: after ~1 token)")
    p.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                   help="vLLM automatic prefix caching (on: vLLM's default, as the stages run)")
    p.add_argument("--traits", default=str(ROOT / "configs" / "traits" / "constitution.yaml"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def chat_ids(tokenizer, c, rank) -> list[int]:
    from character.judging.judge import comparison_prompt

    text = tokenizer.apply_chat_template([{"role": "user", "content": comparison_prompt(c, rank)}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_comparisons(args, tokenizer, max_model_len: int, count: int, seed: int) -> list:
    from character.core.config import RankConfig
    from character.judging.judge import Comparison
    from character.core.traits import load_constitution

    traits = [t.describe() for t in load_constitution(args.traits).traits]
    lines = [x.strip() for x in (ROOT / "character" / "models" / "assets" / "tokenizer_corpus.txt").read_text().splitlines()
             if x.strip()]
    rng, cot = random.Random(seed), RankConfig(chain_of_thought=True, cot_max_tokens=args.cot_max_tokens)
    out, tries = [], 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 100:
            sys.exit(f"too few comparisons fit max_model_len {max_model_len} with --cot-max-tokens {args.cot_max_tokens}")
        c = Comparison(traits[len(out) % len(traits)], rng.choice(lines),
                       " ".join(rng.sample(lines, rng.randint(1, 2))), " ".join(rng.sample(lines, rng.randint(1, 2))))
        if len(chat_ids(tokenizer, c, cot)) + args.cot_max_tokens + 8 <= max_model_len:
            out.append(c)
    return out


def make_judge(llm, tokenizer, engine, rank, model: str, seed: int):
    """A ModelJudge on the already-created engine: the attributes ModelJudge.__init__ sets, minus create_llm."""
    from character.judging.judge import ModelJudge, option_token_ids

    judge = ModelJudge.__new__(ModelJudge)
    judge.llm, judge.tokenizer, judge.options = llm, tokenizer, option_token_ids(tokenizer)
    judge.engine, judge.rank, judge.seed, judge.name = engine, rank, seed, f"model:{model}"
    return judge


def run_scoring(judge, comps) -> dict:
    t0 = time.perf_counter()
    probs = judge.prob_first(comps)
    seconds = time.perf_counter() - t0
    usable = [p for p in probs if p is not None]
    return {"seconds": seconds, "usable": len(usable),
            "detail": f"usable P(A) {len(usable)}/{len(comps)}, mean P(A) "
                      f"{statistics.fmean(usable) if usable else float('nan'):.3f}"}


def run_generation(llm, tokenizer, comps, rank, ignore_eos: bool) -> dict:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    prompts = [{"prompt_token_ids": chat_ids(tokenizer, c, rank)} for c in comps]
    params = SamplingParams(max_tokens=rank.cot_max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    outs = llm.generate(prompts, params, use_tqdm=False)
    verdicts = [(VERDICT.findall(o.outputs[0].text) or [None])[-1] for o in outs]
    seconds = time.perf_counter() - t0
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    finish = Counter(str(o.outputs[0].finish_reason) for o in outs)
    usable = sum(v is not None for v in verdicts)
    return {"seconds": seconds, "usable": usable,
            "detail": f"parsed {usable}/{len(comps)} ({100 * (len(comps) - usable) / len(comps):.0f}% unparseable; "
                      f"A {verdicts.count('A')}, B {verdicts.count('B')}), {new} new tokens "
                      f"({new / len(comps):.1f}/comparison), finish {dict(finish)}"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    contenders = choose(args.contenders, CONTENDERS)
    from character.core.config import EngineConfig, RankConfig
    from character.inference.engine import create_llm
    from character.models.loading import load_tokenizer, resolve_model

    resolve_model(args.model)  # build/cache a built-in model outside every timing
    engine = EngineConfig(num_cpus_per_actor=2, kv_cache_gib=1,
                          extra_args={} if args.prefix_caching == "on" else {"enable_prefix_caching": False})
    tokenizer = load_tokenizer(args.model)
    # A fresh set per (repetition, contender): the rank stage never judges a comparison twice, and with
    # prefix caching a repeated prompt would be nearly free. Same distribution, seeds args.seed + 1...
    t0 = time.perf_counter()
    sets = {(rep, name): build_comparisons(args, tokenizer, engine.max_model_len, args.comparisons,
                                           args.seed + 1 + rep * len(CONTENDERS) + CONTENDERS.index(name))
            for rep in range(args.reps) for name in contenders}
    warm = build_comparisons(args, tokenizer, engine.max_model_len, args.warmup, args.seed)
    plain, cot = RankConfig(), RankConfig(chain_of_thought=True, cot_max_tokens=args.cot_max_tokens)
    every = [c for batch in sets.values() for c in batch]
    lengths = {name: statistics.fmean(len(chat_ids(tokenizer, c, r)) for c in every)
               for name, r in (("plain", plain), ("chain-of-thought", cot))}
    print(f"model {args.model} ({args.dtype}); {args.comparisons} comparisons per contender and repetition, a "
          f"fresh set each (built in {time.perf_counter() - t0:.1f}s; mean chat-prompt tokens "
          f"{lengths['plain']:.0f} plain / {lengths['chain-of-thought']:.0f} chain-of-thought); verdict "
          f"max_tokens={args.cot_max_tokens}, temperature 0, eos {args.eos}; engine num_cpus_per_actor=2, "
          f"kv_cache_gib=1, max_model_len={engine.max_model_len}; reps {args.reps}")
    print(load_line("start"))
    t0 = time.perf_counter()
    llm = create_llm(args.model, args.dtype, engine, seed=args.seed)
    caching = getattr(getattr(getattr(llm.llm_engine, "vllm_config", None), "cache_config", None),
                      "enable_prefix_caching", "?")
    print(f"engine: ONE in-process vllm.LLM, created in {time.perf_counter() - t0:.1f}s (import vllm included); "
          f"start-up is EXCLUDED from every timing and shared by all contenders; prefix caching {caching}",
          flush=True)

    judges = {"scoring": make_judge(llm, tokenizer, engine, plain, args.model, args.seed),
              "cot-scoring": make_judge(llm, tokenizer, engine, cot, args.model, args.seed)}

    def run(name: str, batch: list) -> dict:
        if name == "generation":
            return run_generation(llm, tokenizer, batch, cot, args.eos == "ignore")
        return run_scoring(judges[name], batch)

    t0 = time.perf_counter()
    for name in contenders:
        run(name, warm)
    print(f"warm-up: {args.warmup} comparisons per contender in {time.perf_counter() - t0:.1f}s (untimed)\n", flush=True)

    per: dict[str, list[float]] = {n: [] for n in contenders}
    rep_ratios: list[float] = []
    for rep in range(args.reps):
        order = rotation(contenders, rep)
        print(f"--- repetition {rep + 1}/{args.reps}, order {' -> '.join(order)}, load {os.getloadavg()[0]:.2f}",
              flush=True)
        print(f"  {'contender':<13}{'seconds':>9}{'comp/s':>9}{'usable/s':>10}  detail")
        rep_rate = {}
        for name in order:
            r = run(name, sets[(rep, name)])
            rep_rate[name] = args.comparisons / r["seconds"]
            per[name].append(rep_rate[name])
            print(f"  {name:<13}{r['seconds']:>9.2f}{fmt(rep_rate[name]):>9}{fmt(r['usable'] / r['seconds']):>10}"
                  f"  {r['detail']}", flush=True)
        if "scoring" in rep_rate and "generation" in rep_rate:
            rep_ratios.append(rep_rate["scoring"] / rep_rate["generation"])

    print(f"\n=== medians over {args.reps} repetition(s) (comparisons/s; quote these, with the load below; "
          f"engine start-up excluded and shared)")
    med = {n: statistics.median(v) for n, v in per.items()}
    for name, values in per.items():
        print(f"  {name:<13}{fmt(med[name]):>9}   runs: {', '.join(fmt(v) for v in values)}")
    if "scoring" in med and "generation" in med:
        print(f"  ratio scoring/generation {ratio(med['scoring'], med['generation'])} (ratio of medians; "
              f"per repetition [{', '.join(f'{x:.2f}' for x in rep_ratios)}]); usable verdicts per second "
              f"differ further by the unparseable share above")
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
