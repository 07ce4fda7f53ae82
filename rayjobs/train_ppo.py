"""`ray job submit --working-dir . -- python -m rayjobs.train_ppo --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-ppo", *sys.argv[1:]]))
