"""`ray job submit --working-dir . -- python -m rayjobs.evaluate --config FILE [overrides]`: `python -m rayjobs evaluate`."""
import sys

from rayjobs.__main__ import main_for

if __name__ == "__main__":
    sys.exit(main_for(__spec__.name))
