"""`ray job submit --working-dir . -- python -m rayjobs <stage> --config FILE [overrides]`: any stage of the
registry (character/execution/registry.py), or `run` for every stage in order; the same arguments as
`character <stage>`. The modules `rayjobs.<stage with _>` (and `rayjobs.pipeline` for `run`) do the same."""
from __future__ import annotations

import sys

from character.pipeline.cli import command


def command_of(module: str) -> str:
    """The CLI command of a `rayjobs.<x>` module: rayjobs.train_pm -> train-pm, rayjobs.pipeline -> run."""
    name = module.rsplit(".", 1)[-1]
    return "run" if name == "pipeline" else name.replace("_", "-")


def main_for(module: str) -> int:
    """The entry of a `python -m rayjobs.<x>` module (kept for job specs that name one)."""
    return command([command_of(module), *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(command(sys.argv[1:]))
