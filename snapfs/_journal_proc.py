"""A change journal in a helper process, for operations that run in the caller's own process.

The journal's threads (watchdog's inotify reader and handler, its move grouper, our emitter and
the SQLite writer) hold Python's GIL for every event they pass on. In the process of an operation
that writes files itself (``with snapfs.transaction(p): write_files()``), they take turns with
it: each of its system calls gives the GIL up, and getting it back waits for a journal thread.
Writing 2,000 small files took 0.6 s under an in-process journal instead of 0.17 s; with the same
journal in another process, 0.19 s.

:class:`ProcessJournal` is a :class:`~snapfs._journal.Journal` whose watching is done by a child
(``python -m snapfs._journal_proc``) running an ordinary ``Journal`` with the same run id, writing
to the same database. The parent keeps the queries (``touched``, ``events``), which read SQLite,
and asks the child for ``start``, ``mark`` and ``stop`` over a pipe, one JSON line each way. A
mark still means what it means in-process: every event the kernel queued before it is recorded
with a smaller seq.

The child watches only while the parent lives: when the parent dies (even by SIGKILL) its end of
the pipe closes, and the child stops its journal, removes its marker file and exits. It ignores
Ctrl-C, which the terminal sends to both: the parent's rollback still needs a last mark. A child
that dies, hangs or can't be started makes the journal unavailable, and snapfs compares the whole
folder instead, as with any journal that can't vouch for what it saw.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._journal import Journal, JournalUnavailable

# The child's start: a Python interpreter, watchdog's import and the first mark.
START_SLACK_SECONDS = 30.0
# Beyond a mark's own timeout (which the child enforces), for the reply to reach us.
REPLY_SLACK_SECONDS = 5.0
_HINT = "snapfs compares the whole folder instead."
_MODULE = "snapfs._journal_proc"  # (run as a program, __name__ is "__main__")


class HelperFailed(JournalUnavailable):
    """The helper process could not be started, died or stopped answering (the journal itself
    did not report a problem): a journal in this process's threads may still work."""


def start_journal(
    root: Path,
    db: Path,
    *,
    owner: str,
    on_modified: Callable[[bytes], None] | None,
    helper: bool,
) -> tuple[Journal, int]:
    """Start a journal of one's own, in a helper process if ``helper`` and one can be started,
    else in this process's threads. Returns it with its first mark."""
    if helper:
        pj = ProcessJournal(root, db, owner=owner, on_modified=on_modified)
        try:
            return pj, pj.start()
        except HelperFailed:
            pj.stop()  # and try threads
        except BaseException:
            pj.stop()
            raise
    journal = Journal(root, db, owner=owner, on_modified=on_modified)
    return journal, journal.start()


class ProcessJournal(Journal):
    """A :class:`Journal` that watches from a helper process; same interface, same rows.

    ``on_modified`` is called with the relpath of every file written in place, as in-process,
    but from the thread that calls :meth:`mark` or :meth:`stop`, for what they saw.
    """

    def __init__(
        self,
        root: Path,
        db: Path,
        *,
        owner: str = "",
        on_modified: Callable[[bytes], None] | None = None,
    ) -> None:
        super().__init__(root, db, owner=owner)
        self._notify = on_modified
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._notified = 0  # rows up to this seq were passed to on_modified

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> int:
        """Start the helper, which starts watching; return its first mark's seq."""
        if self._proc is not None:
            return self.mark(timeout)
        if not os.path.isdir(self._root):
            raise JournalUnavailable(
                f"snapfs can't watch {self._root} for changes: it is not a folder (or is gone)."
            )
        args = [self._root, os.fspath(self._db_path), self.run, self.owner, f"{timeout:g}"]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", _MODULE, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                env=_child_env(),
            )
        except (OSError, ValueError) as exc:
            raise HelperFailed(
                f"snapfs can't start its change journal's helper process ({exc}).", hint=_HINT
            ) from exc
        try:
            seq = self._reply(time.monotonic() + timeout + START_SLACK_SECONDS)
        except BaseException:
            self._kill()
            raise
        self._running = True
        self._notified = seq
        return seq

    def stop(self) -> None:
        """Stop the helper (it records what is still queued) and wait for it. Idempotent."""
        self._running = False
        proc = self._proc
        if proc is not None:
            try:
                self._send("stop")
                self._reply(time.monotonic() + REPLY_SLACK_SECONDS + 5.0)
            except JournalUnavailable:
                pass  # dead or hung: killed below; what it committed stands
            finally:
                self._kill()
            try:
                self._deliver(None)
            except Exception:  # the database is the parent's; a failure here loses only warnings
                pass
        super().stop()  # the parent's query connection; the marker file, if the child died

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ---- marks --------------------------------------------------------------------------
    def mark(self, timeout: float = 5.0) -> int:
        """Ask the helper for a mark; see :meth:`Journal.mark`."""
        with self._mark_lock:
            if self._proc is None or not self._running:
                raise JournalUnavailable("The change journal is not running.")
            self._send(f"mark {timeout:g}")
            seq = self._reply(time.monotonic() + timeout + REPLY_SLACK_SECONDS)
            self._deliver(seq)
            return seq

    def _deliver(self, until: int | None) -> None:
        """Pass the files written in place since the last delivery to ``on_modified``."""
        if self._notify is None:
            return
        hi = until if until is not None else 1 << 62
        rows = self._query(
            "SELECT DISTINCT relpath FROM journal WHERE run = ? AND seq > ? AND seq < ?"
            " AND kind = 'modified' AND is_dir = 0 ORDER BY relpath",
            (self.run, self._notified, hi),
        )
        if until is not None:
            self._notified = until
        for (relpath,) in rows:
            self._notify(bytes(relpath))

    # ---- the pipe -----------------------------------------------------------------------
    def _send(self, line: str) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (OSError, ValueError) as exc:  # EPIPE: it died
            raise self._died() from exc

    def _reply(self, deadline: float) -> int:
        """The helper's next answer: a seq, or the error it reports (raised here)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()  # its marks can't be trusted now; what it committed stands
                raise HelperFailed(
                    "The change journal's helper process stopped answering.", hint=_HINT
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise self._died()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg: dict[str, Any] = json.loads(line)
            if "error" not in msg:
                return int(msg["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            proc.kill()
            raise HelperFailed(
                f"The change journal's helper process answered {line[:80]!r}.", hint=_HINT
            ) from exc
        raise JournalUnavailable(str(msg["error"]), hint=msg.get("hint"))

    def _died(self) -> HelperFailed:
        proc = self._proc
        code = None
        if proc is not None:  # its pipe closed: it is exiting, if not gone yet
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        how = f" (exit status {code})" if code is not None and code >= 0 else ""
        if code is not None and code < 0:
            how = f" (killed by signal {-code})"
        return HelperFailed(
            f"The change journal's helper process ended unexpectedly{how}.", hint=_HINT
        )


def _child_env() -> dict[str, str]:
    """The environment, with this snapfs first on the path: the child must run the same code."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = here + (os.pathsep + path if path else "")
    return env


def main(argv: list[str]) -> int:
    """The helper: watch, answer ``mark``/``stop`` on stdin; stop when stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if len(argv) != 5:
        print(f"usage: python -m {_MODULE} ROOT DB RUN OWNER TIMEOUT", file=sys.stderr)
        return 2
    root, db, run, owner, timeout = argv
    out = sys.stdout.buffer

    def reply(**msg: Any) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    def failed(exc: JournalUnavailable) -> None:
        reply(error=exc.message, hint=exc.hint)

    journal = Journal(Path(root), Path(db), owner=owner, run=run)
    try:
        try:
            reply(seq=journal.start(float(timeout)))
        except JournalUnavailable as exc:
            failed(exc)
            return 0
        for line in sys.stdin.buffer:  # ends at EOF: the parent is gone
            cmd, _, arg = line.decode().strip().partition(" ")
            if cmd == "mark":
                try:
                    reply(seq=journal.mark(float(arg)))
                except JournalUnavailable as exc:
                    failed(exc)
            else:  # "stop"
                break
    finally:
        journal.stop()
    try:
        reply(seq=0)
    except OSError:
        pass  # the parent is gone
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # Its journal has stopped and said so: skip the interpreter's teardown (~30 ms of module
    # cleanup), which the parent's stop() would otherwise wait for.
    os._exit(code)
