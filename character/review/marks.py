"""A reviewer's marks on a run, and how the stages honour them.

`<run>/review/verdicts.yaml`: per trait, keep / rework / drop with a note, who and when.
`<run>/review/flags.parquet`: individual pairs marked mislabeled and messages marked off-trait, with who, when
and why; a cleared flag stays in the file (cleared_by / cleared_at), so nothing a reviewer said is lost.

Both are written whole and atomically (StageOutput.write_text / write_table: temp name + rename, one PUT on
object storage) by `character review` (character/review/app.py). The stages read them through `load_marks`:
rank sets flagged messages and pairs aside (reason `review_flag`), train-pm / train-dpo leave flagged pairs out
(same reason, counted), and a trait marked `drop` is left out of every later stage (`active_constitution`,
`keep_active_traits`) and of `character run`, with a line saying so.
"""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field

import pyarrow as pa
import yaml

from character.core import schemas
from character.core.config import ConfigError
from character.core.store import StageInputError, StageOutput, stable_id
from character.core.traits import load_constitution

FOLDER = "review"
VERDICTS = "verdicts.yaml"
FLAGS = "flags.parquet"
VERDICT_CHOICES = ("keep", "rework", "drop")
FLAG_CHOICES = {"pair": ("mislabeled",), "message": ("off_trait",)}
REVIEW_FLAG = "review_flag"  # reason of a row set aside because a reviewer flagged it
REVIEW_DROP = "review_drop"  # reason of a row set aside because its trait is marked drop

_write_lock = threading.Lock()  # one writer per process: the review server's request threads


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ReviewMarks:
    verdicts: dict[str, dict] = field(default_factory=dict)  # trait -> {verdict, note, reviewer, updated_at}
    flags: list[dict] = field(default_factory=list)  # rows of flags.parquet, cleared ones included

    def __post_init__(self):
        # Looked up once per pair or message by rank and the pair trainers: built once, not per lookup.
        self._dropped = frozenset(t for t, v in self.verdicts.items() if v.get("verdict") == "drop")
        self._active = {kind: {f["target_id"]: f for f in self.flags if f["cleared_at"] is None and f["kind"] == kind}
                        for kind in FLAG_CHOICES}

    @property
    def dropped(self) -> frozenset[str]:
        return self._dropped

    def active_flags(self, kind: str | None = None) -> dict[str, dict]:
        """target id -> flag row, for flags not cleared (of one kind, or all)."""
        if kind is not None:
            return self._active.get(kind, {})
        return {target: f for flags in self._active.values() for target, f in flags.items()}

    def set_aside_reason(self, trait: str, message_id: str, pair_id: str | None = None) -> str | None:
        """Why a row of this trait / message / pair is left out on review's word, or None."""
        if trait in self.dropped:
            return REVIEW_DROP
        if message_id in self.active_flags("message") or (pair_id and pair_id in self.active_flags("pair")):
            return REVIEW_FLAG
        return None

    def detail(self, trait: str, message_id: str, pair_id: str | None = None) -> str:
        """The reviewer's words behind `set_aside_reason`, for the `detail` column of set-aside rows."""
        if trait in self.dropped:
            v = self.verdicts[trait]
            return f"trait marked drop by {v.get('reviewer')}: {v.get('note') or ''}".strip()
        flag = self.active_flags("pair").get(pair_id or "") or self.active_flags("message").get(message_id)
        return f"{flag['flag']} ({flag['reviewer']}, {flag['created_at']}): {flag['note'] or ''}".strip()


def _review(output_dir: str) -> StageOutput:
    return StageOutput(output_dir, FOLDER)


def parse_verdicts(text: str, origin: str) -> dict[str, dict]:
    """verdicts.yaml → {trait: {...}}; a malformed file is an error naming the file and the trait."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    traits = data.get("traits") if isinstance(data, dict) else None
    if not isinstance(traits, dict):
        raise ConfigError(f"{origin}: expected a mapping 'traits: {{<trait>: {{verdict: keep|rework|drop, note: ...}}}}'")
    for name, entry in traits.items():
        verdict = entry.get("verdict") if isinstance(entry, dict) else None
        if verdict not in VERDICT_CHOICES:
            raise ConfigError(f"{origin}: trait '{name}': verdict {verdict!r} is not one of {', '.join(VERDICT_CHOICES)}")
    return traits


def load_marks(output_dir: str) -> ReviewMarks:
    """The run's review marks; empty when nobody reviewed it."""
    review = _review(output_dir)
    verdicts = parse_verdicts(review.read_text(VERDICTS), review.path(VERDICTS)) if review.exists(VERDICTS) else {}
    flags = review.read_table(FLAGS, schemas.REVIEW_FLAGS).to_pylist() if review.exists(FLAGS) else []
    return ReviewMarks(verdicts, flags)


def check_marks_traits(marks: ReviewMarks, traits: list[str], output_dir: str) -> None:
    """A verdict, or a flag not cleared, naming a trait the constitution does not have is a config error (a
    reviewer who wrote `ai-nature` for `ai_nature` would believe a trait dropped that is not), naming the closest
    real trait. `traits`: every trait of the constitution file (traits.only's choice aside)."""
    import difflib

    named = [(VERDICTS, name) for name in marks.verdicts] + [(FLAGS, f["trait"]) for f in marks.active_flags().values()]
    for file, name in named:
        if name in traits:
            continue
        closest = difflib.get_close_matches(name, traits, n=1, cutoff=0.0)
        hint = f"did you mean '{closest[0]}'? " if closest else ""
        raise ConfigError(f"{_review(output_dir).path(file)}: trait '{name}' is not a trait of the run "
                          f"({hint}its traits: {', '.join(traits)})")


def save_verdict(output_dir: str, trait: str, verdict: str, note: str, reviewer: str) -> dict:
    if verdict not in VERDICT_CHOICES:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICT_CHOICES)}")
    with _write_lock:
        marks = load_marks(output_dir)
        entry = {"verdict": verdict, "note": note, "reviewer": reviewer, "updated_at": now()}
        verdicts = {**marks.verdicts, trait: entry}
        header = "# Trait verdicts from `character review`: keep | rework | drop (drop: later stages skip the trait)\n"
        _review(output_dir).write_text(VERDICTS, header + yaml.safe_dump({"traits": verdicts}, sort_keys=True))
    return entry


def _write_flags(output_dir: str, rows: list[dict]) -> None:
    _review(output_dir).write_table(FLAGS, pa.Table.from_pylist(rows, schema=schemas.REVIEW_FLAGS))


def add_flag(output_dir: str, kind: str, target_id: str, message_id: str, trait: str, flag: str, note: str,
             reviewer: str) -> dict:
    """Flag a pair (mislabeled) or a message (off_trait); flagging a target again replaces its flag."""
    if flag not in FLAG_CHOICES.get(kind, ()):
        raise ValueError(f"a {kind} cannot be flagged {flag!r} (choices: {FLAG_CHOICES})")
    with _write_lock:
        flags = load_marks(output_dir).flags
        row = {"flag_id": stable_id(kind, target_id, now()), "kind": kind, "target_id": target_id,
               "message_id": message_id, "trait": trait, "flag": flag, "note": note, "reviewer": reviewer,
               "created_at": now(), "cleared_by": None, "cleared_at": None}
        for old in flags:
            if old["target_id"] == target_id and old["kind"] == kind and old["cleared_at"] is None:
                old.update(cleared_by=reviewer, cleared_at=row["created_at"])
        _write_flags(output_dir, flags + [row])
    return row


def clear_flag(output_dir: str, kind: str, target_id: str, reviewer: str) -> int:
    """Clear the active flag of a target (the row stays, with who cleared it and when). Returns how many."""
    with _write_lock:
        flags = load_marks(output_dir).flags
        cleared = 0
        for row in flags:
            if row["target_id"] == target_id and row["kind"] == kind and row["cleared_at"] is None:
                row.update(cleared_by=reviewer, cleared_at=now())
                cleared += 1
        if cleared:
            _write_flags(output_dir, flags)
    return cleared


def review_fingerprint(set_aside: list[dict]) -> str:
    """What a review set aside of a stage's rows (their ids), as one string a resume can compare: "none" or
    "<count>:<hash>"."""
    ids = sorted(r.get("pair_id") or r.get("message_id") for r in set_aside if r["reason"] in (REVIEW_FLAG, REVIEW_DROP))
    return f"{len(ids)}:{stable_id(*ids)}" if ids else "none"


def announce(stage: str, output_dir: str, marks: ReviewMarks) -> None:
    if marks.dropped:
        print(f"[{stage}] review: skipping trait(s) {', '.join(sorted(marks.dropped))} (marked drop in "
              f"{_review(output_dir).path(VERDICTS)})", flush=True)


def active_constitution(config, stage: str, quiet: bool = False, marks: ReviewMarks | None = None):
    """The constitution the stage works on: the config's traits less those a reviewer marked `drop` (`marks`:
    the run's, if the caller has read them)."""
    constitution = load_constitution(config.traits.path, config.traits.only)
    marks = load_marks(config.run.output_dir) if marks is None else marks
    if not marks.dropped:
        return constitution
    if not quiet:
        announce(stage, config.run.output_dir, marks)
    kept = [t for t in constitution.traits if t.name not in marks.dropped]
    if not kept:
        raise StageInputError(f"{stage}: every trait is marked drop in {_review(config.run.output_dir).path(VERDICTS)}; "
                              f"change a verdict with `character review` or edit the file")
    return constitution.model_copy(update={"traits": kept})


def keep_active_traits(batch: pa.Table, dropped: list[str]) -> pa.Table:
    """Ray Data batch filter: the rows of traits not marked drop."""
    import pyarrow.compute as pc

    if not dropped:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column("trait"), value_set=pa.array(dropped, pa.string()))))
