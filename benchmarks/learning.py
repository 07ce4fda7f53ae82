"""Does the main job train character? An ablation of its recipe over seeds, on the main job's data.

The data stages (synthesize, respond, rank) run once, as the main job runs them (run.seed --data-seed), in
<out>/data. Per training seed k each recipe then runs in its own folder, <out>/seed<k>/<recipe>, with run.seed=k
(sampling, data order, initialisation of the trained stages and evaluate's sampling), from a copy of that data and
of the trained stages it shares with the main recipe of the same seed (sft/ and pm/, which it trains
identically), through the real `character run` in a subprocess; its eval/summary.json gives the row. The
recipes:
  main      configs/small.yaml as it is: train-sft, the preference model, GRPO on the PM's reward;
  no_sft    policy.sft=false: the PM and GRPO from the base model;
  sft_only  the main recipe's SFT model against the base (its summary's `sft` block; no run of its own);
  judge     ppo.reward=judge: GRPO on the contrast judge's own score, no PM in between ("direct RLAIF");
  ppo       ppo.advantage=gae: PPO with a critic (from the PM) on the same 16 sequences per iteration, KL in the reward.
Columns: per trait the held-out trait-score shift, then the probe shift (all traits), capability of the trained
model, identical share, KL to the base, the PM's validation accuracy [Wilson interval] and the recipe's minutes
(the seconds of every stage it ran or reused, from their _SUCCESS records; evaluate's own, which reuses the
main recipe's base and SFT answers and their ruler numbers, counts only the answers it made and measured). A
recipe other than the main one runs stage by stage (run_recipe), so that evaluate resumes from what was copied.
Each cell is the mean over seeds; "k/n" counts the seeds whose 95 % interval lies above zero. Everything lands
in <out>/learning.json, and the table in <out>/learning.md (the README's copy). Not part of CI: about 40
minutes per seed on a 2-core box (20 for the seed whose main recipe --main-run supplies; seed 2 on 2026-12-07:
main 19.5, no_sft 10.5, judge 6.5, ppo 4), with nothing else running, and about 7 GB of disk per recipe (Ray
Train checkpoints under _train/).

Run (from the repository root):
  .venv/bin/python benchmarks/learning.py                          # 3 seeds, every recipe
  .venv/bin/python benchmarks/learning.py --seeds 0 --recipes main sft_only    # one seed, two recipes
  .venv/bin/python benchmarks/learning.py --main-run runs/small    # the main job's run as data and seed 0's main
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/learning.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT  # noqa: E402

DATA = ("messages", "responses", "preferences")
# The base model's evaluation answers (and the SFT model's, where the recipe shares it) are the main recipe's:
# the same model, messages and seed sample the same answers, and evaluate resumes from the answers it finds. The
# ruler's numbers of them are the main recipe's too (evaluate measures only what eval/_work/ruler does not hold).
BASE_ANSWERS, SFT_ANSWERS, RULER = "eval/_work/base", "eval/_work/sft", "eval/_work/ruler"
RECIPES = {  # name -> (overrides, outputs copied from the main recipe of the same seed)
    "main": ([], ()),
    "no_sft": (["policy.sft=false"], (BASE_ANSWERS, RULER)),
    "sft_only": None,  # read from the main recipe's summary
    "judge": (["ppo.reward=judge"], ("sft", "pm", BASE_ANSWERS, SFT_ANSWERS, RULER)),
    "ppo": (["ppo.advantage=gae", "ppo.samples_per_prompt=1", "ppo.prompts_per_iteration=16", "ppo.kl_penalty=reward",
             "ppo.kl_estimator=k1", "ppo.critic_init=pm"], ("sft", "pm", BASE_ANSWERS, SFT_ANSWERS, RULER)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "learning"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--data-seed", type=int, default=0, help="run.seed of the data stages (the main job's: 0)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--main-run", help="a finished run of --config (the main job's runs/small): its data stages are "
                   "the data, and it is the main recipe of its own run.seed (not run again)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every recipe")
    return p.parse_args(argv)


def character_run(config: str, run_dir: Path, overrides: list[str], stage: str = "run") -> float:
    """`character run` (or one stage) on `run_dir`, whose finished stages are skipped; the wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(ROOT / ".venv" / "bin" / "character"), stage, "--config", config, f"run.output_dir={run_dir}",
           *overrides]
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def stage_seconds(run_dir: Path) -> float:
    """Seconds of every stage in `run_dir`, from its _SUCCESS record (copied stages included)."""
    total = 0.0
    for success in run_dir.glob("*/_SUCCESS"):
        try:
            total += float(json.loads(success.read_text() or "{}").get("seconds") or 0.0)
        except (ValueError, AttributeError):
            continue
    return total


def wilson_of(accuracy: float | None, n: int | None) -> dict:
    from character.reporting.evalstats import wilson

    if accuracy is None or not n:
        return {"p": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    return wilson(accuracy * n, n)


def recipe_row(summary: dict, pm: dict | None, minutes: float, block: str | None = None) -> dict:
    """One recipe's numbers on one seed: `block` None reads the final model's, "sft" the SFT model's."""
    s = summary if block is None else summary[block]
    model = "trained" if block is None else block
    held = s["overall"]["held_out"]
    traits = {g["trait"]: g["trait_score_delta"] for g in s["groups"].values() if g["split"] == "held_out"}
    capability = (summary.get("capability") or {}).get(model) or {}
    return {"trait_score": {t: {k: v[k] for k in ("mean", "lo", "hi")} for t, v in sorted(traits.items())},
            "probe": {k: held["probe_delta"][k] for k in ("mean", "lo", "hi")},
            "capability": capability.get("accuracy"), "capability_kept": (summary.get("capability") or {}).get(
                "kept", {}).get(model), "identical_share": held["identical_share"]["share"],
            "kl": held["kl"]["mean"], "pm": wilson_of((pm or {}).get("eval_accuracy"), (pm or {}).get("eval_pairs")),
            "minutes": minutes}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def _shift_cell(stats: list[dict]) -> str:
    moved = sum(1 for s in stats if s["lo"] > 0)
    return f"{_mean([s['mean'] for s in stats]):+.3f} ({moved}/{len(stats)})"


def ablation_table(rows: dict[str, list[dict]]) -> str:
    """Markdown: one line per recipe, each cell the mean over its seeds (k/n: seeds whose interval is above 0)."""
    traits = sorted({t for seeds in rows.values() for r in seeds for t in r["trait_score"]})
    head = ["recipe", "seeds", *[f"trait score: {t}" for t in traits], "probe", "capability", "identical",
            "KL", "PM val. acc. [95 %]", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seeds in rows.items():
        if not seeds:
            continue
        pm = [r["pm"] for r in seeds if r["pm"]["n"]]
        pm_cell = (f"{_mean([p['p'] for p in pm]):.3f} [{_mean([p['lo'] for p in pm]):.3f}, "
                   f"{_mean([p['hi'] for p in pm]):.3f}] of {round(_mean([p['n'] for p in pm]))}") if pm else "-"
        cells = [name, str(len(seeds)),
                 *[_shift_cell([r["trait_score"][t] for r in seeds if t in r["trait_score"]]) for t in traits],
                 _shift_cell([r["probe"] for r in seeds]), f"{_mean([r['capability'] for r in seeds]):.3f}",
                 f"{_mean([r['identical_share'] for r in seeds]):.2f}", f"{_mean([r['kl'] for r in seeds]):.2f}",
                 pm_cell, f"{_mean([r['minutes'] for r in seeds]):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_run_seed(args) -> int | None:
    """run.seed of --main-run (from its resolved config.yaml), whose data it must share: None without one."""
    if not args.main_run:
        return None
    import yaml

    resolved = yaml.safe_load((Path(args.main_run) / "config.yaml").read_text())
    if resolved["run"]["seed"] != args.data_seed:
        raise SystemExit(f"--main-run {args.main_run} ran with run.seed {resolved['run']['seed']}, not --data-seed "
                         f"{args.data_seed}: its data is not the ablation's")
    return resolved["run"]["seed"]


def copy_stages(source: Path, target: Path, folders, optional=(RULER,)) -> None:
    """Each folder of `source` into `target` where `target` has none; an `optional` one `source` lacks is skipped (a
    main recipe evaluated before evaluate kept its ruler's numbers has no eval/_work/ruler)."""
    for folder in folders:
        if (target / folder).exists() or (folder in optional and not (source / folder).exists()):
            continue
        shutil.copytree(source / folder, target / folder, ignore=shutil.ignore_patterns("_train", ".tmp*"))


def run_recipe(config: str, run_dir: Path, overrides: list[str], main_dir: Path, shared) -> None:
    """The recipe's stages one by one (`character <stage>`, each skipping what is complete), the main recipe's
    shared outputs copied in first and its evaluation answers and ruler numbers just before evaluate: `character
    run` redoes every stage after one that did work, and a redone evaluate starts from an empty eval/."""
    from character.core.config import load_config
    from character.execution.registry import run_order

    stages = run_order(load_config(config, [f"run.output_dir={run_dir}", *overrides]))
    copy_stages(main_dir, run_dir, [f for f in shared if not f.startswith("eval/")])
    for stage in stages:
        if stage == "evaluate":
            copy_stages(main_dir, run_dir, [f for f in shared if f.startswith("eval/")])
        character_run(config, run_dir, overrides, stage)


def run_data(args) -> Path:
    data = Path(args.output_dir) / "data"
    if args.main_run:
        copy_stages(Path(args.main_run), data, DATA)
    for stage in ("synthesize", "respond", "rank"):
        character_run(args.config, data, [f"run.seed={args.data_seed}", *args.overrides], stage)
    return data


def run_seed(args, seed: int, data: Path, main_seed: int | None) -> dict[str, dict]:
    base = Path(args.output_dir) / f"seed{seed}"
    base.mkdir(parents=True, exist_ok=True)
    common = [f"run.seed={seed}", *args.overrides]
    rows = {}
    for name in [r for r in RECIPES if r in args.recipes or (r == "main" and {"sft_only", "judge", "ppo"} &
                                                                 set(args.recipes))]:
        if RECIPES[name] is None:
            continue
        overrides, shared = RECIPES[name]
        run_dir = base / name
        if name == "main" and seed == main_seed:
            # The main job itself, with the same config and seed: its stages as they are (evaluate would redo
            # a copied eval/, whose summary names the other folder's models).
            copy_stages(Path(args.main_run), run_dir, (*DATA, "sft", "pm", "policy", "eval"))
        elif not (run_dir / "report" / "_SUCCESS").exists():
            copy_stages(data, run_dir, DATA)
            run_recipe(args.config, run_dir, [*common, *overrides], base / "main", shared)
        summary = json.loads((run_dir / "eval" / "summary.json").read_text())
        pm_metrics = run_dir / "pm" / "metrics.json"
        pm = json.loads(pm_metrics.read_text()) if pm_metrics.exists() else None
        if name in args.recipes:
            rows[name] = recipe_row(summary, pm, stage_seconds(run_dir) / 60)
        if name == "main" and "sft_only" in args.recipes:
            sft_minutes = sum(float(json.loads((run_dir / f / "_SUCCESS").read_text()).get("seconds") or 0)
                              for f in (*DATA, "sft")) / 60
            rows["sft_only"] = recipe_row(summary, None, sft_minutes, "sft")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    main_seed = main_run_seed(args)  # a --main-run of another seed is refused before anything is copied or run
    data = run_data(args)
    results = {seed: run_seed(args, seed, data, main_seed) for seed in args.seeds}
    by_recipe = {name: [results[s][name] for s in args.seeds if name in results[s]] for name in RECIPES}
    table = ablation_table(by_recipe)
    out = Path(args.output_dir)
    (out / "learning.json").write_text(json.dumps({"config": args.config, "seeds": args.seeds,
                                                    "data_seed": args.data_seed,
                                                    "overrides": args.overrides, "results": results,
                                                    "total_seconds": time.perf_counter() - t0}, indent=2))
    (out / "learning.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
