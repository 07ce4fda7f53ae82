"""`ray job submit --working-dir . -- python -m rayjobs.train_dpo --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-dpo", *sys.argv[1:]]))
