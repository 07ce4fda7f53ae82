"""Stage `synthesize`: the model writes many varied human messages for each trait, deduplicated and
filtered (the work itself: character/synthesis.py, shared with evaluation's adversarial messages)."""
from __future__ import annotations

from character.config import Config
from character.runtime import StageResult
from character.synthesis import STAGE, synthesize_messages


def run(config: Config, force: bool = False) -> StageResult:
    return synthesize_messages(config, force, stage=STAGE)
