"""Stage `synthesize`: for each trait and message kind, the model writes human messages (also evaluation's
adversarial messages), deduplicated, filtered, and split once into train / held_out / adversarial.

Two phases, both streamed by Ray Data:
1. generation — (trait, kind, index) requests → vLLM actors → raw texts, committed as parts under
   messages/_work/ keyed by request_id (an interrupted run resumes from them);
2. clean-up per trait — extract the message from the reply (list numbering, preambles, quotes), then set
   aside empty, truncated, assistant-voice, meta, non-question, too short/long, exact and near duplicates
   with the reason → messages/part-*.parquet and messages/rejected/, stats.json (keep rate, examples of
   kept and dropped messages), _SUCCESS.

Every kept message gets its `split` here, once (character/data/splits.py): `train` or `held_out` by a hash of
its id, or `adversarial` for evaluation's own messages (generated in the same pass with their own seeds).
Within a trait the clean-up sees training messages first, so a look-alike of one is dropped from the
evaluation side; across traits, evaluation messages that near-duplicate any training message are set
aside afterwards as `near_duplicate_of_training`.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa

from character.core import schemas
from character.core.config import Config
from character.core.store import StageInputError, StageOutput, seed_from_id, stable_id
from character.core.traits import Trait
from character.data.dedupe import content_reason, drop_reasons, extract_message, near_duplicates_of
from character.data.prompts import SYNTH_SYSTEM, synthesis_prompt
from character.data.splits import ADVERSARIAL, HELD_OUT, TRAIN, assign_split
from character.execution.registry import spec_of
from character.execution.runtime import StageResult, consume_counts, format_counts, without_done, write_split
from character.execution.stage_run import run_stage
from character.inference.engine import ChatGenerator, engine_sized_blocks, generation_pool_args
from character.review.marks import active_constitution

SPEC = spec_of(__name__)
WORK = "_work"


def expand_requests(row: dict, *, per_trait: int, kinds: list[str], seed: int, adversarial: int) -> list[dict]:
    """One trait row → its generation requests (kinds round-robin, topics rotating), then `adversarial`
    requests for evaluation's own adversarial messages (their own seed, so their own request ids)."""
    trait = Trait.model_validate_json(row["trait_json"])
    plan = [(kinds[i % len(kinds)], i, seed, None) for i in range(per_trait)]
    plan += [("adversarial", i, seed + 7919, ADVERSARIAL) for i in range(adversarial)]
    requests = []
    for kind, index, request_seed, split in plan:
        request_id = stable_id(trait.name, kind, str(index), str(request_seed))
        user, prefix = synthesis_prompt(trait, kind, index)
        requests.append({
            "request_id": request_id, "trait": trait.name, "kind": kind, "system": SYNTH_SYSTEM,
            "user": user, "assistant_prefix": prefix, "seed": seed_from_id(request_id, request_seed), "split": split,
        })
    return requests


def seed_question_rows(traits: list[Trait]) -> pa.Table:
    rows = [
        {"request_id": stable_id(t.name, "seed", q), "trait": t.name, "kind": "seed", "raw_text": q,
         "finish_reason": "stop", "reject_reason": None, "split": None}
        for t in traits for q in t.questions
    ]
    return pa.Table.from_pylist(rows, schema=schemas.RAW_MESSAGES)


def raw_rows(batch: pa.Table) -> pa.Table:
    """Engine output → RAW_MESSAGES (first sample of each request; n is 1 for synthesis)."""
    outputs = batch.column("outputs").to_pylist()
    finishes = batch.column("finish_reasons").to_pylist()
    return pa.table({
        "request_id": batch.column("request_id"), "trait": batch.column("trait"), "kind": batch.column("kind"),
        "raw_text": pa.array([o[0] if o else "" for o in outputs], pa.string()),
        "finish_reason": pa.array([f[0] if f else "none" for f in finishes], pa.string()),
        "reject_reason": batch.column("reject_reason"), "split": batch.column("split"),
    }, schema=schemas.RAW_MESSAGES)


def write_raw(batch: pa.Table, out: StageOutput) -> pa.Table:
    return write_split(batch, out, "request_id", raw_rows(batch), None, sub=(WORK,))


def clean_group(group: pa.Table, *, min_chars: int, max_chars: int, near_threshold: float,
                num_perm: int, drop_truncated: bool, require_question: bool, held_out_fraction: float) -> pa.Table:
    """All raw rows of one trait → rows with their split and `drop_reason` (None = kept). Deterministic
    order: training messages first (a look-alike is dropped from the evaluation side, never from
    training), within them seed questions (written by people, they win over generated look-alikes, and
    skip the content checks), then request_id."""
    rows = {r["request_id"]: r for r in group.to_pylist()}  # a retried write may repeat a request
    for r in rows.values():
        r["text"] = extract_message(r["raw_text"])
        r["message_id"] = stable_id(r["trait"], r["text"])
        r["split"] = r["split"] or assign_split(r["message_id"], held_out_fraction)
    ordered = sorted(rows.values(), key=lambda r: (r["split"] != TRAIN, r["kind"] != "seed", r["request_id"]))
    pre = []
    for r in ordered:
        if r["reject_reason"]:
            pre.append(r["reject_reason"])
        elif drop_truncated and r["finish_reason"] == "length":
            pre.append("truncated")
        elif r["kind"] != "seed" and r["text"]:
            # A push off the trait ("Drop the act.") need not be a question.
            pre.append(content_reason(r["text"], require_question and r["kind"] != "adversarial"))
        else:
            pre.append(None)
    candidates = [r["text"] if p is None else "" for r, p in zip(ordered, pre)]
    reasons = drop_reasons(candidates, min_chars=min_chars, max_chars=max_chars,
                           near_threshold=near_threshold, num_perm=num_perm)
    out = []
    for r, p, reason in zip(ordered, pre, reasons):
        out.append({
            "message_id": r["message_id"], "trait": r["trait"], "kind": r["kind"],
            "text": r["text"] if r["text"] else r["raw_text"], "request_id": r["request_id"], "split": r["split"],
            "drop_reason": p or reason, "raw_text": r["raw_text"],
        })
    schema = schemas.MESSAGES.append(pa.field("drop_reason", pa.string())).append(pa.field("raw_text", pa.string()))
    return pa.Table.from_pylist(out, schema=schema)


def set_aside_training_near_duplicates(out: StageOutput, near_threshold: float, num_perm: int) -> int:
    """Evaluation messages (any trait) that exactly or nearly duplicate a kept training message (any trait)
    move from messages/ to messages/rejected/ as `near_duplicate_of_training`, naming the training message.
    On the driver: the index needs every training message at once (texts only, small next to generation)."""
    import pyarrow.parquet as pq

    fs = out.filesystem
    parts = {f: pq.read_table(f, filesystem=fs, schema=schemas.MESSAGES) for f in out.part_files()}
    rows = [r for table in parts.values() for r in table.to_pylist()]
    train = [r for r in rows if r["split"] == TRAIN]
    evals = [r for r in rows if r["split"] != TRAIN]
    matches = near_duplicates_of([r["text"] for r in train], [r["text"] for r in evals],
                                 near_threshold=near_threshold, num_perm=num_perm)
    leaked = {e["message_id"]: (e, train[m]) for e, m in zip(evals, matches) if m is not None}
    if not leaked:
        return 0
    rejected = [{"row_id": e["request_id"], "trait": e["trait"], "reason": "near_duplicate_of_training",
                 "text": e["text"], "detail": f"{e['split']} message; training message {t['message_id']} "
                                              f"({t['trait']}): {t['text']}"} for e, t in leaked.values()]
    out.write_part(pa.Table.from_pylist(rejected, schema=schemas.REJECTED), "rejected", key="near-duplicates-of-training")
    for path, table in parts.items():
        ids = table.column("message_id").to_pylist()
        if any(i in leaked for i in ids):
            out.replace_part(path, table.filter(pa.array([i not in leaked for i in ids])))
    return len(leaked)


def keep_stats(kept: list[dict], rejected: list[dict], examples: int = 3) -> dict:
    """Keep rate of the generated messages (seed questions aside), counts per trait, and a few examples
    of kept messages and of dropped ones per reason (deterministic: sorted by text)."""
    generated_kept = [r for r in kept if r["kind"] != "seed"]
    generated = len(generated_kept) + len(rejected)
    per_trait: dict[str, int] = {}
    per_split = {TRAIN: 0, HELD_OUT: 0, ADVERSARIAL: 0}
    for r in kept:
        per_trait[r["trait"]] = per_trait.get(r["trait"], 0) + 1
        per_split[r["split"]] += 1
    dropped: dict[str, list[dict]] = {}
    for r in sorted(rejected, key=lambda r: (r["reason"], r["text"])):
        shown = dropped.setdefault(r["reason"], [])
        if len(shown) < examples and all(x["text"] != r["text"] for x in shown):
            dropped[r["reason"]].append({"trait": r["trait"], "text": r["text"], "reply": r["detail"]})
    by_trait: dict[str, list[dict]] = {}
    for r in sorted(generated_kept, key=lambda r: (r["trait"], r["text"])):
        if len(by_trait.setdefault(r["trait"], [])) < examples:
            by_trait[r["trait"]].append({"kind": r["kind"], "text": r["text"]})
    return {"per_trait": dict(sorted(per_trait.items())), "per_split": per_split, "generated": generated,
            "generated_kept": len(generated_kept),
            "keep_rate": len(generated_kept) / generated if generated else None,
            "examples_kept": by_trait, "examples_dropped": dropped}


def write_clean(batch: pa.Table, out: StageOutput) -> pa.Table:
    reasons = batch.column("drop_reason").to_pylist()
    kept_mask = pa.array([r is None for r in reasons])
    kept = batch.filter(kept_mask).select(schemas.MESSAGES.names).cast(schemas.MESSAGES)
    dropped = batch.filter(pa.array([r is not None for r in reasons]))
    rejected = pa.table({
        "row_id": dropped.column("request_id"), "trait": dropped.column("trait"),
        "reason": dropped.column("drop_reason"), "text": dropped.column("text"),
        "detail": dropped.column("raw_text"),  # the model's whole reply, before extraction
    }, schema=schemas.REJECTED)
    return write_split(batch, out, "request_id", kept, rejected)


def run(config: Config, force: bool = False) -> StageResult:
    """Messages into `<run>/messages`, each with its split."""
    def work(out: StageOutput, result: StageResult, constitution) -> None:
        total, new_tokens = generate(config, out, constitution.traits)
        result.rows_in, result.rows_out, result.drops = clean(config, out, len(constitution.traits))
        kept = out.read(schema=schemas.MESSAGES, columns=["trait", "kind", "text", "split"]).to_pylist()
        rejected = out.read("rejected", schema=schemas.REJECTED).to_pylist() if out.part_files("rejected") else []
        result.extra = {"requested": total, "new_tokens_this_run": new_tokens, **keep_stats(kept, rejected)}

    return run_stage(config, SPEC, force, work, inputs=lambda out: active_constitution(config, "synthesize"),
                     stats=True,
                     made=lambda out, result, _: check_splits(result, config.run.held_out_fraction))


def generate(config: Config, out: StageOutput, traits: list[Trait]) -> tuple[int, int]:
    """Phase 1: every (trait, kind, index) request not yet committed → raw texts under messages/_work/.
    Returns (requests in all, new tokens generated by this run)."""
    import ray.data

    cfg = config.synthesize
    adversarial = config.evaluate.adversarial_per_trait
    seeds: set[str] = set()
    if cfg.include_seed_questions and any(t.questions for t in traits):
        seed_rows = seed_question_rows(traits)
        out.write_part(seed_rows, WORK, key="seed-questions")
        seeds = set(seed_rows.column("request_id").to_pylist())
    done = sorted(out.ids("request_id", WORK))
    total = len(traits) * (cfg.messages_per_trait + adversarial)
    requests = (
        ray.data.from_items([{"trait_json": t.model_dump_json()} for t in traits])
        .flat_map(expand_requests, fn_kwargs=dict(per_trait=cfg.messages_per_trait, kinds=list(cfg.kinds),
                                                  seed=config.run.seed, adversarial=adversarial))
        .map_batches(without_done, fn_kwargs=dict(column="request_id", done=done), batch_format="pyarrow")
    )
    generated = (
        engine_sized_blocks(requests, config.engine)
        .map_batches(ChatGenerator, fn_constructor_kwargs=dict(
            model_name=config.model.name, dtype=config.model.dtype, engine=config.engine.model_dump(),
            # One message per list line (prompts.synthesis_prompt): the line's end ends the sample.
            sampling=cfg.sampling.model_copy(update={"n": 1, "stop": ["\n"]}).model_dump(), seed=config.run.seed,
            then=write_raw, then_kwargs=dict(out=out)),
            **generation_pool_args(config.engine))
    )
    _, _, _, new_tokens = consume_counts(generated, "synthesize: generate",
                                         total - len(set(done) - seeds))  # requests left to generate
    return total, new_tokens


def clean(config: Config, out: StageOutput, n_traits: int) -> tuple[int, int, Counter]:
    """Phase 2: the raw texts of each trait → kept messages and set-aside rows; then evaluation messages that
    near-duplicate a training message are set aside. Returns (rows in, rows kept, reasons set aside)."""
    import ray.data

    cfg = config.synthesize
    out.clear()  # a clean-up phase cut short by a kill is redone whole: it is cheap and deterministic
    out.clear("rejected")
    cleaned = (
        ray.data.read_parquet(out.part_files(WORK), schema=schemas.RAW_MESSAGES, filesystem=out.filesystem)
        # Partitions scale with the trait count (Ray's default of 200 dominates small runs).
        .groupby("trait", num_partitions=max(1, min(200, n_traits // 16 + 1)))
        .map_groups(clean_group, batch_format="pyarrow", fn_kwargs=dict(
            min_chars=cfg.min_chars, max_chars=cfg.max_chars, near_threshold=cfg.near_duplicate_threshold,
            num_perm=cfg.minhash_permutations, drop_truncated=cfg.drop_truncated,
            require_question=cfg.require_question, held_out_fraction=config.run.held_out_fraction))
        .map_batches(write_clean, fn_kwargs=dict(out=out), batch_format="pyarrow")
    )
    rows_in, rows_out, drops, _ = consume_counts(cleaned, "synthesize: clean", None)
    leaked = set_aside_training_near_duplicates(out, cfg.near_duplicate_threshold, cfg.minhash_permutations)
    if leaked:
        drops["near_duplicate_of_training"] += leaked
    return rows_in, rows_out - leaked, drops


def check_splits(result: StageResult, held_out_fraction: float) -> None:
    """No _SUCCESS without messages to train on and to evaluate on: the error says what the clean-up set
    aside (the rows are kept under messages/rejected/; a rerun with other settings resumes generation)."""
    split = result.extra["per_split"]
    drops = format_counts(result.drops, "nothing set aside")
    if not split[TRAIN]:
        raise StageInputError(f"synthesize: 0 training messages; kept {result.rows_out} of {result.rows_in} ({drops}) "
                              f"-- see {result.path}/rejected/ for the reasons, and adjust synthesize settings")
    if not split[HELD_OUT]:
        raise StageInputError(f"synthesize: 0 held-out messages among the {result.rows_out} kept "
                              f"(run.held_out_fraction={held_out_fraction}): raise synthesize.messages_per_trait or "
                              f"run.held_out_fraction; generated messages are kept and reused")
