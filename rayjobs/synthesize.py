"""`ray job submit --working-dir . -- python -m rayjobs.synthesize --config FILE [overrides]`"""
import sys

from character.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
