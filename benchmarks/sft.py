"""train-sft by source (best, all, revised) on the main job's data: what each does to held-out answers.

The main job's first three stages (`synthesize` -> `respond` -> `rank`, configs/small.yaml: SmolLM2-135M-Instruct,
four traits, the contrast judge) run once, or are taken from `--data` (a run directory where they are complete,
e.g. runs/small after the README's first command). Each source then trains sft/ from the same messages and
candidates through the real stage (Ray Train + DeepSpeed, 2 workers). Afterwards the base and every SFT model
answer evaluation's held-out messages (never trained on; vLLM, evaluate's sampling and per-message seeds,
`--samples` each). Reported per source:
  * the held-out NLL per answer token of the SFT targets before and after (sft/metrics.json);
  * the share of held-out answers that differ from the base's answer of the same message and sample;
  * per trait, the shift of the base model's per-token trait contrast of the answers, (log p(answer | trait
    prompt, message) - log p(answer | message)) / answer tokens, SFT minus base, paired by message and sample,
    with the interval evaluate uses (clustered by message, reporting/evalstats.py);
  * the stage's minutes.
Everything lands in <output-dir>/sft.json. Not part of CI.

Run (from the repository root; nothing else should run meanwhile: 2 cores):
  .venv/bin/python benchmarks/sft.py                         # ~30 min: the data, then three sources
  .venv/bin/python benchmarks/sft.py --data runs/small --sources best
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/sft.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT, comma_list, load_line  # noqa: E402

INPUTS = ("messages", "responses", "preferences")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "bench-sft"))
    p.add_argument("--data", default=None, help="a run directory whose messages/, responses/, preferences/ are "
                                                "complete (default: made under --output-dir)")
    p.add_argument("--sources", default="best,all,revised")
    p.add_argument("--samples", type=int, default=2, help="held-out answers per message and model")
    p.add_argument("--per-trait", type=int, default=12, help="held-out messages per trait")
    p.add_argument("overrides", nargs="*", help="further dotted config overrides, for every stage")
    return p.parse_args(argv)


def trait_contrast(config, rows: list[dict], answers: list[list[str]]) -> list[list[float | None]]:
    """The base model's per-token trait contrast of every answer (judging.judge.ContrastJudge, per token)."""
    import gc

    from character.core.traits import load_constitution
    from character.data.prompts import character_system_prompt
    from character.judging.judge import ContrastJudge

    constitution = load_constitution(config.traits.path, config.traits.only)
    systems = {t.name: character_system_prompt(t, constitution, "trait") for t in constitution.traits}
    judge = ContrastJudge(config.model.name, config.model.dtype, config.engine,
                          config.judge.model_copy(update={"contrast_per_token": True}), config.run.seed)
    flat = [(systems[r["trait"]], r["text"], a) for r, xs in zip(rows, answers) for a in xs]
    scores = judge.scores(flat)
    del judge
    gc.collect()
    k = len(answers[0]) if answers else 0
    return [scores[i * k:(i + 1) * k] for i in range(len(rows))]


def held_out_rows(data: Path, per_trait: int) -> list[dict]:
    from character.data.splits import HELD_OUT, read_messages

    kept, count = [], defaultdict(int)
    for r in read_messages(str(data), (HELD_OUT,)):
        if count[r["trait"]] < per_trait:
            count[r["trait"]] += 1
            kept.append(r)
    return kept


def shifts(rows: list[dict], base: list[list[float | None]], trained: list[list[float | None]]) -> dict:
    """Per trait and overall: the paired shift SFT - base of the contrast, clustered by message."""
    from character.reporting.evalstats import clustered_delta

    by: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for r, b, t in zip(rows, base, trained):
        for x, y in zip(b, t):
            if x is None or y is None:
                continue
            for key in (r["trait"], "overall"):
                by[key][0].append(y)
                by[key][1].append(x)
                by[key][2].append(r["message_id"])
    return {k: clustered_delta(*v) for k, v in sorted(by.items())}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from benchmarks.known_signal import answers
    from character.core.config import load_config
    from character.stages import rank, respond, synthesize, train_sft

    print(load_line("start"), flush=True)
    out = Path(args.output_dir)
    data = Path(args.data) if args.data else out / "data"
    config = load_config(args.config, [f"run.output_dir={data}", "tracking.backend=none", *args.overrides])
    started = time.time()
    if not args.data:
        for stage in (synthesize, respond, rank):
            stage.run(config)
    held = held_out_rows(data, args.per_trait)
    base_answers = answers(config.model.name, config, held, args.samples)
    base_contrast = trait_contrast(config, held, base_answers)

    results = {}
    for source in comma_list(args.sources):
        run_dir = out / source
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in INPUTS:
            shutil.copytree(data / folder, run_dir / folder)
        sft_config = load_config(args.config, [f"run.output_dir={run_dir}", "tracking.backend=none", "policy.sft=true",
                                               f"sft.source={source}", *args.overrides])
        result = train_sft.run(sft_config)
        metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
        trained = answers(str(run_dir / "sft"), config, held, args.samples)
        pairs = [(b, t) for bs, ts in zip(base_answers, trained) for b, t in zip(bs, ts)]
        results[source] = {
            "minutes": result.seconds / 60, "steps": metrics["steps"], "train_examples": metrics["train_examples"],
            "set_aside": dict(result.drops), "nll_before": metrics["eval_nll_before"], "nll_after": metrics["eval_nll"],
            "per_trait_nll_before": metrics["per_trait_nll_before"], "per_trait_nll_after": metrics["per_trait_nll"],
            "answers_differing": sum(b != t for b, t in pairs) / len(pairs), "answers": len(pairs),
            "mean_words_base": statistics.fmean(len(b.split()) for b, _ in pairs),
            "mean_words_sft": statistics.fmean(len(t.split()) for _, t in pairs),
            "contrast_shift": shifts(held, base_contrast, trait_contrast(config, held, trained)),
        }
        print(f"[sft-bench] {source}: {json.dumps(results[source])}", flush=True)

    summary = {"config": args.config, "data": str(data), "held_out_messages": len(held), "samples": args.samples,
               "overrides": args.overrides, "sources": results, "total_seconds": time.time() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{len(held)} held-out messages x {args.samples} answers; contrast = base model's per-token "
          "log p(answer | trait) - log p(answer | no trait); intervals clustered by message")
    print("| source | targets | held-out NLL before -> after | answers differing from base | contrast shift overall "
          "| per trait | minutes |")
    print("|---|---|---|---|---|---|---|")
    for source, r in results.items():
        c = r["contrast_shift"]
        traits = "; ".join(f"{t} {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"
                           for t, v in c.items() if t != "overall")
        print(f"| {source} | {r['train_examples']} | {r['nll_before']:.3f} -> {r['nll_after']:.3f} | "
              f"{r['answers_differing']:.2f} | {c['overall']['mean']:+.3f} [{c['overall']['lo']:+.3f}, "
              f"{c['overall']['hi']:+.3f}] | {traits} | {r['minutes']:.1f} |")
    print(load_line("end"))
    print(f"written {out / 'sft.json'} in {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
