"""`ray job submit --working-dir . -- python -m rayjobs.train_pm --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-pm", *sys.argv[1:]]))
