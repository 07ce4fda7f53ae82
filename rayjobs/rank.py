"""`ray job submit --working-dir . -- python -m rayjobs.rank --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank", *sys.argv[1:]]))
