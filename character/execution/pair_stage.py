"""The driver side shared by the pair-training stages (train-pm, train-dpo): the pairs checked before Ray starts
(enough on both sides of the validation carve-out, the reviewer's set-asides, resumable checkpoints), the Ray
Train run of the stage's `train_loop` (character/training/pairs.py has the workers' side), and the result."""
from __future__ import annotations

from collections import Counter

from character.core.config import Config
from character.core.store import StageInputError, StageOutput
from character.execution.registry import StageSpec
from character.execution.runtime import StageResult, format_counts, upstream_cause
from character.execution.stage_run import run_stage
from character.review.marks import announce, load_marks, review_fingerprint
from character.training.checkpoints import check_resume_settings, trainer_for
from character.training.pairs import load_pairs


def run_pair_stage(config: Config, spec: StageSpec, section: str, train_loop, force: bool):
    """Runs a pair-training stage whose settings are `config.<section>`: its pairs checked before Ray starts,
    `train_loop` on the Ray Train workers (resuming from `_train/<output>`), then the commit. Returns
    (StageResult, the exported metrics.json); the metrics are None for a skipped stage."""
    metrics: dict = {}
    output_dir, eval_fraction = config.run.output_dir, getattr(config, section).eval_fraction

    def inputs(out: StageOutput):
        marks = load_marks(output_dir)
        announce(spec.name, output_dir, marks)
        train, held, bad = load_pairs(output_dir, eval_fraction, marks, getattr(config, section).pairs_per_message)
        check_pairs(spec.name, section, train, held, bad, StageOutput(output_dir, "preferences"), eval_fraction)
        # Checkpoints resume only on the same pairs: a review that sets other pairs aside needs --force.
        check_resume_settings(config, spec.output, {"review_set_aside": review_fingerprint(bad)})
        return marks, train, held, bad

    def work(out: StageOutput, result: StageResult, found) -> None:
        marks, train, held, bad = found
        result.rows_in = len(train) + len(held) + len(bad)
        trainer_for(config, train_loop, {"config": config.model_dump(mode="json"), "review_marks": marks},
                    spec.output).fit()
        metrics.update(out.read_json("metrics.json"))
        result.rows_out = len(train)
        result.drops.update(r["reason"] for r in bad)
        result.extra = {k: metrics.get(k) for k in ("eval_loss", "eval_accuracy", "eval_mean_margin", "steps",
                                                    "skipped_steps")}

    result = run_stage(config, spec, force, work, inputs)
    return result, None if result.skipped else metrics


def check_pairs(stage: str, section: str, train: list[dict], held: list[dict], bad: list[dict],
                preferences: StageOutput, eval_fraction: float) -> None:
    """Enough pairs to train and to validate on, checked before Ray starts, naming the upstream cause."""
    unusable = format_counts(Counter(r["reason"] for r in bad), "")
    if not train and not held:
        raise StageInputError(f"{stage}: 0 usable preference pairs; {upstream_cause(preferences)}"
                              + (f"; unusable pairs: {unusable}" if unusable else ""))
    if not train or not held:
        messages = len({r["message_id"] for r in train + held})
        raise StageInputError(
            f"{stage}: {len(train) + len(held)} pairs from {messages} messages split (by message, {section}."
            f"eval_fraction={eval_fraction}) into {len(train)} training and {len(held)} validation pairs: each side "
            f"needs at least one; synthesize more messages (synthesize.messages_per_trait) or change "
            f"{section}.eval_fraction")
