"""`ray job submit --working-dir . -- python -m rayjobs.respond --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["respond", *sys.argv[1:]]))
