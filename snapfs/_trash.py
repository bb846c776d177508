"""The trash: what a restore or rollback deletes is moved out of the way first, deleted after.

Deleting a tree costs the disk one journal operation per file (~0.1 ms here), so rolling back
an import that added a 30k-file venv spent seconds on deletion. Instead each removed entry is
renamed into ``.snapfs/trash/<pid>-<rand>/<n>``: one rename, whatever it holds, on the same
filesystem. The project is exact the moment the renames land; what the trash holds is garbage
that nothing refers to, deleted once the restore is finished:

* by a daemon thread when snapfs runs inside a host application;
* by a forked child, detached from the terminal, after a CLI command (``enable_fork``), so the
  command returns at once;
* at once, with ``SNAPFS_PURGE=now`` (the tests use it, so what they inspect is settled).

A trash directory is named by the process that owns it. The child of a fork claims it first, by
renaming it to its own pid. One whose owner died (a kill mid-purge) is deleted by the next
snapfs command, with the other leftovers.

An entry is only moved whole if nothing in it is kept (ignored or preserved paths stay where
they are); otherwise, and where the rename can't be done (another filesystem mounted inside the
project), it is deleted in place as before.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from ._fsops import DIR_FLAGS, KeepFn, remove_entry
from ._objects import _dead_owner  # the same <pid>-... naming as the store's temp dirs

TRASH = "trash"
_fork_ok = False


def enable_fork() -> None:
    """Let a finished command's trash be deleted by a detached child (the CLI calls this)."""
    global _fork_ok
    _fork_ok = True


def _mode() -> str:
    mode = os.environ.get("SNAPFS_PURGE", "background").strip().lower()
    return mode if mode in ("now", "background") else "background"


class Trash:
    """One restore's trash directory, made on first use."""

    def __init__(self, state_dir: Path) -> None:
        self.base = state_dir / TRASH
        self.path: Path | None = None
        self.fd = -1
        self.count = 0
        self.broken = False  # the trash directory can't be made: every removal is in place

    def _open(self) -> int:
        if self.fd < 0:
            self.base.mkdir(exist_ok=True)
            self.path = self.base / f"{os.getpid()}-{os.urandom(4).hex()}"
            self.path.mkdir()
            self.fd = os.open(self.path, DIR_FLAGS)
        return self.fd

    def take(self, dir_fd: int, name: bytes, keep: KeepFn | None, relpath: bytes) -> bool:
        """Move ``name`` (in ``dir_fd``) into the trash; False if it must be deleted in place
        (something in it is kept, or it is on another filesystem). True if it is gone."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            if _holds_kept(dir_fd, name, relpath, keep):
                return False
        elif keep is not None and keep(relpath):
            return False
        if self.broken:
            return False
        self.count += 1
        try:
            os.rename(name, str(self.count), src_dir_fd=dir_fd, dst_dir_fd=self._open())
        except OSError:
            # The trash is only a faster way: another filesystem mounted here (EXDEV), a
            # directory we may not move, no room for the trash itself... delete in place, where
            # a real problem is reported with the project's own path.
            self.broken = self.fd < 0
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def empty(self) -> None:
        """Delete what this trash holds: now, in a daemon thread, or in a detached child."""
        self.close()
        path = self.path
        if path is None:
            return
        self.path = None
        if _mode() == "now":
            purge(path)
        elif _fork_ok and threading.active_count() == 1 and _fork_and_purge(path):
            return
        else:
            threading.Thread(target=purge, args=(path,), name="snapfs-trash", daemon=True).start()


def _holds_kept(dir_fd: int, name: bytes, relpath: bytes, keep: KeepFn | None) -> bool:
    """Is any path under directory ``name`` one a restore must keep in place? (``keep`` also
    answers for ``.snapfs``, a nested project's state.) A directory that can't be read is
    treated as holding one: what can't be vouched for is not moved."""
    if keep is None:
        return False
    if keep(relpath + b"/"):
        return True
    stack: list[tuple[int, bytes]] = []
    try:
        stack.append((os.open(name, DIR_FLAGS, dir_fd=dir_fd), relpath))
        while stack:
            fd, rel = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
                for child, is_dir in entries:
                    sub = rel + b"/" + child
                    if keep(sub + b"/" if is_dir else sub):
                        return True
                    if is_dir:
                        stack.append((os.open(child, DIR_FLAGS, dir_fd=fd), sub))
            finally:
                os.close(fd)
    except OSError:
        return True
    finally:
        for fd, _rel in stack:
            os.close(fd)
    return False


def purge(path: Path) -> None:
    """Delete a trash directory and everything in it, never following a link."""
    try:
        fd = os.open(path.parent, DIR_FLAGS)
    except OSError:
        return
    try:
        remove_entry(fd, os.fsencode(path.name))
    except OSError:
        pass  # what is left is swept by a later command
    finally:
        os.close(fd)


def _fork_and_purge(path: Path) -> bool:
    """Delete ``path`` in a child detached from this process's terminal and pipes. False if
    no child could be made (the caller deletes it another way)."""
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        return True
    # The child: touch nothing the parent owns (no SQLite, no locks), and hold no pipe open,
    # or a caller waiting for the parent's output would wait for this deletion too.
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        mine = path.parent / f"{os.getpid()}-{path.name.split('-', 1)[-1]}"
        os.rename(path, mine)  # claimed: named by a live process again
        purge(mine)
    except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
        pass
    finally:
        os._exit(0)  # no atexit handlers, no buffered output of the parent's written twice


def sweep(state_dir: Path) -> None:
    """Delete the trash of processes that died before emptying it."""
    base = state_dir / TRASH
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if _dead_owner(name):
            purge(base / name)


def has_leftovers(state_dir: Path) -> bool:
    try:
        return any(_dead_owner(n) for n in os.listdir(state_dir / TRASH))
    except OSError:
        return False
