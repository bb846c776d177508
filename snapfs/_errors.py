"""The snapfs exception tree.

Every error a user can act on is a subclass of :class:`SnapfsError`. Each class carries a
plain-language message (what happened, what to do next), a category, whether retrying can help, and
the CLI exit code. Technical detail lives in attributes and ``__cause__``.

::

    SnapfsError
     ├── UsageError (ValueError)            bad argument, unknown snapshot id
     │    ├── SnapshotNotFound (LookupError)
     │    └── PlanError                     an import plan is malformed; nothing was changed
     ├── NotAProject (FileNotFoundError)    no .snapfs/ here or above
     ├── ProjectPathError (NotADirectoryError)
     ├── LockBusy (BlockingIOError)         another writer holds the project
     ├── ObjectMissing                      an object a snapshot needs is gone
     ├── ObjectCorrupt                      an object's bytes no longer match its digest
     │    └── SealBroken                    a hardlinked object was written in place
     ├── StateCorrupt                       SQLite state or intent log unreadable
     ├── UnsafePath                         a path would leave the project root
     ├── DiskFull (OSError)                 ENOSPC / EDQUOT
     ├── FilesystemError (OSError)          any other OS error, with operation and path
     ├── CommandFailed                      git, pip or another tool exited non-zero (its output kept)
     └── DownloadError                      a download could not finish
          ├── SourceUnavailable            404, 401/403 that no refresh cures, every mirror dead
          ├── DownloadFailed (TimeoutError) transient faults outlasted the retry budget
          ├── BadContent                   a web page or another file instead of the one asked for
          └── HashMismatch                 the bytes don't match the expected digest, nowhere to repair from
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class Category(str, enum.Enum):
    """What kind of failure this is, used to pick a recovery strategy."""

    NETWORK = "network"
    VALIDATION = "validation"
    DEPENDENCY = "dependency"
    SYSTEM = "system"


class ExitCode(enum.IntEnum):
    OK = 0
    FOUND = 1  # verify/diff found something
    USAGE = 2
    ERROR = 3


class SnapfsError(Exception):
    """Root of every error snapfs raises on purpose."""

    category: Category = Category.SYSTEM
    retryable: bool = False
    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class UsageError(SnapfsError, ValueError):
    category = Category.VALIDATION
    exit_code = ExitCode.USAGE


class SnapshotNotFound(UsageError, LookupError):
    pass


class NotAProject(SnapfsError, FileNotFoundError):
    category = Category.VALIDATION
    exit_code = ExitCode.USAGE


class ProjectPathError(SnapfsError, NotADirectoryError):
    category = Category.VALIDATION
    exit_code = ExitCode.USAGE


class LockBusy(SnapfsError, BlockingIOError):
    retryable = True

    def __init__(self, message: str, *, owner: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.owner = owner


class ObjectMissing(SnapfsError):
    category = Category.VALIDATION

    def __init__(self, message: str, *, oid: str = "", paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.oid = oid
        self.paths = paths


class ObjectCorrupt(SnapfsError):
    category = Category.VALIDATION

    def __init__(self, message: str, *, oid: str = "", paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.oid = oid
        self.paths = paths


class SealBroken(ObjectCorrupt):
    """A hardlink-stored object's inode changed: something wrote to the file in place."""


class StateCorrupt(SnapfsError):
    category = Category.SYSTEM


class UnsafePath(SnapfsError):
    category = Category.VALIDATION
    exit_code = ExitCode.USAGE


class DiskFull(SnapfsError, OSError):
    category = Category.SYSTEM
    retryable = True


class FilesystemError(SnapfsError, OSError):
    category = Category.SYSTEM


class DownloadError(SnapfsError):
    category = Category.NETWORK

    def __init__(self, message: str, *, url: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url = url


class SourceUnavailable(DownloadError):
    """Every source answered in a way retrying won't change (404, 403 after a refresh...)."""


class DownloadFailed(DownloadError, TimeoutError):
    """Transient faults (resets, stalls, 5xx) went on without progress for the whole budget."""

    retryable = True


class BadContent(DownloadError):
    """A source sent something other than the file: a login page, a JSON error, another size."""

    category = Category.VALIDATION


class HashMismatch(DownloadError):
    """The finished file's digest is wrong and no other source could say which bytes are."""

    category = Category.VALIDATION


class CommandFailed(SnapfsError):
    """An external tool failed. The classifier reads ``tool``, ``returncode`` and ``output``."""

    category = Category.DEPENDENCY

    def __init__(
        self,
        message: str,
        *,
        tool: str,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        output: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.tool = tool
        self.argv = argv
        self.returncode = returncode
        self.output = output  # the tail of stdout+stderr


class PlanError(UsageError):
    """An import plan failed validation. ``where`` is a JSON path like ``steps[2].dest``."""

    def __init__(self, message: str, *, where: str = "", hint: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.where = where


_NO_SPACE = {_errno.ENOSPC, _errno.EDQUOT}


def from_oserror(
    exc: OSError, operation: str, path: str | bytes | os.PathLike[str] | None = None
) -> SnapfsError:
    """Turn an OSError into a one-line, plain-language snapfs error naming what and where."""
    where = os.fsdecode(os.fspath(path) if path is not None else (exc.filename or "")) or "?"
    reason = exc.strerror or str(exc)
    err: SnapfsError
    if exc.errno in _NO_SPACE:
        err = DiskFull(
            f"{operation} stopped: the disk is full ({where}).",
            hint="Free some space and run the command again; nothing was lost.",
        )
    elif exc.errno in (_errno.EACCES, _errno.EPERM):
        err = FilesystemError(
            f"{operation} stopped: permission denied on {where}.",
            hint="Check the file's owner and permissions.",
        )
    elif exc.errno == _errno.EROFS:
        err = FilesystemError(f"{operation} stopped: {where} is on a read-only filesystem.")
    else:
        err = FilesystemError(f"{operation} stopped: {reason} ({where}).")
    err.errno = exc.errno
    err.filename = where
    return err
