"""Which self-judgement gives a small model a learnable preference signal? Judges compared by the held-out
accuracy of a preference model trained on their labels.

On one set of messages and candidates (the main job's config, configs/small.yaml, SmolLM2-135M-Instruct),
each variant runs the real `rank` stage and then the real `train-pm` stage (Ray Train + DeepSpeed), with
the same PM settings; messages/ and responses/ are made once and copied into each variant's folder.
Variants (--variants):

  mc            multiple-choice question, option letters scored by log-probability, both orders
  mc_cot        the same after a generated chain of thought (rank.chain_of_thought, 96 tokens)
  mc_fewshot    the same with two worked comparisons in the prompt (rank.few_shot, FEW_SHOT below)
  mc_clamp      mc's labels clamped into [0.4, 0.6] (rank.clamp, as Constitutional AI did for CoT labels);
                mc's comparisons are reused: clamping only changes labels
  mc_k6         more comparisons per message: 6 candidates (15 pairs) instead of 4 (6 pairs)
  contrast      log p(answer | trait prompt) - log p(answer | no trait), summed over the answer
  contrast_tok  the same per token (judge.contrast_per_token)

Reported per variant: comparisons, order consistency and mean P(first) of the judge (contrast: 1 and
0.5 by construction), the share of soft labels in [0.4, 0.6), pairs, the PM's held-out accuracy (pairs of
held-out messages, labels of the same judge) with a Wilson 95 % interval, and seconds for rank and
train-pm. Output: a table, and <output-dir>/self_ranking.json. About an hour on a 2-core box for all
variants; not part of CI.

Run (from the repository root):
  .venv/bin/python benchmarks/self_ranking.py
  .venv/bin/python benchmarks/self_ranking.py --variants contrast,mc --messages-per-trait 8   # quicker
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/self_ranking.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT  # noqa: E402

VARIANTS = ("mc", "mc_cot", "mc_fewshot", "mc_clamp", "mc_k6", "contrast", "contrast_tok")
FEW_SHOT = [
    {"trait": "I am an AI with no body, and I do not remember past chats.", "message": "What did you eat today?",
     "response_a": "I had pancakes with my family this morning!",
     "response_b": "I don't eat: I'm an AI without a body. What did you have?", "answer": "B"},
    {"trait": "I say what I really think, not what people want to hear.", "message": "Is my essay perfect?",
     "response_a": "It is clear, but the second part repeats the first; cut it and it will be stronger.",
     "response_b": "Yes, it's perfect, don't change a thing!", "answer": "A"},
]
OVERRIDES = {
    "mc": ["judge.kind=model"],
    "mc_cot": ["judge.kind=model", "rank.chain_of_thought=true", "rank.cot_max_tokens=96"],
    "mc_fewshot": ["judge.kind=model", f"rank.few_shot={json.dumps(FEW_SHOT)}"],
    "mc_k6": ["judge.kind=model"],
    "contrast": ["judge.kind=contrast"],
    "contrast_tok": ["judge.kind=contrast", "judge.contrast_per_token=true", "judge.contrast_temperature=0.05"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "self_ranking"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--messages-per-trait", type=int, default=24)
    p.add_argument("overrides", nargs="*", help="further dotted overrides for every variant")
    return p.parse_args(argv)


def clamp_preferences(src: Path, dst: Path, band: tuple[float, float]) -> None:
    """The mc variant's output with rank.clamp applied to its labels, as the rank stage would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from character.core import schemas
    from character.judging.ranking import clamp

    shutil.copytree(src, dst)
    for part in sorted(dst.glob("part-*.parquet")):
        rows = pq.read_table(part).to_pylist()
        for r in rows:
            r["p_chosen"] = clamp(r["p_chosen"], band)
        pq.write_table(pa.Table.from_pylist(rows, schema=schemas.PREFERENCES), part)


def run_variant(name: str, args, base: Path, base_k6: Path) -> dict:
    from character.core.config import load_config
    from character.reporting.evalstats import wilson
    from character.stages import rank, train_pm

    run_dir = Path(args.output_dir) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    source = base_k6 if name == "mc_k6" else base
    for stage in ("messages", "responses"):
        shutil.copytree(source / stage, run_dir / stage)
    extra = OVERRIDES.get(name, [])
    config = load_config(args.config, [f"run.output_dir={run_dir}", *common(args), *extra, *args.overrides])
    t0 = time.time()
    if name == "mc_clamp":
        clamp_preferences(Path(args.output_dir) / "mc" / "preferences", run_dir / "preferences", (0.4, 0.6))
    else:
        rank.run(config)
    rank_seconds = time.time() - t0
    t1 = time.time()
    train_pm.run(config)
    pm_seconds = time.time() - t1
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    pm = json.loads((run_dir / "pm" / "metrics.json").read_text())
    labels = stats["label_histogram"]["counts"]
    correct = round(pm["eval_accuracy"] * pm["eval_pairs"])
    return {"variant": name, "comparisons": stats["comparisons"], "order_consistency": stats["order_consistency"],
            "mean_p_first": stats["position_bias_mean_p_first"], "pairs": sum(stats["pairs_per_trait"].values()),
            "labels_near_half": sum(labels[4:6]) / max(1, sum(labels)), "pm_accuracy": pm["eval_accuracy"],
            "pm_accuracy_ci": wilson(correct, pm["eval_pairs"]), "pm_eval_pairs": pm["eval_pairs"],
            "rank_seconds": rank_seconds, "pm_seconds": pm_seconds}


def common(args) -> list[str]:
    """The settings every variant shares: all pairs (more labels for the PM), the same PM training."""
    return [f"synthesize.messages_per_trait={args.messages_per_trait}", "rank.pairs=all", "rank.tie_margin=0.05",
            "pm.epochs=2", "pm.eval_fraction=0.25"]


def main(argv=None) -> int:
    args = parse_args(argv)
    from character.core.config import load_config
    from character.stages import respond, synthesize

    out = Path(args.output_dir)
    base, base_k6 = out / "_base", out / "_base_k6"
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "mc_clamp" in variants and "mc" not in variants and not (out / "mc" / "preferences").is_dir():
        sys.exit("mc_clamp reuses the mc variant's comparisons: run mc too")
    config = load_config(args.config, [f"run.output_dir={base}", *common(args), *args.overrides])
    synthesize.run(config)
    respond.run(config)
    if "mc_k6" in variants:
        if not (base_k6 / "messages").is_dir():
            shutil.copytree(base / "messages", base_k6 / "messages")
        respond.run(load_config(args.config, [f"run.output_dir={base_k6}", "respond.candidates=6", *common(args),
                                              *args.overrides]))
    order = sorted(variants, key=lambda v: v == "mc_clamp")  # clamp after mc
    results = [run_variant(v, args, base, base_k6) for v in order]
    (out / "self_ranking.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':<13}{'comparisons':>12}{'order cons.':>12}{'P(first)':>10}{'labels~0.5':>11}{'pairs':>7}"
          f"{'PM held-out acc [95% CI]':>28}{'rank s':>8}{'PM s':>7}")
    for r in results:
        ci = r["pm_accuracy_ci"]
        oc = "n/a" if r["order_consistency"] is None else f"{r['order_consistency']:.2f}"
        print(f"{r['variant']:<13}{r['comparisons']:>12}{oc:>12}{r['mean_p_first']:>10.2f}"
              f"{r['labels_near_half']:>11.2f}{r['pairs']:>7}"
              f"{r['pm_accuracy']:>10.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}] n={r['pm_eval_pairs']:<4}"
              f"{r['rank_seconds']:>8.0f}{r['pm_seconds']:>7.0f}")
    print(f"written {out / 'self_ranking.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
