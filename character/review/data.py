"""What `character review` shows, read from a run directory (local or object storage): per trait, its
messages (kept and set aside), candidates, the self-ranking's comparisons and pairs, the PM's scores of the
pairs, base vs trained answers and the trait's numbers from eval/summary.json.

Every table is read once, sorted by trait (or message) and indexed by the offsets of each group, so a page
slices the rows of one trait instead of scanning the run: a 1,000-trait run opens as fast as its files
read. The reviewer's marks (character/review/marks.py) are reread after each write.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import yaml

from character.core import schemas
from character.core.store import StageOutput
from character.review.marks import load_marks

PAGE = 20
TRAITS_PAGE = 50


class Grouped:
    """A table sorted by `key`, with each key's row range: `rows(k)` is a slice, not a scan."""

    def __init__(self, table: pa.Table | None, key: str):
        table = table if table is not None else pa.table({key: pa.array([], pa.string())})
        self.table = table.sort_by(key) if table.num_rows else table
        self.ranges: dict[str, tuple[int, int]] = {}
        for i, value in enumerate(self.table.column(key).to_pylist()):
            start, _ = self.ranges.get(value, (i, i))
            self.ranges[value] = (start, i + 1)

    def count(self, value: str) -> int:
        start, end = self.ranges.get(value, (0, 0))
        return end - start

    def rows(self, value: str) -> list[dict]:
        start, end = self.ranges.get(value, (0, 0))
        return self.table.slice(start, end - start).to_pylist() if end > start else []


def _read(output: StageOutput, *sub: str, schema: pa.Schema | None = None, columns=None) -> pa.Table | None:
    return output.read(*sub, schema=schema, columns=columns) if output.part_files(*sub) else None


def order_inconsistent(q_ab: float, q_ba: float) -> bool:
    """The judge disagrees with itself: it prefers the same position in both orders (both P(first better)
    above 0.5, or both below), so which response it prefers depends on the order it saw them in."""
    if q_ab is None or q_ba is None or math.isnan(q_ab) or math.isnan(q_ba):
        return False
    return (q_ab - 0.5) * (q_ba - 0.5) > 0


def page_of(rows: list, page: int, size: int) -> tuple[list, int, int]:
    """(rows of page `page` (1-based, clamped), the page, the number of pages)."""
    pages = max(1, math.ceil(len(rows) / size))
    page = min(max(1, page), pages)
    return rows[(page - 1) * size: page * size], page, pages


@dataclass
class TraitText:
    name: str
    statement: str = ""
    clarification: str = ""


class RunView:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        out = lambda stage: StageOutput(run_dir, stage)  # noqa: E731
        self.traits = self._traits()
        messages = _read(out("messages"), schema=schemas.MESSAGES)
        self.messages = Grouped(messages, "trait")
        self.message_by_id = {r["message_id"]: r for r in (messages.to_pylist() if messages is not None else [])}
        self.dropped_messages = Grouped(_read(out("messages"), "rejected", schema=schemas.REJECTED), "trait")
        self.responses = Grouped(_read(out("responses"), schema=schemas.RESPONSES, columns=[
            "message_id", "trait", "prompt", "candidates", "finish_reasons", "system_prompt"]), "message_id")
        self.comparisons = Grouped(_read(out("preferences"), "comparisons", schema=schemas.COMPARISONS), "message_id")
        pairs = _read(out("preferences"), schema=schemas.PREFERENCES)
        self.pairs = Grouped(pairs, "trait")
        self.pairs_by_message = Grouped(pairs, "message_id")
        self.rank_rejected = Grouped(_read(out("preferences"), "rejected", schema=schemas.REJECTED), "trait")
        pm = out("pm")
        self.pm_scores = ({r["pair_id"]: r for r in pm.read_table("pair_scores.parquet", schemas.PM_PAIR_SCORES)
                           .to_pylist()} if pm.exists("pair_scores.parquet") else {})
        self.eval = Grouped(_read(out("eval"), schema=schemas.EVAL), "trait")
        evaluation = out("eval")
        self.summary = evaluation.read_json("summary.json") if evaluation.exists("summary.json") else {}
        self.names = [t.name for t in self.traits]
        known = set(self.names)
        # Traits with data but not in the constitution (a run whose traits file changed) are listed too.
        for grouped in (self.messages, self.pairs, self.eval):
            for name in sorted(set(grouped.ranges) - known):
                self.traits.append(TraitText(name))
                self.names.append(name)
                known.add(name)
        self.marks = load_marks(run_dir)

    def _traits(self) -> list[TraitText]:
        """The run's constitution.yaml (written with its config), else the traits file its config names."""
        run = StageOutput(self.run_dir, "")
        text = None
        if run.exists("constitution.yaml"):
            text = run.read_text("constitution.yaml")
        elif run.exists("config.yaml"):
            path = (yaml.safe_load(run.read_text("config.yaml")) or {}).get("traits", {}).get("path")
            try:
                text = open(path).read() if path else None
            except OSError:
                text = None
        # libyaml's loader where PyYAML has it: with the pure-Python one a 1,000-trait run took 0.49 s to
        # read and index instead of 0.33 s (benchmarks/review_load.py).
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if text else {}
        return [TraitText(t["name"], t.get("statement", ""), t.get("clarification", ""))
                for t in (data or {}).get("traits", [])]

    def reload_marks(self) -> None:
        self.marks = load_marks(self.run_dir)

    # ---- the trait list ----
    def trait_rows(self, query: str = "", verdict: str = "") -> list[dict]:
        """One row per trait: counts, the reviewer's verdict and the held-out win rate; filtered by a search
        text (name or statement) and a verdict (`unreviewed` for traits without one)."""
        flags = self.marks.active_flags()
        flagged = {}
        for f in flags.values():
            flagged[f["trait"]] = flagged.get(f["trait"], 0) + 1
        rows = []
        q = query.strip().lower()
        for t in self.traits:
            v = self.marks.verdicts.get(t.name, {}).get("verdict", "")
            if q and q not in t.name.lower() and q not in t.statement.lower():
                continue
            if verdict and (v or "unreviewed") != verdict:
                continue
            win = self.summary.get("groups", {}).get(f"{t.name}/held_out", {}).get("win_rate")
            rows.append({"name": t.name, "statement": t.statement, "verdict": v,
                         "messages": self.messages.count(t.name), "dropped": self.dropped_messages.count(t.name),
                         "pairs": self.pairs.count(t.name), "flags": flagged.get(t.name, 0), "win_rate": win})
        return rows

    def neighbours(self, name: str) -> tuple[str | None, str | None]:
        i = self.names.index(name)
        return (self.names[i - 1] if i else None, self.names[i + 1] if i + 1 < len(self.names) else None)

    def trait(self, name: str) -> TraitText | None:
        return next((t for t in self.traits if t.name == name), None)

    def numbers(self, name: str) -> dict[str, dict]:
        """split -> the trait's group of eval/summary.json (win rates, PM scores, lengths with intervals)."""
        groups = self.summary.get("groups", {})
        return {split: groups[f"{name}/{split}"] for split in ("held_out", "adversarial") if f"{name}/{split}" in groups}

    # ---- per-trait lists ----
    def messages_of(self, name: str, split: str = "", kind: str = "", status: str = "kept") -> list[dict]:
        """Kept messages (filtered by split and kind), `dropped` ones with their reasons, or `flagged` ones."""
        if status == "dropped":
            return [{**r, "message_id": r["row_id"]} for r in self.dropped_messages.rows(name)]
        flagged = self.marks.active_flags("message")
        rows = [r for r in self.messages.rows(name)
                if (not split or r["split"] == split) and (not kind or r["kind"] == kind)
                and (status != "flagged" or r["message_id"] in flagged)]
        for r in rows:
            response = self.responses.rows(r["message_id"])
            r["candidates"] = len(response[0]["candidates"]) if response else 0
            r["pairs"] = self.pairs_by_message.count(r["message_id"])
            r["flag"] = flagged.get(r["message_id"])
        return sorted(rows, key=lambda r: r["message_id"])

    def kinds(self, name: str) -> list[str]:
        return sorted({r["kind"] for r in self.messages.rows(name)})

    def _with_scores(self, pair: dict, flags: dict) -> dict:
        score = self.pm_scores.get(pair["pair_id"])
        return {**pair, "pm_chosen": score and score["chosen_reward"], "pm_rejected": score and score["rejected_reward"],
                "pm_role": score and score["role"], "inconsistent": order_inconsistent(pair["p_ab"], pair["p_ba"]),
                "flag": flags.get(pair["pair_id"])}

    def pairs_of(self, name: str, disagree: bool = False, flagged: bool = False, sort: str = "") -> list[dict]:
        """The trait's pairs with the PM's rewards; `disagree`: only those the judge ranked inconsistently across
        the two orders; `sort=pm_disagrees`: the PM's margin against the label first (likely mislabeled)."""
        flags = self.marks.active_flags("pair")
        rows = [self._with_scores(p, flags) for p in self.pairs.rows(name)]
        rows = [r for r in rows if (not disagree or r["inconsistent"]) and (not flagged or r["flag"])]
        if sort == "pm_disagrees":
            rows.sort(key=lambda r: (r["pm_chosen"] - r["pm_rejected"]) if r["pm_chosen"] is not None else math.inf)
        return rows

    def set_aside_by_rank(self, name: str) -> list[dict]:
        return self.rank_rejected.rows(name)

    def answers_of(self, name: str, split: str = "held_out", sort: str = "", message_id: str = "") -> list[dict]:
        """Base vs trained answers per evaluation message (sample 0 shown; rewards averaged over samples), of one
        split (or both) and one message (or all); `sort=pm_change`: largest |trained − base| PM change first."""
        by_message: dict[str, dict] = {}
        for r in self.eval.rows(name):
            if (split and r["split"] != split) or (message_id and r["message_id"] != message_id):
                continue
            m = by_message.setdefault(r["message_id"], {"message_id": r["message_id"], "prompt": r["prompt"],
                                                        "split": r["split"], "base": [], "trained": []})
            if r["model"] in m:  # base and trained; policy.sft's own answers (model "sft") are the report's
                m[r["model"]].append(r)
        rows = []
        for m in by_message.values():
            for side in ("base", "trained"):
                m[side].sort(key=lambda r: r["sample"])
                m[f"{side}_reward"] = sum(r["reward"] for r in m[side]) / len(m[side]) if m[side] else math.nan
                m[f"{side}_win"] = sum(r["win_prob"] for r in m[side]) / len(m[side]) if m[side] else math.nan
            m["pm_change"] = m["trained_reward"] - m["base_reward"]
            rows.append(m)
        if sort == "pm_change":
            rows.sort(key=lambda m: -abs(m["pm_change"]) if not math.isnan(m["pm_change"]) else math.inf)
        else:
            rows.sort(key=lambda m: m["message_id"])
        return rows

    # ---- one message ----
    def message(self, message_id: str) -> dict | None:
        """A message with its candidates, both-order comparisons, pairs (with PM scores) and answers."""
        msg = self.message_by_id.get(message_id)
        if msg is None:
            return None
        responses = self.responses.rows(message_id)
        comparisons = [{**c, "inconsistent": order_inconsistent(c["q_ij"], c["q_ji"])}
                       for c in self.comparisons.rows(message_id)]
        flags = self.marks.active_flags("pair")
        pairs = [self._with_scores(p, flags) for p in self.pairs_by_message.rows(message_id)]
        answers = self.answers_of(msg["trait"], split="", message_id=message_id)
        return {**msg, "response": responses[0] if responses else None, "comparisons": comparisons, "pairs": pairs,
                "answers": answers, "flag": self.marks.active_flags("message").get(message_id)}
