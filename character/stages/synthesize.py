"""Stage `synthesize`: the model writes many varied human messages for each trait, deduplicated and
filtered, and split once into train / held_out / adversarial (the work itself: character/synthesis.py)."""
from __future__ import annotations

from character.config import Config
from character.runtime import StageResult
from character.synthesis import synthesize_messages
from character.tracking import tracked


@tracked("synthesize", "messages")
def run(config: Config, force: bool = False) -> StageResult:
    return synthesize_messages(config, force)
