"""`ray job submit --working-dir . -- python -m rayjobs.report --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
