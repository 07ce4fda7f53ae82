"""A full disk (ENOSPC), a spent quota (EDQUOT) or an object store out of room, said in one line.

What a user sees: `<stage>: no space left writing <path> (<n> bytes free); free space and rerun: what is
written is kept`. Every write of a stage output goes through `atomic_write` (character/core/store.py), which
removes its temporary file and raises `NoSpaceLeftError` naming the final path; a full disk met anywhere else
(a checkpoint, the tracking store, a worker of Ray Data or Ray Train whose error reaches the driver wrapped
in Ray's own exceptions) is found by `find_no_space` in the failure's chain of causes or in its text.

Why a text match as well as errno: Ray re-raises a worker's error in the driver as a `RayTaskError` whose
cause may not unpickle, Ray Train reports a worker's failure as text, SQLite says "database or disk is full"
(SQLITE_FULL, no errno) and object stores answer with an error code in a message. The markers below are the
ones these sources write.
"""
from __future__ import annotations

import errno
import os
import re
import shutil

# Fault drills only: while the file this names exists, stage writes and the tracking store's creation fail the
# way a full disk does (OSError ENOSPC): those whose path holds the file's text, every one if it is empty. It
# reaches the engines' Ray actors with their environment (character.inference.engine.engine_env).
FULL_DISK_ENV = "CHARACTER_TEST_FULL_DISK"

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_MARKERS = (
    "No space left on device",  # ENOSPC, as strerror writes it (Python, pyarrow, torch)
    "Disk quota exceeded",  # EDQUOT
    "database or disk is full",  # SQLite's SQLITE_FULL (the MLflow store)
    "XMinioStorageFull",  # MinIO: "Storage backend has reached its minimum free drive threshold"
    "QuotaExceeded",  # S3-compatible stores with per-bucket quotas (Ceph RGW, Wasabi)
)
_OURS_IN_TEXT = re.compile(r"no space left writing (.+?) \((?:\d+ bytes free|object storage)\)")
_PATH_IN_TEXT = re.compile(r"""(?:No space left on device|Disk quota exceeded): ['"]([^'"]+)['"]""")


class NoSpaceLeftError(OSError):
    """A write found no room; `filename` is the file it was writing (the final name, not a temporary one).
    Plain OSError arguments (errno, message, path), so it pickles across Ray's processes like any OSError."""


def free_bytes(path: str) -> int | None:
    """Bytes free on the local filesystem holding `path` (its nearest existing folder); None for object storage."""
    if "://" in path and not path.startswith("file://"):
        return None
    folder = os.path.abspath(path.removeprefix("file://"))
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or "/").free
    except OSError:
        return None


def no_space_message(path: str) -> str:
    free = free_bytes(path)
    room = f"{free} bytes free" if free is not None else "object storage"
    return f"no space left writing {path} ({room}); free space and rerun: what is written is kept"


def no_space_error(path: str, cause: BaseException) -> NoSpaceLeftError:
    code = getattr(cause, "errno", None)
    return NoSpaceLeftError(code if code in NO_SPACE_ERRNOS else errno.ENOSPC, no_space_message(path), path)


def is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    return any(marker in str(exc) for marker in NO_SPACE_MARKERS)


def _causes(exc: BaseException):
    """The exception and everything it wraps: __cause__, __context__, Ray's `.cause`, exception groups."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        todo += list(getattr(current, "exceptions", None) or [])


def find_no_space(exc: BaseException, fallback_path: str) -> str | None:
    """The one-line message for a failure that is a full disk anywhere in its chain, else None. The path is
    the one the failing write named (ours, an OSError's filename, or the text of a wrapped error), else
    `fallback_path` (the run directory)."""
    chain = list(_causes(exc))
    for current in chain:
        if isinstance(current, NoSpaceLeftError):
            return str(current.strerror)
    for current in chain:  # ours, as text: a worker's error that reached the driver as a message
        if found := _OURS_IN_TEXT.search(str(current)):
            return no_space_message(found.group(1))
    for current in chain:
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS and current.filename:
            return no_space_message(str(current.filename))
    for current in chain:
        if is_no_space(current):
            found = _PATH_IN_TEXT.search(str(current))
            return no_space_message(found.group(1) if found else fallback_path)
    return None


def check_full_disk_drill(path: str) -> None:
    """Raise ENOSPC, as the kernel's error reaches Python, while a fault drill's flag file exists (see
    FULL_DISK_ENV) and `path` holds the text the flag file holds (empty: every path); one environment lookup
    otherwise."""
    flag = os.environ.get(FULL_DISK_ENV)
    if not flag or not os.path.exists(flag):
        return
    with open(flag) as f:
        only = f.read().strip()
    if only in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
