"""What train-pm and train-dpo share: the preference pairs both train on, the checks before Ray starts, the
held-out metrics, and the step loop every Ray Train worker of either stage runs.

The loop (`PairTraining`): a deterministic data position (character/data/pm_data.py: examples consumed, so an
elastic resize neither skips nor repeats a pair), gradient accumulation with the non-finite guard
(stepping.accumulation_step), checkpoints through Ray Train with the position, guard counters, last
metrics and every rank's RNG, and the evaluation cadence. The stage brings the model: its DeepSpeed engines,
a micro-batch loss and a held-out evaluation.
"""
from __future__ import annotations

import math
from collections import defaultdict

from character.core import schemas
from character.core.config import Config, PairTrainingConfig
from character.core.store import StageOutput
from character.data import pm_data
from character.data.pm_data import validate_pairs
from character.data.splits import pm_validation
from character.review.marks import load_marks
from character.tracking.runs import StepLog
from character.training.checkpoints import maybe_inject_fault, restore, restore_rng, rng_states, save_and_report
from character.training.losses import bradley_terry_loss
from character.training.stepping import NonFiniteGuard, StepClock, accumulation_step


def load_pairs(output_dir: str, eval_fraction: float, marks=None, pairs_per_message: int | None = None):
    """Training and validation pairs, both from the `train` split's messages (rank only ever sees those),
    divided by message (character/data/splits.py); unusable pairs set aside with a reason, and so are the pairs a
    reviewer flagged (or whose message or trait they did: character/review/marks.py). `marks`: the review marks the
    driver read (the workers train on what the driver checked, even if a reviewer marks more meanwhile).
    `pairs_per_message`: train on at most this many pairs of each message, its clearest (soft label farthest
    from 0.5); the rest are set aside as `pairs_per_message`. Validation keeps every pair."""
    rows = StageOutput(output_dir, "preferences").read(schema=schemas.PREFERENCES).to_pylist()
    good, bad = validate_pairs(rows)
    marks = load_marks(output_dir) if marks is None else marks
    reviewed = [(r, marks.set_aside_reason(r["trait"], r["message_id"], r["pair_id"])) for r in good]
    good = [r for r, reason in reviewed if reason is None]
    bad += [{**r, "reason": reason} for r, reason in reviewed if reason is not None]
    train = [r for r in good if not pm_validation(r["message_id"], eval_fraction)]
    held = [r for r in good if pm_validation(r["message_id"], eval_fraction)]
    if pairs_per_message is not None:
        train, excess = clearest_pairs(train, pairs_per_message)
        bad += [{**r, "reason": "pairs_per_message"} for r in excess]
    return train, held, bad


def clearest_pairs(pairs: list[dict], per_message: int) -> tuple[list[dict], list[dict]]:
    """(kept, excess): each message's `per_message` pairs with the highest soft label p_chosen (ties: lower
    pair_id), in the input order."""
    by_message = defaultdict(list)
    for r in pairs:
        by_message[r["message_id"]].append(r)
    kept = {r["pair_id"] for rows in by_message.values()
            for r in sorted(rows, key=lambda r: (-r["p_chosen"], r["pair_id"]))[:per_message]}
    return [r for r in pairs if r["pair_id"] in kept], [r for r in pairs if r["pair_id"] not in kept]


def pair_metrics(r_chosen: list[float], r_rejected: list[float], p: list[float], traits: list[str],
                 margin: float, bins: int) -> dict:
    """Held-out loss, accuracy, mean reward margin, per-trait accuracy and calibration (accuracy by
    confidence bucket, confidence = sigma(|r_c - r_r|) in [0.5, 1]) of rewards given to pairs: the PM's,
    or DPO's implicit rewards (whose Bradley-Terry loss is the DPO loss)."""
    import torch

    rc, rr, pp = (torch.tensor(x, dtype=torch.float64) for x in (r_chosen, r_rejected, p))
    delta = rc - rr
    correct = (delta > 0).tolist()
    per_trait: dict[str, list[int]] = defaultdict(list)
    for t, c in zip(traits, correct):
        per_trait[t].append(c)
    buckets = [{"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "n": 0, "correct": 0}
               for b in range(bins)]
    for d, c in zip(delta.tolist(), correct):
        conf = 1.0 / (1.0 + math.exp(-abs(d)))
        b = buckets[min(int((conf - 0.5) * 2 * bins), bins - 1)]
        b["n"] += 1
        b["correct"] += c
    for b in buckets:
        b["accuracy"] = b["correct"] / b["n"] if b["n"] else None
    return {
        "eval_loss": float(bradley_terry_loss(rc, rr, pp, margin)) if len(p) else float("nan"),
        "eval_accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "eval_mean_margin": float(delta.mean()) if len(p) else float("nan"),
        "eval_reward_chosen": float(rc.mean()) if len(p) else float("nan"),
        "eval_reward_rejected": float(rr.mean()) if len(p) else float("nan"),
        "eval_pairs": len(p),
        "per_trait_accuracy": {t: sum(v) / len(v) for t, v in sorted(per_trait.items())},
        "calibration": buckets,
    }


def gather_pair_scores(rows: list[dict], rank: int, world: int, batch: int, score) -> tuple[list, list]:
    """`score(rows) -> (first values, second values)` over every row, computed by all ranks on equal-sized
    shards (under ZeRO-3 forwards are collectives: every rank runs the same number), `batch` rows at a time,
    all-gathered: the two lists in the order of `rows`, on every rank."""
    import torch.distributed as dist

    per_rank = math.ceil(len(rows) / world) if rows else 0
    mine = [rows[min(i, len(rows) - 1)] for i in range(rank * per_rank, (rank + 1) * per_rank)] if rows else []
    results = []
    for start in range(0, per_rank, batch):
        first, second = score(mine[start : start + batch])
        results += [(rank * per_rank + start + k, a, b) for k, (a, b) in enumerate(zip(first, second))]
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    by_index = {i: (a, b) for part in gathered for i, a, b in part if i < len(rows)}
    order = sorted(by_index)
    return [by_index[i][0] for i in order], [by_index[i][1] for i in order]


class PairTraining:
    """One Ray Train worker's step loop over the training pairs. Built after the engines (it restores them
    from the latest checkpoint, with this rank's RNG): `state` is the checkpoint's client state, which a
    stage may read for what it stored there (train-dpo: the reference log-probs)."""

    def __init__(self, config: Config, cfg: PairTrainingConfig, engines: dict, train: list[dict], tag: str,
                 tracking=None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.config, self.cfg, self.engines, self.train, self.tag = config, cfg, engines, train, tag
        self.state = restore(engines) or {"step": 0, "position": 0, "guard": [0, 0], "last_metrics": {}}
        restore_rng(self.state)
        self.metrics_log = StepLog(config, tag, tracking, self.rank == 0)  # per step, rank 0 only

    def run(self, micro_loss, evaluate, client_extra: dict | None = None) -> dict:
        """`micro_loss(rows) -> loss` (a scalar tensor; every engine steps on it), `evaluate() -> metrics`
        (a collective: every rank calls it). `client_extra` joins every checkpoint's client state. Returns
        the final metrics and the run's counters."""
        import numpy as np

        cfg, state, rank, world = self.cfg, self.state, self.rank, self.world
        guard = NonFiniteGuard(cfg.max_nonfinite_in_row, *state["guard"])
        n, micro, accum, seed = len(self.train), cfg.micro_batch_size, cfg.grad_accum, self.config.run.seed
        total = state["step"] + pm_data.steps_left(n, state["position"], n * cfg.epochs, world, micro, accum)
        total = min(total, cfg.max_steps or total)
        metrics, position = state["last_metrics"], state["position"]
        clock = StepClock(f"train-{self.tag} step", state["step"], total, rank == 0)
        for step in range(state["step"], total):
            maybe_inject_fault(self.config, step)
            epoch, start, size = pm_data.step_slice(n, position, world, micro, accum)
            order = pm_data.epoch_order(n, epoch, seed)

            def loss_of(m: int):
                picked = pm_data.micro_batch_indices(order, start, size, m, rank, world, micro)
                # A short last step can leave this rank nothing: it still runs a (zero-weight) pass, because
                # every rank must take part in every backward (ZeRO's collectives).
                loss = micro_loss([self.train[i] for i in picked] or [self.train[order[start]]])
                return [loss if picked else loss * 0.0] * len(self.engines)

            losses, applied = accumulation_step(list(self.engines.values()), loss_of, accum)
            guard.update(applied, step, "loss or gradient norm")
            losses = [x[0] for x in losses]
            position += size
            done = step + 1
            if losses:
                self.metrics_log.log({"train_loss": float(np.mean(losses))}, done, f"{self.tag}/")
            clock.tick(done, f"loss {np.mean(losses):.4f}" if applied else "skipped (not finite)")
            if done % self.config.train.checkpoint_every == 0 or done == total:
                if cfg.eval_every == 0 or done == total:
                    metrics = evaluate()
                client = {"step": done, "position": position, "guard": [guard.in_row, guard.total],
                          "last_metrics": metrics, "rng": rng_states(), **(client_extra or {})}
                report = {"step": done, "train_loss": float(np.mean(losses)) if applied else float("nan"),
                          "skipped_steps": guard.total, **{k: v for k, v in metrics.items() if isinstance(v, float)}}
                save_and_report(self.engines, client, report)
                # train_loss went in above: one point per step
                self.metrics_log.log({k: v for k, v in report.items() if k not in ("step", "train_loss")}, done,
                                     f"{self.tag}/")
            elif cfg.eval_every and done % cfg.eval_every == 0:
                metrics = evaluate()
        self.metrics_log.close()
        return {**metrics, "steps": total, "skipped_steps": guard.total, "resumed_from_step": state["step"] or None,
                "examples_seen": position, "workers": world, "resized_from_workers": state.get("resized_from"),
                "train_pairs": n}
