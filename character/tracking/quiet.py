"""Logs a person can read: in a run's log, the lines meant for people are ours (stages, progress per tenth,
results, the stage table) and every warning and error; Ray's routine INFO lines are left to Ray's own files.

By default:
- Ray Data's console handler shows WARNING and above. Its INFO lines (the execution plan, and in a log that
  is not a terminal, a progress block every few seconds per dataset: hundreds of lines in the main job) still
  go to the session's `ray-data.log`; our progress lines (character/tracking/progress.py) say the same per tenth.
- Lines known to be harmless are dropped from stderr when it is not a terminal: Ray's core worker logs at ERROR
  level, once per actor kind, that an actor "has constructor arguments in the object store and max_restarts > 0"
  (ray-project/ray#53727). Ray Data's actor pools and Ray Train's controller make such actors by design.

- MLflow's own ERROR log of a store error, with its traceback: the tracker's outage warning says it once.

`--verbose` on any stage command, or CHARACTER_LOG_LEVEL=verbose, turns all of it back on.
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import select
import sys
import threading

LOG_LEVEL_ENV = "CHARACTER_LOG_LEVEL"
HARMLESS_STDERR = (b"has constructor arguments in the object store and max_restarts > 0",)
PARTIAL_LINE_S = 0.2  # how long a line without its end waits for the rest before it is passed on
HARMLESS_RAY_DATA = ("Truncating long operator name",)  # a cosmetic note about its own progress bar names


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").strip().lower() in ("verbose", "debug")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in HARMLESS_RAY_DATA)


def quiet_ray_data() -> None:
    """Ray Data's console output at WARNING and above (its file log keeps everything); a no-op when verbose."""
    if verbose():
        return
    importlib.import_module("ray.data")  # importing it sets up Ray Data's logging, adjusted here

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropHarmless) for f in handler.filters):
                handler.addFilter(_DropHarmless())


def quiet_tracker_logs() -> None:
    """MLflow logs a store error at ERROR with its traceback before raising it; the error reaches
    character/tracking/outage.py, which says it once, so the log is left to --verbose."""
    if not verbose():
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


_installed = False


def filter_stderr() -> None:
    """Drop HARMLESS_STDERR lines from this process's stderr (file descriptor 2, where Ray's C++ core worker
    writes and where Ray prints what its workers wrote), when stderr is not a terminal and not verbose.

    Why a pipe on the descriptor: the driver's own core worker writes from C++, past any Python-level stream.
    Lines pass through a thread that writes every other line at once; at exit what is in the pipe is written
    before the process ends. A process killed outright may lose the lines written in its last moment."""
    global _installed
    if _installed or verbose() or os.isatty(2):
        return
    _installed = True
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    done = threading.Event()
    end_marker = b"\0character-stderr-end\0"

    def pump() -> None:
        # Lines are passed on whole, so that a line cut by a read's end is still recognised. A partial line
        # that nothing follows for a moment (a progress bar's \r update) is passed on as it is.
        pending = b""
        while True:
            if pending and not select.select([read_end], [], [], PARTIAL_LINE_S)[0]:
                os.write(original, pending)
                pending = b""
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 65536:  # \r updates without an end: passed on rather than held
                os.write(original, pending)
                pending = b""
            for line in lines:
                if line.endswith(end_marker):
                    os.write(original, line[:-len(end_marker)])
                    done.set()
                elif not any(text in line for text in HARMLESS_STDERR):
                    os.write(original, line + b"\n")
        os.write(original, pending)
        done.set()

    threading.Thread(target=pump, name="stderr-filter", daemon=True).start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.write(2, end_marker + b"\n")
        done.wait(timeout=5)
        os.dup2(original, 2)

    atexit.register(restore)
