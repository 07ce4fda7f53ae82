"""`ray job submit --working-dir . -- python -m rayjobs.evaluate --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
