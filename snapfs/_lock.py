"""One writer per project (or store) at a time, via flock.

The kernel drops an flock when its holder dies, so a crashed writer never leaves a stale lock. The
holder writes its pid, host and command into the lock file so a waiting process can say who it is
waiting for.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ._errors import LockBusy


class Lock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None
        self._depth = 0

    def owner(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(
        self,
        *,
        wait: bool = True,
        shared: bool = False,
        on_wait: Callable[[str], None] | None = None,
        purpose: str = "",
    ) -> None:
        if self._fd is not None:  # re-entrant within one Project
            self._depth += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self.owner()
                if not wait:
                    raise LockBusy(
                        f"The {self.what} is busy: another snapfs process is writing to it"
                        + (f" ({owner})." if owner else "."),
                        owner=owner,
                        hint="Try again when it has finished.",
                    ) from None
                if on_wait is not None:
                    on_wait(owner)
                fcntl.flock(fd, op)
        except BaseException:
            os.close(fd)
            raise
        if not shared:
            info = f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%H:%M:%S')}"
            if purpose:
                info += f": {purpose}"
            try:  # only what a waiting writer is told: the lock holds without it
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode() + b"\n", 0)
            except OSError:
                pass  # (a full disk, say) raising here would leak the held fd: a self-deadlock
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
