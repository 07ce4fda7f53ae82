"""`ray job submit --working-dir . -- python -m rayjobs.pipeline --config FILE [overrides]`: every stage in order (`python -m rayjobs run`)."""
import sys

from rayjobs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for(__spec__.name))
