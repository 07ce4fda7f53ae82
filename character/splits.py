"""Which synthesised messages train the policy and which are held out for its evaluation.

Shared by train-ppo (trains on one side, reports held-out reward on the other) and evaluate (compares base
and trained models on the held-out side only), so both read the same split from one place.
"""
from __future__ import annotations

from character import schemas
from character.config import Config
from character.pm_data import is_held_out
from character.store import StageOutput


def message_split(config: Config) -> tuple[list[dict], list[dict]]:
    """Training and held-out messages (message_id, trait, text), split by message_id, in id order."""
    rows = StageOutput(config.run.output_dir, "messages").read(schema=schemas.MESSAGES,
                                                               columns=["message_id", "trait", "text"]).to_pylist()
    rows.sort(key=lambda r: r["message_id"])
    held = [r for r in rows if is_held_out(r["message_id"], config.ppo.eval_fraction, config.run.seed + 1)]
    train = [r for r in rows if not is_held_out(r["message_id"], config.ppo.eval_fraction, config.run.seed + 1)]
    return train, held
