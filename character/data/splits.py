"""One split of the synthesised messages, made once by `synthesize` and stored in `messages/` (`split`):

- `train`: every training stage reads these only (respond -> rank -> train-pm -> train-ppo). The preference
  model's validation pairs and PPO's held-out reward prompts are carved out of them here, by message_id.
- `held_out`: a stable hash of message_id under `run.held_out_fraction`; evaluated, never trained on.
- `adversarial`: synthesised for evaluation only (pushes off the character).

Near-duplicates of a training message are removed from both evaluation splits when they are made
(character/stages/synthesize.py), so "held out" means neither the message nor a near-copy of it was trained on.
"""
from __future__ import annotations

from collections import defaultdict

from character.core import schemas
from character.core.config import Config
from character.core.store import StageOutput
from character.data.pm_data import is_held_out
from character.review.marks import load_marks

TRAIN, HELD_OUT, ADVERSARIAL = "train", "held_out", "adversarial"
EVAL_SPLITS = (HELD_OUT, ADVERSARIAL)
# Salts of the hashes: the split itself, and the carve-outs inside `train` (independent of each other).
_SPLIT_SALT, _PM_SALT, _PPO_SALT = "held_out", "pm_validation", "ppo_validation"


def assign_split(message_id: str, held_out_fraction: float) -> str:
    """`held_out` or `train`, from the message id alone: the same message lands on the same side in every
    run and whatever the seed, batching or number of workers."""
    return HELD_OUT if is_held_out(message_id, held_out_fraction, _SPLIT_SALT) else TRAIN


def read_messages(output_dir: str, splits: tuple[str, ...]) -> list[dict]:
    """Messages (message_id, trait, kind, text, split) of the given splits, in id order, less those a reviewer
    flagged off-trait or whose trait they marked drop (character/review/marks.py): PPO and evaluate read these."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = StageOutput(output_dir, "messages").read(schema=schemas.MESSAGES,
                                                     columns=["message_id", "trait", "kind", "text", "split"])
    table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))
    marks = load_marks(output_dir)
    rows = [r for r in table.to_pylist() if marks.set_aside_reason(r["trait"], r["message_id"]) is None]
    return sorted(rows, key=lambda r: r["message_id"])


def ppo_messages(config: Config) -> tuple[list[dict], list[dict]]:
    """PPO's training prompts and its validation prompts (held-out reward during training), both from the
    `train` split: the evaluation's messages are never seen by PPO, not even for its curves."""
    rows = read_messages(config.run.output_dir, (TRAIN,))
    validation = [r for r in rows if is_held_out(r["message_id"], config.ppo.eval_fraction, _PPO_SALT)]
    train = [r for r in rows if not is_held_out(r["message_id"], config.ppo.eval_fraction, _PPO_SALT)]
    return train, validation


def pm_validation(message_id: str, eval_fraction: float) -> bool:
    """Whether a (train-split) message's pairs validate the preference model instead of training it."""
    return is_held_out(message_id, eval_fraction, _PM_SALT)


def evaluation_messages(config: Config) -> list[dict]:
    """Held-out messages (at most evaluate.max_messages_per_trait per trait) plus every adversarial one."""
    per_trait: dict[str, int] = defaultdict(int)
    rows = []
    for r in read_messages(config.run.output_dir, EVAL_SPLITS):
        if r["split"] == HELD_OUT:
            if per_trait[r["trait"]] >= config.evaluate.max_messages_per_trait:
                continue
            per_trait[r["trait"]] += 1
        rows.append(r)
    return rows
