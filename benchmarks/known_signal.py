"""Known-signal learning check: does PPO put a rule a reader can check into SmolLM2-135M-Instruct?

The rule (for the trait about being an AI, `ai_nature`): an answer scores 1 if it contains the word "AI"
in any case (as in "As an AI, I don't eat"), else 0 — `judge.rule: {type: keywords, words: [AI], max_count: 1}`.
Steps, all through the real stages on configs/small.yaml narrowed to that one trait:

  1. `synthesize` writes messages for the trait (real Ray Data + vLLM, as the main job);
  2. `train-ppo` trains the policy with that rule as the reward (ppo.reward=rule, critic initialised from
     the policy, KL to the reference as configured) on the training messages; messages are split by
     message_id and the held-out ones are never trained on;
  3. here: base and trained model each answer every held-out message `--samples` times (vLLM, the same
     per-message seeds and sampling for both), and the rule is applied to every answer.

Reported: the rule's hit rate of base and of trained, and their difference with a 95 % interval that
respects the design: the answers to one message are not independent, so the difference is averaged per
message first and the interval is a t interval over messages (df = messages - 1). The change counts as
shown when that interval excludes zero. Also the PPO curve (held-out rule reward per evaluation, KL)
from policy/metrics.jsonl, and examples of base vs trained answers. Everything lands in
<run>/known_signal.json. Takes tens of minutes on a 2-core box; not part of CI.

Run (from the repository root):
  .venv/bin/python benchmarks/known_signal.py                       # full: 80 messages, 8 PPO iterations (~11 min)
  .venv/bin/python benchmarks/known_signal.py --iterations 2 --messages 24 --samples 2   # quick check
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/known_signal.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT  # noqa: E402

RULE_WORD = "AI"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "known-signal"))
    p.add_argument("--messages", type=int, default=80, help="synthesised messages for the trait")
    p.add_argument("--iterations", type=int, default=8, help="PPO iterations")
    p.add_argument("--samples", type=int, default=4, help="answers per held-out message and model")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("overrides", nargs="*", help="further dotted config overrides")
    return p.parse_args(argv)


def t_interval(diffs: list[float], level: float = 0.95) -> dict:
    """Mean of per-message differences with a t interval over messages."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n}
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def answers(model: str, config, rows: list[dict], samples: int) -> list[list[str]]:
    """`samples` answers per message from `model`, with the evaluation's sampling settings and per-message seeds."""
    import gc

    from character.inference.engine import create_llm, generate_chat
    from character.models.loading import load_tokenizer
    from character.core.store import seed_from_id

    llm = create_llm(model, config.model.dtype, config.engine, config.run.seed)
    tokenizer = load_tokenizer(model)
    sampling = config.evaluate.sampling.model_copy(update={"n": samples})
    results = generate_chat(llm, tokenizer, [""] * len(rows), [r["text"] for r in rows],
                            [seed_from_id(r["message_id"], config.run.seed) for r in rows], sampling,
                            config.engine.max_model_len)
    del llm
    gc.collect()
    return [r["outputs"] for r in results]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from character.core.config import load_config
    from character.judging.judge import RuleJudge
    from character.data.splits import HELD_OUT, read_messages
    from character.stages import synthesize, train_ppo
    from character.core.store import StageOutput

    config = load_config(args.config, [
        f"run.output_dir={args.output_dir}", "traits.only=[ai_nature]",
        f"synthesize.messages_per_trait={args.messages}", "judge.kind=rule", "judge.rule.type=keywords",
        f"judge.rule.words=[{RULE_WORD}]", "judge.rule.max_count=1", "ppo.reward=rule", "ppo.critic_init=policy",
        f"ppo.iterations={args.iterations}", f"ppo.lr={args.lr}", f"ppo.kl_coef={args.kl_coef}",
        "run.held_out_fraction=0.4", "ppo.eval_fraction=0.2", "ppo.eval_prompts=16", "ppo.eval_every=4", "ppo.ppo_epochs=1", *args.overrides])
    started = time.time()
    synthesize.run(config)
    ppo = train_ppo.run(config)
    held = read_messages(config.run.output_dir, (HELD_OUT,))  # never seen by PPO
    policy = StageOutput(config.run.output_dir, "policy").path()
    base_answers = answers(config.model.name, config, held, args.samples)
    trained_answers = answers(policy, config, held, args.samples)
    # Scored by the reward's own rule (judge.rule above: "AI" as a whole word, any case, counted once).
    rule = RuleJudge(config.judge.rule)
    base_hits = [[int(rule.score(a)) for a in xs] for xs in base_answers]
    trained_hits = [[int(rule.score(a)) for a in xs] for xs in trained_answers]
    paired = [(statistics.fmean(t), statistics.fmean(b)) for t, b in zip(trained_hits, base_hits) if t and b]
    change = t_interval([t - b for t, b in paired])
    metrics = [json.loads(x) for x in open(StageOutput(config.run.output_dir, "policy").path("metrics.jsonl"))]
    result = {
        "rule": f"the answer contains the word {RULE_WORD!r}", "held_out_messages": len(paired),
        "samples_per_message": args.samples,
        "hit_rate_base": statistics.fmean(b for _, b in paired), "hit_rate_trained": statistics.fmean(t for t, _ in paired),
        "change": change, "shown": bool(change["lo"] > 0 or change["hi"] < 0),
        "ppo_curve": [{k: m.get(k) for k in ("iteration", "reward", "kl", "eval_reward", "response_length")}
                      for m in metrics],
        "examples": [{"message": r["text"], "base": b[0], "trained": t[0]}
                     for r, b, t in list(zip(held, base_answers, trained_answers))[:6] if b and t],
        "ppo_seconds": ppo.seconds, "total_seconds": time.time() - started,
    }
    Path(config.run.output_dir, "known_signal.json").write_text(json.dumps(result, indent=2))
    print(f"\nrule: {result['rule']}; {len(paired)} held-out messages x {args.samples} answers each")
    print(f"hit rate: base {result['hit_rate_base']:.3f} -> trained {result['hit_rate_trained']:.3f}; change "
          f"{change['mean']:+.3f}, 95% t interval over messages [{change['lo']:+.3f}, {change['hi']:+.3f}] -> "
          f"{'SHOWN (excludes zero)' if result['shown'] else 'NOT shown (includes zero)'}")
    print("PPO (iteration: train reward / KL / held-out reward): " + ", ".join(
        f"{m['iteration']}: {m.get('reward', float('nan')):.2f}/{m.get('kl', float('nan')):.2f}"
        + (f"/{m['eval_reward']:.2f}" if m.get("eval_reward") is not None else "") for m in metrics))
    print(f"written {Path(config.run.output_dir, 'known_signal.json')} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
