"""PPO scoring memory: full-batch, full-vocabulary log-probs + entropy vs micro-batched, chunked scoring.

What it measures: the peak memory and the time of SCORING (no grad, `torch.inference_mode`) a batch of
--batches sequences x --seq-len tokens with a tiny random Llama whose vocabulary is large (--vocab 50_000,
hidden 64, 1 layer, fp32), so the logits dominate everything else. Each measurement runs in a FRESH
subprocess (`torch.set_num_threads(2)`): the model and the random token ids are built, one tiny warm-up
forward runs, the RSS is read (the baseline), the peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`,
so VmHWM restarts at the current RSS; where that is not allowed, `resource.getrusage(RUSAGE_SELF).ru_maxrss`
is used instead, which also counts anything before the baseline), scoring runs, and "peak over baseline" =
VmHWM (or ru_maxrss) - baseline. Paths:

  old      one forward over the whole batch, then the scoring as character/training/ppo/rollouts.py did it before chunking
           (copied below as `old_token_logprobs` / `old_token_entropy`, so the comparison stays
           reproducible): an fp32 log_softmax over all logits + gather, then a second full log_softmax,
           exp and product for the entropy. Peak = about OLD_FP32_COPIES full fp32 [B, L, V] tensors alive
           at once (logits, log_softmax, exp, exp * log_softmax), so it grows linearly with the batch. It is
           skipped ("skipped (predicted N GB)") where that prediction exceeds --max-predicted-gb or 80 % of
           the memory available at start.
  new-fbN  `character.training.ppo.rollouts.forward_in_batches` with forward batch size N (--forward-batches, default 4 and
           8) and `character.training.ppo.rollouts.logprobs_and_entropy` with --chunk positions per chunk (default 128):
           only one micro-batch of logits and one chunk's fp32 log_softmax exist at a time, so the peak
           should stay flat as the batch grows.

Every run saves its log-probs and entropies; "max |diff|" compares them with the old path's at the same
batch (or, where the old path was skipped, with the first new path's). Also printed: the theoretical size
of one fp32 logits copy per batch, the load average at start and end and the other python processes seen
(a test run next door changes the seconds, hardly the memory).

Run (from the repository root):
  .venv/bin/python benchmarks/ppo_memory.py                          # full: batches 8,16,32,64 (a few minutes)
  .venv/bin/python benchmarks/ppo_memory.py --batches 8 --seq-len 128   # quick check
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ != "benchmarks":  # run as `python benchmarks/ppo_memory.py`: the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (argument_parser, comma_list, emit_result, load_line, run_worker,  # noqa: E402
                                 script_command)

OLD_FP32_COPIES = 4  # logits, log_softmax, exp, exp * log_softmax (old_token_entropy, logits still alive)
MIB = 2 ** 20


def old_token_logprobs(logits, input_ids):
    """character.training.ppo.rollouts.token_logprobs before chunking: log p(token t+1 | <= t) for every position: [B, L-1]."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def old_token_entropy(logits):
    """character.training.ppo.rollouts.token_entropy before chunking: a second full log_softmax."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--batches", default="8,16,32,64", help="sequences scored at once (comma list)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--forward-batches", default="4,8", help="forward_in_batches batch sizes of the new path")
    p.add_argument("--chunk", type=int, default=128, help="logprobs_and_entropy chunk_size (positions)")
    p.add_argument("--reps", type=int, default=1, help="fresh runs per cell; medians are printed")
    p.add_argument("--max-predicted-gb", type=float, default=14.0, help="skip the old path above this prediction")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # worker: sequences
    p.add_argument("--path", help=argparse.SUPPRESS)  # worker: old | new-fbN
    p.add_argument("--out", help=argparse.SUPPRESS)  # worker: where to save log-probs and entropies
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- worker


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> None:
    """Fresh process: build model + ids, baseline, reset the peak mark, score, report the peak over baseline."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from character.training.ppo.rollouts import forward_in_batches, logprobs_and_entropy

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval().float()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids[:1, :16], attention_mask=mask[:1, :16])  # warm-up: kernels, lazy inits
    baseline = rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"

    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.path == "old":
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp, entropy = old_token_logprobs(logits, ids), old_token_entropy(logits)
            del logits
        else:
            score = lambda out, sub: logprobs_and_entropy(out.logits, sub, chunk_size=args.chunk)  # noqa: E731
            logp, entropy = forward_in_batches(model, ids, mask, int(args.path.split("fb")[1]), score)
    seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"logp": logp, "entropy": entropy}, args.out)
    emit_result({"peak_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024, "seconds": seconds,
          "method": method})


def run_cell(args, batch: int, path: str, out: str) -> dict:
    cmd = script_command(__file__, "--worker", "--batch", str(batch), "--path", path, "--out", out, "--seq-len",
                         str(args.seq_len), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk",
                         str(args.chunk))
    return run_worker(cmd, what=f"{path} worker at batch {batch}", tail_lines=30)


# ------------------------------------------------------------------------------------------- reporting


def max_diff(a: str, b: str) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    return max(float((x[k] - y[k]).abs().max()) for k in ("logp", "entropy"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import psutil

    batches = [int(x) for x in comma_list(args.batches)]
    paths = ["old"] + [f"new-fb{int(x)}" for x in comma_list(args.forward_batches)]
    available = psutil.virtual_memory().available
    print(f"tiny Llama: vocab {args.vocab}, hidden {args.hidden}, 1 layer, fp32; {args.seq_len} tokens per sequence; "
          f"chunk {args.chunk} positions; {args.reps} fresh process(es) per cell; "
          f"{available / 2**30:.1f} GiB available at start")
    print(load_line("start"), flush=True)
    print(f"\n  {'batch':>5}  {'path':<9}{'peak MiB over baseline':>24}{'seconds':>9}{'max |diff|':>12}"
          f"{'baseline MiB':>14}")
    method = None
    with tempfile.TemporaryDirectory(prefix="character-bench-ppo-memory-") as tmp:
        for batch in batches:
            copy = batch * args.seq_len * args.vocab * 4
            reference = None
            for path in paths:
                predicted = OLD_FP32_COPIES * copy
                if path == "old" and (predicted > args.max_predicted_gb * 1e9 or predicted > 0.8 * available):
                    print(f"  {batch:>5}  {path:<9}{'skipped (predicted ' + f'{predicted / 1e9:.1f} GB)':>24}",
                          flush=True)
                    continue
                out = os.path.join(tmp, f"{batch}-{path}.pt")
                runs = [run_cell(args, batch, path, out) for _ in range(args.reps)]
                method = runs[0]["method"]
                diff = max_diff(out, reference) if reference else float("nan")
                reference = reference or out
                print(f"  {batch:>5}  {path:<9}{statistics.median(r['peak_mib'] for r in runs):>24.0f}"
                      f"{statistics.median(r['seconds'] for r in runs):>9.2f}"
                      f"{'-' if diff != diff else f'{diff:.1e}':>12}"
                      f"{statistics.median(r['baseline_mib'] for r in runs):>14.0f}", flush=True)
            print(f"         one fp32 logits copy [{batch}, {args.seq_len}, {args.vocab}] = {copy / MIB:.0f} MiB; "
                  f"old path predicted ~{OLD_FP32_COPIES} copies = {OLD_FP32_COPIES * copy / MIB:.0f} MiB", flush=True)
    print(f"\npeak measured as {method} - RSS after building the model and ids (and a 1x16 warm-up forward); "
          f"max |diff| over log-probs and entropies vs the first path run at that batch")
    print(load_line("end") + " (the load average includes this benchmark's own work)")


if __name__ == "__main__":
    main()
