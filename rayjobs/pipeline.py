"""`ray job submit --working-dir . -- python -m rayjobs.pipeline --config FILE [overrides]`: every stage."""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
