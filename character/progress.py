"""Time left in a `character run`: a work estimate per stage from the config, calibrated on the run itself.

Work is counted in vLLM token passes: one prompt token through vLLM's forward pass is 1, a generated token 2
(decoding runs at about half the efficiency of a prefill on CPU, benchmarks/generation.py), a token through
a Hugging Face forward pass (PPO scoring) 2 and a training token 8: forward + backward + AdamW in fp32 under
DeepSpeed, with the Ray Train workers sharing the cores, ran at about 3x the seconds of vLLM's 3 passes in
the main job here (2026-12-01: 1.4-1.8 ms per vLLM pass in the generating stages, 4.3 in train-pm).
Each stage also pays a fixed start-up (engine actors or a Ray Train worker group). After every finished
stage, the seconds per token pass measured over the stages done so far turn the work left into an estimate;
stages skipped as complete count as no work. A rough guide, not a promise: it is only as good as the
guesses below about how many messages survive filtering.
"""
from __future__ import annotations

import sys
import time
from math import comb

from character.config import Config

STARTUP_S = 30.0  # start-up per stage on a 2-core box (import vllm + engine, or Ray Train workers + DeepSpeed)
PROMPT_TOKENS = 130  # a chat prompt with a system prompt, a typical synthesis or respond prompt here
KEEP = 0.7  # share of synthesised messages kept (configs/small.yaml on SmolLM2-135M: 0.66)
HF_FORWARD = 2.0  # one token through a Hugging Face forward pass, in vLLM passes
TRAIN_PASS = 8.0  # one training token (forward + backward + optimizer step), in vLLM passes


def stage_work(config: Config, n_traits: int, n_seed_questions: int) -> dict[str, float]:
    """Estimated token passes per stage of `character run`."""
    syn, res, rank, pm, ppo, ev = (config.synthesize, config.respond, config.rank, config.pm, config.ppo,
                                   config.evaluate)
    # Training messages only: respond, rank and the PM see the `train` split.
    messages = (n_traits * syn.messages_per_trait * KEEP + (n_seed_questions if syn.include_seed_questions else 0)) \
        * (1 - config.run.held_out_fraction)
    k, answer = res.candidates, res.sampling.max_tokens
    pairs_per_message = 1 if rank.pairs == "best_worst" else comb(k, 2)
    if config.judge.kind == "contrast":
        judging = messages * k * (PROMPT_TOKENS // 2 + answer)  # one baseline prefill per candidate
    elif config.judge.kind == "model":
        judging = messages * comb(k, 2) * 2 * (PROMPT_TOKENS + 2 * answer)  # both orders, two answers shown
    else:
        judging = 0.0
    pm_tokens = _pair_tokens(pm, messages * pairs_per_message)
    dpo = config.dpo
    # DPO: the policy's training passes, plus the reference's forward passes: once per pair (precomputed) or
    # per training pass (a frozen reference engine).
    dpo_pairs = messages * pairs_per_message
    reference = dpo_pairs * 2 * (dpo.max_length / 2) if dpo.precompute_reference else _pair_tokens(dpo, dpo_pairs)
    samples = ppo.prompts_per_iteration * ppo.samples_per_prompt
    rollout = samples * (PROMPT_TOKENS + ppo.sampling.max_tokens)
    # Per iteration: generation, scoring by policy, reference, critic and reward (4 forward passes; 3 without a
    # critic), then per PPO epoch policy and critic training; held-out evaluations generate and score.
    models = 2 if ppo.uses_critic else 1
    per_iteration = rollout * ((2 + models) * HF_FORWARD + models * TRAIN_PASS * ppo.ppo_epochs)
    ppo_tokens = ppo.iterations * (samples * ppo.sampling.max_tokens * 2 + per_iteration)
    ppo_tokens += (ppo.iterations // ppo.eval_every + 1) * ppo.eval_prompts * (ppo.sampling.max_tokens * 2 + PROMPT_TOKENS)
    eval_messages = n_traits * (ev.max_messages_per_trait + ev.adversarial_per_trait)
    generations = 2 * eval_messages * ev.samples * (PROMPT_TOKENS + ev.sampling.max_tokens * 2)
    scoring = 2 * eval_messages * ev.samples * (PROMPT_TOKENS + ev.sampling.max_tokens) * 2  # reward model + judge
    return {
        "synthesize": n_traits * (syn.messages_per_trait + ev.adversarial_per_trait)
        * (PROMPT_TOKENS + 2 * syn.sampling.max_tokens),
        "respond": messages * (PROMPT_TOKENS + k * answer * 2),
        "rank": judging,
        "train-pm": TRAIN_PASS * pm_tokens,
        "train-ppo": ppo_tokens,
        "train-dpo": TRAIN_PASS * _pair_tokens(dpo, dpo_pairs) + HF_FORWARD * reference,
        "evaluate": generations + scoring,
        "report": 0.0,
    }


def _pair_tokens(cfg, pairs: float) -> float:
    """Tokens through a pair-training stage (train-pm, train-dpo): both sides of every training pair, once per
    epoch, sequences of about half their maximal length."""
    tokens = pairs * (1 - cfg.eval_fraction) * cfg.epochs * 2 * (cfg.max_length / 2)
    if cfg.max_steps:
        tokens = min(tokens, cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum * 2 * cfg.max_length / 2)
    return tokens


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class RunProgress:
    """Prints, before each stage, the time so far and an estimate of the time left."""

    def __init__(self, stages: list[str], work: dict[str, float]):
        self.stages, self.work = stages, work
        self.start = time.monotonic()
        self.done_work = self.done_seconds = 0.0
        self.stage_start = self.start

    def begin(self, index: int) -> str:
        self.stage_start = time.monotonic()
        name = self.stages[index]
        line = f"[run] stage {index + 1}/{len(self.stages)} {name}: {_clock(self.stage_start - self.start)} so far"
        left = self.estimate_left(index)
        return line + (f"; about {_clock(left)} left (estimate)" if left is not None else "")

    def end(self, index: int, skipped: bool) -> None:
        if skipped:
            self.work[self.stages[index]] = 0.0
            return
        self.done_work += self.work[self.stages[index]]
        self.done_seconds += max(0.0, time.monotonic() - self.stage_start - STARTUP_S)

    def estimate_left(self, index: int) -> float | None:
        """Seconds for stages index.. at the rate measured so far; None before any stage has done work."""
        if self.done_work <= 0:
            return None
        rate = self.done_seconds / self.done_work
        rest = self.stages[index:]
        return sum(self.work[s] * rate + (STARTUP_S if self.work[s] else 0.0) for s in rest)


class ProgressLine:
    """done/total, rate and time left of one long loop on the driver: a live tqdm bar on a terminal; in a log
    (stdout not a terminal: a Ray job, CI) one line at each tenth of the total, with tqdm's own formatting.
    tqdm alone cannot do the second: without a terminal it rewrites one line with carriage returns."""

    FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} UNITS [{elapsed} elapsed, {remaining} left, {rate_fmt}]"

    def __init__(self, desc: str, total: int | None, unit: str = "rows", interactive: bool | None = None,
                 file=None):
        from tqdm.auto import tqdm

        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.file = file or sys.stdout
        self.interactive = self.file.isatty() if interactive is None else interactive
        self.start, self.printed = time.monotonic(), 0
        self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or "it", file=self.file) \
            if self.interactive else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.total:
            tenth = min(10, int(10 * self.n / self.total))
            if tenth > self.printed:
                self.printed = tenth
                self._print()
        elif time.monotonic() - self.start > 60 * (self.printed + 1):  # unknown total: about once a minute
            self.printed += 1
            self._print()

    def _print(self) -> None:
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc,
                                 unit=self.unit.rstrip("s") or "it",  # rates per row, counts in rows
                                 bar_format=self.FORMAT.replace("UNITS", self.unit) if self.total else None)
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total is None and self.n:
            self._print()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_table(rows: list[dict]) -> str:
    """The table `character run` ends with: one line per stage (stage, rows in, rows out, seconds, done/skipped)."""
    head = ("stage", "rows in", "rows out", "seconds", "status")
    body = [(r["stage"], *(("-", "-", "-") if r["skipped"] else (str(r["rows_in"]), str(r["rows_out"]),
                                                                  f"{r['seconds']:.1f}")),
             "skipped (complete)" if r["skipped"] else "done") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) if i in (0, 4) else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))).rstrip()
             for line in (head, *body)]
    return "\n".join(lines)
