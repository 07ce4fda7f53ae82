"""Reading what a run directory holds, for pages about runs (the report stage, `character compare`): optional
files that may be missing or torn come back as None instead of failing the page."""
from __future__ import annotations

import json
import logging

from character.core.store import StageOutput

log = logging.getLogger("character")


def read_text(output_dir: str, stage: str, name: str) -> str | None:
    try:
        return StageOutput(output_dir, stage).read_text(name)
    except (FileNotFoundError, OSError):
        return None


def read_json(output_dir: str, stage: str, name: str) -> dict | None:
    try:
        return json.loads(read_text(output_dir, stage, name) or "null")
    except ValueError:
        log.warning("%s/%s under %s is not valid JSON: left out", stage, name, output_dir)
        return None


def read_ppo_metrics(text: str | None) -> list[dict] | None:
    """Parse metrics.jsonl (skipping a torn last line); one record per iteration, the last one wins."""
    if not text:
        return None
    by_it: dict[int, dict] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iteration" in rec:
            by_it[int(rec["iteration"])] = rec
    return [by_it[k] for k in sorted(by_it)] or None
