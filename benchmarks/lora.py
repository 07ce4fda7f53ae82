"""LoRA: how the engines receive a LoRA policy, and what LoRA changes in a PPO iteration.

Two parts (--parts), on one model (--model, default the built-in real model smollm2-135m-instruct):

  sync   the two ways a vLLM engine can sample from base + adapter, each in a FRESH subprocess per
         repetition (modes interleaved, the order rotating per repetition), --rounds rounds each:
           merged  what train-ppo does: a plain in-process engine (character.inference.engine.create_llm);
                   per round the adapter changes (every lora_B redrawn), `character.models.lora.merged_weights`
                   computes W + (alpha/r) B A of the adapted modules (+ fused siblings) and
                   `character.inference.rollout.sync_weights` reloads them in place; "sync" times both.
           adapter vLLM's own LoRA support (`enable_lora=True`, max_lora_rank = the rank): per round
                   the adapter is saved with peft's save_pretrained and registered under a new id
                   (`llm_engine.add_lora(LoRARequest)`), every request then names it; "sync" times
                   save + registration.
         After each sync both generate the same --prompts chat prompts (seeded, --max-tokens new tokens)
         and the engine's log-probs of one sequence are compared with the peft model's (max |diff|:
         correctness, must be <= 1e-3 in fp32). Figures: median sync seconds and generation tokens/s.
  ppo    the real train-ppo stage (rule reward "fewer words", critic from the policy) in a FRESH
         subprocess per run, full weights vs train.lora (rank --rank, alpha 2 x rank, all-linear), runs
         interleaved, --reps each; messages synthesised once by the same model. From policy/metrics.jsonl:
         trainable / total parameters of policy and critic, peak resident memory of a worker (max over
         the workers, ru_maxrss: models, optimizer states, activations), and per iteration (medians over
         the iterations after the first): total = generation + scoring + training + sync, training, sync.

Quote medians with the load printed at start and end: on the 2-core box a test run next door skews
absolute seconds; the interleaved comparisons are more robust.

Run (from the repository root):
  .venv/bin/python benchmarks/lora.py                              # both parts, smollm2-135m-instruct
  .venv/bin/python benchmarks/lora.py --parts sync --rounds 3 --reps 1 --model tiny-llama   # quick check
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

if __package__ != "benchmarks":  # run as `python benchmarks/lora.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import ROOT, emit_result, load_line, rotation, run_worker, script_command  # noqa: E402

RULE = ["ppo.reward=rule", "ppo.critic_init=policy", "judge.kind=rule", "judge.rule.type=length",
        "judge.rule.target_words=0"]
PROBE = "Tell me honestly what you are, and what you are not."


def _adapter(args):
    """The base model with an adapter on every linear layer (lora_B redrawn per round by `perturb`)."""
    from peft import get_peft_model

    from character.models import lora
    from character.core.config import LoraConfig
    from character.models.loading import load_causal_lm

    settings = LoraConfig(rank=args.rank, alpha=2 * args.rank)
    return get_peft_model(load_causal_lm(args.model), lora.peft_config(settings, "policy"))


def perturb(model, round_: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(round_)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def worker_sync(args) -> None:
    import torch
    from vllm import SamplingParams

    from character.core.config import EngineConfig
    from character.inference.engine import create_llm
    from character.models.lora import merged_weights
    from character.models.loading import load_tokenizer
    from character.data.pm_data import chat_prefix
    from character.inference.rollout import sync_weights

    engine = EngineConfig(num_cpus_per_actor=2, extra_args=(
        {"enable_lora": True, "max_lora_rank": max(8, args.rank), "max_loras": 1} if args.mode == "adapter" else {}))
    t0 = time.perf_counter()
    llm = create_llm(args.model, "float32", engine, 0)
    startup = time.perf_counter() - t0
    tok = load_tokenizer(args.model)
    model = _adapter(args).eval()
    prompts = [{"prompt_token_ids": chat_prefix(tok, f"Question {k}: what do you value most, and why?")}
               for k in range(args.prompts)]
    probe = tok(PROBE)["input_ids"]
    x = torch.tensor([probe])
    rounds, folder = [], tempfile.mkdtemp(prefix="lora-bench-")
    for r in range(args.rounds):
        perturb(model, r)
        t = time.perf_counter()
        request = None
        if args.mode == "merged":
            sync_weights(llm, merged_weights(model), False)
        else:
            from vllm.lora.request import LoRARequest

            path = os.path.join(folder, f"v{r}")
            model.save_pretrained(path, save_embedding_layers=False)
            request = LoRARequest(f"v{r}", r + 1, path)
            llm.llm_engine.add_lora(request)
        sync = time.perf_counter() - t
        params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=k)
                  for k in range(len(prompts))]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        gen = time.perf_counter() - t
        out = llm.generate([{"prompt_token_ids": probe}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False, lora_request=request)[0]
        engine_lp = torch.tensor([s[t].logprob for s, t in zip(out.prompt_logprobs[1:], probe[1:])])
        with torch.no_grad():
            peft_lp = torch.log_softmax(model(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        rounds.append({"sync_s": sync, "gen_s": gen, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                       "max_diff": float((engine_lp - peft_lp).abs().max())})
    shutil.rmtree(folder, ignore_errors=True)
    emit_result({"mode": args.mode, "startup_s": startup, "rounds": rounds})


def worker_synth(args) -> None:
    from character.stages import synthesize

    synthesize.run(_config(args, args.out, f"synthesize.messages_per_trait={args.messages_per_trait}"))
    emit_result({"ok": True})


def worker_ppo(args) -> None:
    import ray

    from character.stages import train_ppo

    extra = [f"ppo.iterations={args.iterations}", "ppo.eval_every=100000", "train.checkpoint_every=100000",
             "ppo.prompts_per_iteration=8", "ppo.minibatch_size=4", "ppo.forward_batch_size=4", "ppo.ppo_epochs=1",
             "ppo.eval_prompts=4", "ppo.sampling.max_tokens=32"]
    if args.mode == "lora":
        extra += [f"train.lora.rank={args.rank}", f"train.lora.alpha={2 * args.rank}"]
    train_ppo.run(_config(args, args.out, *extra))
    ray.shutdown()
    lines = [json.loads(x) for x in open(os.path.join(args.out, "policy", "metrics.jsonl"))]
    emit_result({"mode": args.mode, "lines": lines})


def _config(args, out: str, *extra: str):
    from character.core.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"run.output_dir={out}", f"model.name={args.model}",
                                                        f"traits.path={ROOT / 'configs/traits/tiny.yaml'}",
                                                        *RULE, *extra])


def run_part(kind: str, args, mode: str, out: str = "") -> dict:
    """One fresh subprocess of this script (`--worker kind --mode mode`)."""
    cmd = script_command(__file__, "--worker", kind, "--mode", mode, "--model", args.model, "--rank", str(args.rank),
                         "--rounds", str(args.rounds), "--prompts", str(args.prompts), "--max-tokens",
                         str(args.max_tokens), "--iterations", str(args.iterations), "--messages-per-trait",
                         str(args.messages_per_trait), "--out", out)
    return run_worker(cmd, {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}, what=f"{kind}/{mode}")


def part_sync(args) -> None:
    results: dict[str, list] = {"merged": [], "adapter": []}
    for rep in range(args.reps):
        for mode in rotation(["merged", "adapter"], rep):
            results[mode].append(run_part("sync", args, mode))
    print(f"\n## sync: {args.model}, rank {args.rank} all-linear, {args.prompts} prompts x {args.max_tokens} tokens, "
          f"{args.rounds} rounds x {args.reps} fresh processes per mode (medians over rounds after the first)")
    print("| mode | engine start s | sync s | generation tokens/s | max abs log-prob diff vs peft |")
    print("|---|---|---|---|---|")
    for mode, runs in results.items():
        rounds = [r for run in runs for r in run["rounds"][1:]]
        print(f"| {mode} | {statistics.median(x['startup_s'] for x in runs):.1f} | "
              f"{statistics.median(r['sync_s'] for r in rounds):.3f} | "
              f"{statistics.median(r['tokens'] / r['gen_s'] for r in rounds):.0f} | "
              f"{max(r['max_diff'] for run in runs for r in run['rounds']):.2e} |")


def part_ppo(args) -> None:
    base = tempfile.mkdtemp(prefix="lora-ppo-")
    try:
        run_part("synth", args, "", os.path.join(base, "messages-run"))
        results: dict[str, list] = {"full": [], "lora": []}
        for rep in range(args.reps):
            for mode in rotation(["full", "lora"], rep):
                out = os.path.join(base, f"{mode}-{rep}")
                os.makedirs(out)
                shutil.copytree(os.path.join(base, "messages-run", "messages"), os.path.join(out, "messages"))
                results[mode].append(run_part("ppo", args, mode, out))
        print(f"\n## ppo: {args.model}, 2 workers (ZeRO-2, fp32), 8 prompts x 32 tokens per iteration, "
              f"{args.iterations} iterations x {args.reps} runs per mode (medians over iterations after the first)")
        print("| mode | policy trainable / total | critic trainable / total | peak memory per worker GiB | "
              "iteration s | training s | sync s | sync check s |")
        print("|---|---|---|---|---|---|---|---|")
        for mode, runs in results.items():
            first = runs[0]["lines"][0]
            its = [x for run in runs for x in run["lines"] if x.get("iteration", 0) > 1 and "reward" in x]
            total = [sum(x[k] for k in ("time_generation", "time_scoring", "time_training", "time_sync")) for x in its]
            print(f"| {mode} | {first['policy_trainable_parameters']:,} / {first['policy_total_parameters']:,} | "
                  f"{first['critic_trainable_parameters']:,} / {first['critic_total_parameters']:,} | "
                  f"{max(x['memory_peak_gib'] for x in its):.2f} | {statistics.median(total):.2f} | "
                  f"{statistics.median(x['time_training'] for x in its):.2f} | "
                  f"{statistics.median(x['time_sync'] for x in its):.3f} | "
                  f"{statistics.median(x['time_sync_check'] for x in its):.3f} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="sync,ppo")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--messages-per-trait", type=int, default=12)
    parser.add_argument("--worker")
    parser.add_argument("--mode", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        {"sync": worker_sync, "synth": worker_synth, "ppo": worker_ppo}[args.worker](args)
        return
    print(load_line("start"))
    t0 = time.perf_counter()
    for part in args.parts.split(","):
        {"sync": part_sync, "ppo": part_ppo}[part](args)
    print(f"\n{load_line('end')}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
