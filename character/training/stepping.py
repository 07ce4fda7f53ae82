"""One optimizer step on every rank: gradient accumulation, agreement across ranks on skipping a non-finite step, evaluation mode, and the step clock."""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts skipped steps (non-finite loss, or a non-finite gradient norm that DeepSpeed skipped) and
    stops the run after `max_in_row` consecutive ones, naming the step."""

    def __init__(self, max_in_row: int, in_row: int = 0, total: int = 0):
        self.max_in_row, self.in_row, self.total = max_in_row, in_row, total

    def update(self, ok: bool, step: int, what: str) -> bool:
        if ok:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(f"step {step}: {what} was not finite for {self.in_row} steps in a row "
                                 f"({self.total} skipped in all); stopping (limit {self.max_in_row})")
        return False


def all_agree(flag: bool) -> bool:
    """True only if every rank says True (a skipped step must be skipped everywhere)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def is_finite(x) -> bool:
    return math.isfinite(scalar(x))


def scalar(x) -> float:
    """A loss's value as a float, detached from the graph (float() of a tensor that needs grad warns)."""
    return float(x.detach()) if hasattr(x, "detach") else float(x)


@contextmanager
def eval_mode(*engines):
    """Scoring forwards without dropout (LoRA dropout included), back to training mode afterwards."""
    for engine in engines:
        engine.eval()
    try:
        yield
    finally:
        for engine in engines:
            engine.train()


def accumulation_step(engines: list, micro_losses, accum: int) -> tuple[list[list[float]], bool]:
    """One optimizer step of every engine over `accum` micro-batches; `micro_losses(m)` returns micro-batch
    m's loss for each engine. Returns the per-micro-batch losses and whether the step was applied.

    Every micro-batch is backpropagated, always: DeepSpeed finds the accumulation boundary by counting
    micro-steps, and under ZeRO the backward passes are collectives, so stopping early (as a `break` would)
    leaves the counter and the gradients of the next step inconsistent. Once any loss on any rank is not
    finite, that and every later loss of the step is multiplied by NaN: the gradients at the boundary are
    then non-finite on every rank, and DeepSpeed's overflow check skips the whole step, leaving parameters
    and optimizer state exactly as they were (tests/test_accumulation.py)."""
    before = [e.skipped_steps for e in engines]
    poisoned, kept = False, []
    for m in range(accum):
        losses = micro_losses(m)
        if not all_agree(all(is_finite(x) for x in losses)):
            poisoned = True
        if poisoned:
            losses = [x * float("nan") for x in losses]
        else:
            kept.append([scalar(x) for x in losses])
        for engine, loss in zip(engines, losses):
            engine.backward(loss)
            engine.step()
    skipped = [e.skipped_steps > b for e, b in zip(engines, before)]
    if poisoned and not all(skipped):
        raise NonFiniteError("a non-finite loss reached an optimizer step that DeepSpeed did not skip (its overflow "
                             "check is off for this configuration): the parameters are no longer finite")
    return kept, not any(skipped)


class StepClock:
    """Progress lines of a training loop on rank 0: step n of N, seconds per step, an estimate of the time
    left (from the steps timed in this process: a resumed run's estimate starts afresh). One line after the
    first step and one at each tenth of the total: the workers' output is a log, not a terminal."""

    def __init__(self, label: str, first: int, total: int, enabled: bool):
        self.label, self.first, self.total, self.enabled = label, first, total, enabled
        self.start = time.monotonic()
        self.tenth = -1

    def tick(self, done: int, extra: str = "") -> None:
        if not self.enabled or done <= self.first:
            return
        tenth = 10 * done // max(self.total, 1)
        if done > self.first + 1 and tenth == self.tenth:
            return
        self.tenth = tenth
        per_step = (time.monotonic() - self.start) / (done - self.first)
        left = per_step * (self.total - done)
        # sys.__stdout__: Ray Train 2.60 patches print() in its workers to tee stdout into its logger, and
        # both reach the driver, so every line showed twice; the worker's own stdout reaches it once.
        print(f"[{self.label}] {done}/{self.total}, {per_step:.1f} s each, about {left:.0f} s left"
              + (f"; {extra}" if extra else ""), file=sys.__stdout__, flush=True)
