"""Stage `respond`: shown its trait (or the whole constitution), the model samples K candidate
responses per training message (the `train` split only: evaluation's messages are never answered here).
Rows stream from messages/ through vLLM actors into responses/, keyed by message_id; an interrupted run
resumes with the messages not yet answered."""
from __future__ import annotations

import pyarrow as pa

from character.core import schemas
from character.core.config import Config
from character.core.store import StageInputError, StageOutput, seed_from_id
from character.core.traits import Constitution
from character.data.prompts import character_system_prompt
from character.data.splits import TRAIN
from character.execution.registry import spec_of
from character.execution.runtime import (StageResult, committed_counts, consume_counts, format_counts, keep_split,
                                         upstream_cause, without_done, write_split)
from character.execution.stage_run import run_stage
from character.inference.engine import ChatGenerator, engine_sized_blocks, generation_pool_args
from character.review.marks import active_constitution, keep_active_traits, load_marks

SPEC = spec_of(__name__)


def add_prompts(batch: pa.Table, *, constitution_json: str, mode: str, seed: int) -> pa.Table:
    constitution = Constitution.model_validate_json(constitution_json)
    traits = constitution.by_name()
    systems = [character_system_prompt(traits[t], constitution, mode) for t in batch.column("trait").to_pylist()]
    seeds = [seed_from_id(m, seed) for m in batch.column("message_id").to_pylist()]
    return (batch.append_column("system", pa.array(systems, pa.string()))
            .append_column("user", batch.column("text"))
            .append_column("seed", pa.array(seeds, pa.int64())))


def write_responses(batch: pa.Table, out: StageOutput, *, mode: str, sampling: dict) -> pa.Table:
    reasons = batch.column("reject_reason").to_pylist()
    keep = pa.array([r is None for r in reasons])
    good = batch.filter(keep)
    n = good.num_rows
    kept = pa.table({
        "message_id": good.column("message_id"), "trait": good.column("trait"), "kind": good.column("kind"),
        "prompt": good.column("text"), "candidates": good.column("outputs"),
        "finish_reasons": good.column("finish_reasons"),
        "system_prompt": pa.array([mode] * n, pa.string()),
        "temperature": pa.array([sampling["temperature"]] * n, pa.float32()),
        "top_p": pa.array([sampling["top_p"]] * n, pa.float32()),
        "max_tokens": pa.array([sampling["max_tokens"]] * n, pa.int32()),
        "seed": good.column("seed"),
        "candidate_token_ids": good.column("output_token_ids"), "candidate_logprobs": good.column("output_logprobs"),
    }, schema=schemas.RESPONSES)
    bad = batch.filter(pa.array([r is not None for r in reasons]))
    rejected = pa.table({
        "row_id": bad.column("message_id"), "trait": bad.column("trait"), "reason": bad.column("reject_reason"),
        "text": bad.column("text"), "detail": bad.column("detail"),
    }, schema=schemas.REJECTED)
    return write_split(batch, out, "message_id", kept, rejected)


def run(config: Config, force: bool = False) -> StageResult:
    return run_stage(config, SPEC, force, lambda out, result, inputs: _answer(config, out, result, inputs),
                     inputs=lambda out: _training_messages(config),
                     stats=True, made=_answered)


def _training_messages(config: Config) -> tuple:
    """The active constitution, the traits marked drop and the count of training messages to answer
    (an error naming what synthesize kept if there are none)."""
    messages = StageOutput(config.run.output_dir, "messages")
    marks = load_marks(config.run.output_dir)
    constitution = active_constitution(config, "respond", marks=marks)
    dropped = sorted(marks.dropped)
    rows = messages.read(schema=schemas.MESSAGES, columns=["split", "trait"]).to_pylist()
    splits = [r["split"] for r in rows if r["trait"] not in dropped]
    total = splits.count(TRAIN)
    if not total:
        raise StageInputError(f"respond: 0 messages to answer; {upstream_cause(messages)}, none of them in the "
                              f"'{TRAIN}' split ({len(splits)} held out or adversarial"
                              f"{', the rest of traits marked drop' if dropped else ''})")
    return constitution, dropped, total


def _answer(config: Config, out: StageOutput, result: StageResult, inputs: tuple) -> None:
    import ray.data

    constitution, dropped, total = inputs
    messages = StageOutput(config.run.output_dir, "messages")
    cfg = config.respond
    sampling = cfg.sampling.model_copy(update={"n": cfg.candidates}).model_dump()
    done = sorted(out.ids("message_id") | out.ids("row_id", "rejected"))
    ds = (
        engine_sized_blocks(
            ray.data.read_parquet(messages.part_files(), schema=schemas.MESSAGES, filesystem=messages.filesystem)
            .map_batches(keep_split, fn_kwargs=dict(split=TRAIN), batch_format="pyarrow")
            .map_batches(keep_active_traits, fn_kwargs=dict(dropped=dropped), batch_format="pyarrow")
            .map_batches(without_done, fn_kwargs=dict(column="message_id", done=done), batch_format="pyarrow")
            .map_batches(add_prompts, fn_kwargs=dict(constitution_json=constitution.model_dump_json(),
                                                     mode=cfg.system_prompt, seed=config.run.seed),
                         batch_format="pyarrow"),
            config.engine)
        .map_batches(ChatGenerator, fn_constructor_kwargs=dict(
            model_name=config.model.name, dtype=config.model.dtype, engine=config.engine.model_dump(),
            sampling=sampling, seed=config.run.seed,
            then=write_responses, then_kwargs=dict(out=out, mode=cfg.system_prompt, sampling=sampling),
            logprobs=True),
            **generation_pool_args(config.engine))
    )
    result.rows_in, _, _, tokens = consume_counts(ds, "respond", max(total - len(done), 0))
    result.rows_in += len(done)
    result.rows_out, result.drops = committed_counts(out, "message_id")
    result.extra = {"candidates_per_message": cfg.candidates, "new_tokens_this_run": tokens}


def _answered(out: StageOutput, result: StageResult, inputs: tuple) -> None:
    if not result.rows_out:
        raise StageInputError(f"respond: 0 of {inputs[-1]} training messages answered, every "
                              f"one set aside ({format_counts(result.drops)}); see {out.path('rejected')}/ and rerun "
                              f"with --force after adjusting engine.max_model_len or respond settings")
