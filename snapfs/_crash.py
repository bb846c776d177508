"""Named crash points: a testing aid that kills the process at an exact durable step.

``SNAPFS_CRASH_AT=restore.after_rename:17`` makes the 17th pass through the point named
``restore.after_rename`` SIGKILL the process. ``SNAPFS_CRASH_AT=restore.after_rename`` crashes at the
first pass. ``SNAPFS_CRASH_COUNT=path`` appends every point reached to that file, so a test can count
how often each point is hit. When neither variable is set the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("SNAPFS_CRASH_AT", "")
_count_file = os.environ.get("SNAPFS_CRASH_COUNT", "")
_target, _, _nth = _spec.partition(":")
_remaining = int(_nth) if _nth.isdigit() else 1
_active = bool(_target) or bool(_count_file)


def crash_point(name: str) -> None:
    global _remaining
    if not _active:
        return
    if _count_file:
        with open(_count_file, "a") as f:
            f.write(name + "\n")
    if name == _target:
        _remaining -= 1
        if _remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
