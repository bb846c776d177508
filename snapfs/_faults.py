"""Injected I/O faults: a testing aid that makes the Nth file or OS call of a kind fail.

``SNAPFS_FAULT_AT=rename:17:ENOSPC`` makes the 17th ``rename`` call of the process raise
``OSError(ENOSPC)``, shaped exactly as the real call would raise it (the path arguments as
``filename`` / ``filename2``; none for calls on a file descriptor, like the kernel's errors).
``KIND:N+:ERRNO`` fails the Nth call and every later one of that kind (a disk that stays full).
``SNAPFS_FAULT_COUNT=FILE`` appends one line per call, ``KIND<TAB>PATH``, and ``!KIND<TAB>PATH``
for the call that was failed, so a test can count the calls an operation makes and learn which
file a fault hit.

The seam wraps the functions of :mod:`os`, :mod:`fcntl` and :func:`open` that snapfs (and the
standard library on its behalf: shutil, pathlib) calls to change files. Kinds:

========  ==================================================================
open      ``os.open``, ``open()`` / ``io.open`` (any mode)
write     ``os.write``, ``os.pwrite``, ``write()`` on a file ``open()`` made writable
fsync     ``os.fsync``, ``os.fdatasync``, ``syncfs`` (:func:`snapfs._fsops.syncfs` calls :func:`hit`)
rename    ``os.rename``, ``os.replace``
link      ``os.link``, ``os.symlink``
ioctl     ``fcntl.ioctl`` (the reflink clone)
unlink    ``os.unlink``, ``os.remove``, ``os.rmdir``
mkdir     ``os.mkdir``
truncate  ``os.ftruncate``, ``os.posix_fallocate``
chmod     ``os.chmod``, ``os.fchmod``
========  ==================================================================

Calls on ``/proc``, ``/sys``, ``/dev`` and the standard streams are neither counted nor failed,
and neither is SQLite's own I/O (it happens in C). The wrappers are installed when
``snapfs`` is imported, and only when one of the variables is set; otherwise nothing is wrapped and
:func:`hit` is one global lookup.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import io
import os
import threading
from typing import Any

_spec = os.environ.get("SNAPFS_FAULT_AT", "")
_count_file = os.environ.get("SNAPFS_FAULT_COUNT", "")
active = bool(_spec) or bool(_count_file)

KINDS = (
    "open",
    "write",
    "fsync",
    "rename",
    "link",
    "ioctl",
    "unlink",
    "mkdir",
    "truncate",
    "chmod",
)


def parse(spec: str) -> tuple[str, int, bool, int]:
    """``KIND:N[+]:ERRNO`` -> (kind, n, sticky, errno). Raises ValueError on a bad spec."""
    kind, n, name = (spec.split(":") + ["", ""])[:3]
    sticky = n.endswith("+")
    n = n.rstrip("+")
    code = getattr(errno, name or "EIO", None)
    if kind not in KINDS or not n.isdigit() or int(n) < 1 or not isinstance(code, int):
        raise ValueError(f"SNAPFS_FAULT_AT={spec!r}: want KIND:N[+]:ERRNO, KIND in {KINDS}")
    return kind, int(n), sticky, code


_kind, _nth, _sticky, _errno = parse(_spec) if _spec else ("", 0, False, 0)
_counts = dict.fromkeys(KINDS, 0)
_lock = threading.Lock()
_log_fd = -1
_SKIP = ("/proc/", "/sys/", "/dev/")

_os_open = os.open
_os_write = os.write
_readlink = os.readlink


def _where(path: Any = None, fd: int | None = None, dir_fd: int | None = None) -> str:
    """The absolute path a call is about, for the count file and the /proc filter."""
    try:
        if path is not None and not isinstance(path, int):
            p = os.fsdecode(os.fspath(path))
            if p.startswith("/") or dir_fd is None:
                return os.path.abspath(p)
            return os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), p)
        if isinstance(path, int):
            fd = path
        if fd is not None:
            return _readlink(f"/proc/self/fd/{fd}")
    except (OSError, TypeError, ValueError):
        pass
    return "?"


def hit(
    kind: str,
    path: Any = None,
    *,
    fd: int | None = None,
    dir_fd: int | None = None,
    path2: Any = None,
) -> None:
    """Count one call of ``kind``; raise the injected OSError if this is the call to fail."""
    if not active:
        return
    if fd is not None and fd <= 2 and path is None:
        return  # the standard streams
    where = _where(path, fd, dir_fd)
    if where.startswith(_SKIP) or where == _count_file:
        return
    with _lock:
        _counts[kind] += 1
        n = _counts[kind]
        fail = kind == _kind and (n == _nth or (_sticky and n > _nth))
        _log(("!" if fail else "") + kind + "\t" + where + "\n")
    if fail:
        fname = None if path is None or isinstance(path, int) else path
        raise OSError(_errno, os.strerror(_errno), fname, None, path2)


def _log(line: str) -> None:
    global _log_fd
    if not _count_file:
        return
    if _log_fd < 0:
        _log_fd = _os_open(
            _count_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
        )
    _os_write(_log_fd, line.encode("utf-8", "surrogateescape"))


# ---- the wrappers ---------------------------------------------------------------------------


def _path_call(kind: str, fn: Any, *, two: bool = False) -> Any:
    def wrapper(*args: Any, **kw: Any) -> Any:
        if args and not isinstance(args[0], int):
            dir_fd = kw.get("src_dir_fd", kw.get("dir_fd"))
            hit(kind, args[0], dir_fd=dir_fd, path2=args[1] if two and len(args) > 1 else None)
        elif args:
            hit(kind, fd=args[0])
        return fn(*args, **kw)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__name__ = fn.__name__
    return wrapper


def _symlink(fn: Any) -> Any:
    def wrapper(src: Any, dst: Any, *args: Any, **kw: Any) -> Any:
        hit("link", dst, dir_fd=kw.get("dir_fd"))
        return fn(src, dst, *args, **kw)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__name__ = fn.__name__
    return wrapper


def _fd_call(kind: str, fn: Any) -> Any:
    def wrapper(fd: Any, *args: Any, **kw: Any) -> Any:
        hit(kind, fd=fd if isinstance(fd, int) else fd.fileno())
        return fn(fd, *args, **kw)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__name__ = fn.__name__
    return wrapper


class _Writable:
    """A file object from ``open()`` whose ``write`` calls are counted (kind ``write``)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> Any:
        hit("write", fd=self._f.fileno())
        return self._f.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _Writable:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _wrap_open(fn: Any) -> Any:
    def wrapper(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if not isinstance(file, int):
            hit("open", file)
        f = fn(file, mode, *args, **kw)
        if any(c in mode for c in "wax+") and not isinstance(file, int):
            return _Writable(f)
        return f

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


_installed = False


def install() -> None:
    """Wrap the OS calls, once, if a fault or a count was asked for."""
    global _installed
    if not active or _installed:
        return
    _installed = True
    # shutil decides at import whether its rmtree can use dir fds (by membership of os.open in
    # os.supports_dir_fd): import it first, and list the wrappers where the originals are.
    import pathlib  # noqa: F401
    import shutil  # noqa: F401
    import tempfile  # noqa: F401

    table: list[tuple[Any, str, Any]] = [
        (os, "open", _path_call("open", os.open)),
        (os, "write", _fd_call("write", os.write)),
        (os, "pwrite", _fd_call("write", os.pwrite)),
        (os, "fsync", _fd_call("fsync", os.fsync)),
        (os, "fdatasync", _fd_call("fsync", os.fdatasync)),
        (os, "rename", _path_call("rename", os.rename, two=True)),
        (os, "replace", _path_call("rename", os.replace, two=True)),
        (os, "link", _path_call("link", os.link, two=True)),
        (os, "symlink", _symlink(os.symlink)),
        (fcntl, "ioctl", _fd_call("ioctl", fcntl.ioctl)),
        (os, "unlink", _path_call("unlink", os.unlink)),
        (os, "remove", _path_call("unlink", os.remove)),
        (os, "rmdir", _path_call("unlink", os.rmdir)),
        (os, "mkdir", _path_call("mkdir", os.mkdir)),
        (os, "ftruncate", _fd_call("truncate", os.ftruncate)),
        (os, "posix_fallocate", _fd_call("truncate", os.posix_fallocate)),
        (os, "chmod", _path_call("chmod", os.chmod)),
        (os, "fchmod", _fd_call("chmod", os.fchmod)),
    ]
    for module, name, wrapper in table:
        orig = getattr(module, name)
        for s in (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks):
            if orig in s:
                s.add(wrapper)
        setattr(module, name, wrapper)
    opener = _wrap_open(io.open)
    builtins.open = opener
    io.open = opener


install()
