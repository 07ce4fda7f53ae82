"""`ray job submit --working-dir . -- python -m rayjobs.synthesize --config FILE [overrides]`: `python -m rayjobs synthesize`."""
import sys

from rayjobs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for(__spec__.name))
