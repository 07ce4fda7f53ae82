"""Same data, three recipes: PPO with a critic, GRPO (critic-free) and DPO, on one set of rule-labelled pairs.

The rule ("fewer words is better": judge.rule type length, target 0 words) labels the model's own
candidates (`synthesize` -> `respond` -> `rank` with the rule judge, real Ray Data + vLLM). The same messages
and pairs then train three policies from the same base, each through its real stage with the same number of
optimizer steps of the policy (`--updates`):
  * ppo:  train-ppo, ppo.advantage gae, critic initialised from the policy, reward = the rule, KL in the reward;
  * grpo: train-ppo, ppo.advantage grpo, 4 samples per prompt (a quarter of the prompts: the same sequences
          per update), reward = the rule, k3 KL as a loss term, no critic;
  * dpo:  train-dpo on the pairs (no reward at training time), reference log-probs precomputed; and, to
          measure that choice, dpo-online (a frozen reference engine scoring every batch).
Each recipe runs `--repeats` times, interleaved (ppo, grpo, dpo, dpo-online, ppo, ...). Afterwards the base
and every trained policy answer the held-out messages (vLLM, the same per-message seeds, `--samples` each):
reported are the held-out rule reward before/after, the KL of the trained policy to the base on its own
answers (Monte Carlo, sum over tokens of log pi - log base, HF forwards), the stage's wall time, and for the
two train-ppo recipes the median seconds per iteration and its split (generation, scoring, training, sync).
Everything lands in <output-dir>/recipes.json. Not part of CI.

Run (from the repository root; nothing else should run meanwhile: 2 cores):
  .venv/bin/python benchmarks/recipes.py                                   # tiny model (~10 min)
  .venv/bin/python benchmarks/recipes.py --config configs/small.yaml --messages 40 --updates 16   # SmolLM2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/recipes.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT  # noqa: E402

RULE = ["judge.kind=rule", "judge.rule.type=length", "judge.rule.target_words=0", "judge.rule.temperature=1.0",
        "rank.tie_margin=0.3"]
STEPS_PER_ITERATION = 4  # PPO optimizer steps per iteration with the settings below (2 epochs x 2 minibatches)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "recipes"))
    p.add_argument("--messages", type=int, default=100, help="synthesised messages per trait")
    p.add_argument("--updates", type=int, default=48, help="policy optimizer steps per recipe (multiple of 4)")
    p.add_argument("--repeats", type=int, default=1, help="runs per recipe, interleaved")
    p.add_argument("--samples", type=int, default=4, help="held-out answers per message and model")
    p.add_argument("--lr", type=float, default=3e-4, help="PPO and GRPO learning rate")
    p.add_argument("--dpo-lr", type=float, default=2e-3)
    p.add_argument("--recipes", default="ppo,grpo,dpo,dpo-online")
    p.add_argument("overrides", nargs="*", help="further dotted config overrides, for every stage")
    return p.parse_args(argv)


def recipe_overrides(name: str, args) -> list[str]:
    iterations = args.updates // STEPS_PER_ITERATION
    # 16 sequences per iteration over 2 workers, minibatches of 4, 2 epochs: 4 policy steps per iteration.
    ppo = ["ppo.reward=rule", f"ppo.iterations={iterations}", "ppo.ppo_epochs=2", "ppo.minibatch_size=4",
           f"ppo.lr={args.lr}", f"ppo.eval_every={iterations}", "train.checkpoint_every=1000"]
    if name == "ppo":
        return ppo + ["ppo.advantage=gae", "ppo.critic_init=policy", f"ppo.critic_lr={args.lr}",
                      "ppo.prompts_per_iteration=16"]
    if name == "grpo":
        return ppo + ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=4",
                      "ppo.kl_penalty=loss"]
    dpo = ["policy.method=dpo", f"dpo.max_steps={args.updates}", "dpo.epochs=100", "dpo.micro_batch_size=8",
           f"dpo.lr={args.dpo_lr}", "dpo.beta=0.1", "dpo.nll_coef=0.1", "train.checkpoint_every=1000"]
    return dpo + [f"dpo.precompute_reference={name == 'dpo'}"]


def kl_to_base(policy: str, base: str, prompts: list[str], answers: list[list[str]], max_length: int) -> float:
    """Mean over sampled answers of sum_t log pi(y_t) - log base(y_t): a Monte Carlo KL(pi || base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from character.models.loading import load_tokenizer, resolve_model
    from character.training.scoring import response_logprobs

    flat = [(p, a) for p, xs in zip(prompts, answers) for a in xs]
    models = [AutoModelForCausalLM.from_pretrained(resolve_model(m)).eval() for m in (policy, base)]
    tok = load_tokenizer(resolve_model(base))
    diffs = []
    with torch.no_grad():
        for start in range(0, len(flat), 16):
            chunk = flat[start : start + 16]
            args = (tok, [p for p, _ in chunk], [a for _, a in chunk], max_length)
            diffs += (response_logprobs(models[0], *args)[0] - response_logprobs(models[1], *args)[0]).tolist()
    return statistics.fmean(diffs)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from benchmarks.known_signal import answers, t_interval
    from character.core.config import load_config
    from character.judging.judge import RuleJudge
    from character.data.splits import HELD_OUT, read_messages
    from character.stages import rank, respond, synthesize, train_dpo, train_ppo
    from character.core.store import StageOutput

    out = Path(args.output_dir)
    data = out / "data"
    base_config = load_config(args.config, [f"run.output_dir={data}", f"synthesize.messages_per_trait={args.messages}",
                                            *RULE, *args.overrides])
    started = time.time()
    for stage in (synthesize, respond, rank):
        stage.run(base_config)
    held = read_messages(str(data), (HELD_OUT,))
    rule = RuleJudge(base_config.judge.rule)
    base_answers = answers(base_config.model.name, base_config, held, args.samples)
    base_scores = [statistics.fmean(rule.score(a) for a in xs) for xs in base_answers]

    names = args.recipes.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:  # interleaved: ppo, grpo, dpo, dpo-online, ppo, ...
            run_dir = out / f"{name}-{repeat}"
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in ("messages", "responses", "preferences"):
                shutil.copytree(data / folder, run_dir / folder)
            config = load_config(args.config, [f"run.output_dir={run_dir}", *RULE, *recipe_overrides(name, args),
                                               *args.overrides])
            stage = train_dpo if name.startswith("dpo") else train_ppo
            result = stage.run(config)
            policy = StageOutput(str(run_dir), config.policy_stage).path()
            trained = answers(policy, config, held, args.samples)
            scores = [statistics.fmean(rule.score(a) for a in xs) for xs in trained]
            record = {"seconds": result.seconds, "reward_after": statistics.fmean(scores),
                      "change": t_interval([a - b for a, b in zip(scores, base_scores)]),
                      "kl_to_base": kl_to_base(policy, config.model.name, [r["text"] for r in held], trained,
                                               config.engine.max_model_len)}
            if stage is train_ppo:
                lines = [json.loads(x) for x in open(run_dir / "policy" / "metrics.jsonl")]
                iters = [x for x in lines if "time_training" in x]
                for key in ("time_generation", "time_scoring", "time_training", "time_sync"):
                    record[key] = statistics.median(x[key] for x in iters)
                record["iteration_seconds"] = statistics.median(
                    x["time_generation"] + x["time_scoring"] + x["time_training"] + x["time_sync"] for x in iters)
                record["updates"] = args.updates
            else:
                metrics = json.loads((run_dir / "dpo" / "metrics.json").read_text())
                record.update(updates=metrics["steps"], eval_accuracy=metrics["eval_accuracy"],
                              seconds_per_update=result.seconds / metrics["steps"])
            runs[name].append(record)
            print(f"[recipes] {name} run {repeat + 1}: {json.dumps(record)}", flush=True)

    summary = {"config": args.config, "messages_per_trait": args.messages, "held_out_messages": len(held),
               "samples": args.samples, "updates": args.updates, "repeats": args.repeats,
               "reward_before": statistics.fmean(base_scores), "runs": runs,
               "total_seconds": time.time() - started}
    (out / "recipes.json").write_text(json.dumps(summary, indent=2))
    med = lambda name, key: statistics.median(r[key] for r in runs[name] if key in r)  # noqa: E731
    print(f"\n{len(held)} held-out messages x {args.samples} answers; rule reward = -(words); {args.updates} policy "
          f"updates per recipe; medians of {args.repeats} run(s)")
    print("| recipe | held-out rule reward before -> after | change [95% t, by message] | KL to base | stage s |"
          " s per iteration (gen / score / train / sync) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        change = runs[name][0]["change"] if args.repeats == 1 else t_interval([r["change"]["mean"] for r in runs[name]])
        split = (f"{med(name, 'iteration_seconds'):.2f} ({med(name, 'time_generation'):.2f} / "
                 f"{med(name, 'time_scoring'):.2f} / {med(name, 'time_training'):.2f} / {med(name, 'time_sync'):.2f})"
                 if name in ("ppo", "grpo") else f"{med(name, 'seconds_per_update'):.2f} per update (whole stage)")
        print(f"| {name} | {summary['reward_before']:.2f} -> {med(name, 'reward_after'):.2f} | "
              f"{change['mean']:+.2f} [{change['lo']:+.2f}, {change['hi']:+.2f}] | {med(name, 'kl_to_base'):.2f} | "
              f"{med(name, 'seconds'):.0f} | {split} |")
    print(f"written {out / 'recipes.json'} in {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
