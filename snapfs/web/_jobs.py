"""Long actions in background threads, and the event feed that reports them (Server-Sent Events).

A job is one mutating action on one project (resume, rollback, recover...). At most one runs
per project at a time: a second is refused with :class:`Busy`, which the API turns into a 409.
Every change of a job is published on the :class:`Broker` as a numbered event; a client that
reconnects with the last number it saw gets what it missed, or the current state if that has
already scrolled out of the buffer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snapfs._errors import SnapfsError

PUBLISH_EVERY = 0.15  # seconds between progress events of one job (the final one always goes)
KEEP_JOBS = 100


@dataclass(frozen=True)
class Event:
    id: int
    name: str  # job, op, hello, downloads
    data: dict[str, Any]
    project: str | None = None


class Broker:
    """A numbered, bounded history of events, and a way to wait for the next ones."""

    def __init__(self, keep: int = 1000) -> None:
        self._cond = threading.Condition()
        self._events: deque[Event] = deque(maxlen=keep)
        self._next = 1
        self.closed = False

    @property
    def last_id(self) -> int:
        with self._cond:
            return self._next - 1

    def publish(self, name: str, data: dict[str, Any], project: str | None = None) -> Event:
        with self._cond:
            ev = Event(self._next, name, data, project)
            self._next += 1
            self._events.append(ev)
            self._cond.notify_all()
            return ev

    def since(self, last_id: int) -> list[Event] | None:
        """Events after ``last_id``; None if some of them are no longer kept (or the id is
        from another server run), so the client must be sent the current state instead."""
        with self._cond:
            if last_id > self._next - 1:
                return None
            oldest = self._events[0].id if self._events else self._next
            if last_id < oldest - 1:
                return None
            return [e for e in self._events if e.id > last_id]

    def wait(self, last_id: int, timeout: float) -> list[Event] | None:
        """Block until there are events after ``last_id`` (or ``timeout``, or close)."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or self._next - 1 > last_id, timeout)
        return self.since(last_id)

    def close(self) -> None:
        """Wake every waiting stream so it ends; later waits return at once."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Busy(Exception):
    """The project already has a job running in this panel."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"Project {job.project} is busy: {job.title[:1].lower() + job.title[1:]} is still "
            "running. Wait for it to finish, then try again."
        )
        self.job = job


@dataclass
class Job:
    id: int
    project: str
    kind: str  # resume, rollback-op, rollback, restore, recover, resume-download, verify...
    title: str  # "Resume import of portrait workflow"
    started: float = field(default_factory=time.time)
    status: str = "running"  # running, done, failed
    percent: float | None = 0.0  # None: no measure of progress yet (an indeterminate bar)
    message: str = ""
    ended: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)  # the last messages, for "show details"
    op: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "kind": self.kind,
            "title": self.title,
            "status": self.status,
            "percent": None if self.percent is None else round(self.percent, 1),
            "message": self.message,
            "started": self.started,
            "ended": self.ended,
            "result": self.result,
            "error": self.error,
            "log": self.log[-20:],
            "op": self.op,
        }


class JobContext:
    """What a running job uses to report: progress (throttled) and raw events (at once)."""

    def __init__(self, jobs: Jobs, job: Job) -> None:
        self._jobs = jobs
        self.job = job
        self._last = 0.0

    def progress(self, percent: float | None, message: str = "") -> None:
        job = self.job
        with self._jobs.lock:
            if percent is not None:
                percent = max(0.0, min(100.0, percent))
                # Progress only moves forward: a retried step must not make the bar jump back.
                if job.percent is not None:
                    percent = max(percent, job.percent)
            job.percent = percent
            if message and message != job.message:
                job.message = message
                job.log.append(message)
                del job.log[:-50]
        now = time.monotonic()
        if now - self._last >= PUBLISH_EVERY:
            self._last = now
            self._jobs.publish(job)

    def event(self, name: str, data: dict[str, Any]) -> None:
        self._jobs.broker.publish(name, {"job": self.job.id, **data}, self.job.project)


JobFn = Callable[[JobContext], dict[str, Any]]
ErrorFn = Callable[[BaseException], dict[str, Any]]


def default_error(exc: BaseException) -> dict[str, Any]:
    from snapfs._classify import classify

    d = classify(exc)
    message = str(exc) if isinstance(exc, SnapfsError) else d.message
    return {**d.as_dict(), "message": " ".join(message.split())}


class Jobs:
    def __init__(self, broker: Broker, on_error: ErrorFn = default_error) -> None:
        self.broker = broker
        self.lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._running: dict[str, Job] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._next = 1
        self._on_error = on_error
        self._closed = False

    def publish(self, job: Job) -> None:
        with self.lock:
            data = job.to_dict()
        self.broker.publish("job", data, job.project)

    def running_for(self, project: str) -> Job | None:
        with self.lock:
            return self._running.get(project)

    def get(self, job_id: int) -> Job | None:
        with self.lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self.lock:
            return list(self._jobs.values())

    def snapshot(self, job: Job) -> dict[str, Any]:
        with self.lock:
            return job.to_dict()

    def start(
        self, project: str, kind: str, title: str, fn: JobFn, *, op: int | None = None
    ) -> Job:
        with self.lock:
            if self._closed:
                raise RuntimeError("the panel is shutting down")
            busy = self._running.get(project)
            if busy is not None:
                raise Busy(busy)
            job = Job(self._next, project, kind, title, op=op)
            self._next += 1
            self._jobs[job.id] = job
            self._running[project] = job
            for old in sorted(self._jobs)[:-KEEP_JOBS]:
                if self._jobs[old].status != "running":
                    del self._jobs[old]
            thread = threading.Thread(
                target=self._run, args=(job, fn), name=f"snapfs-web-job-{job.id}", daemon=True
            )
            self._threads[job.id] = thread
        self.publish(job)
        thread.start()
        return job

    def _run(self, job: Job, fn: JobFn) -> None:
        ctx = JobContext(self, job)
        try:
            result = fn(ctx)
        except Exception as exc:  # a job reports every failure; it never kills the server
            error = self._on_error(exc)
            with self.lock:
                job.status, job.error = "failed", error
                job.message = str(error.get("message") or "It failed.")
                job.log.append(job.message)
        else:
            with self.lock:
                job.status, job.result, job.percent = "done", result, 100.0
                job.message = str(result.get("message") or "Done.")
                job.log.append(job.message)
        finally:
            with self.lock:
                job.ended = time.time()
                if self._running.get(job.project) is job:
                    del self._running[job.project]
                self._threads.pop(job.id, None)
            self.publish(job)

    def wait(self, job_id: int, timeout: float | None = None) -> Job | None:
        """Block until the job ends (for tests and shutdown)."""
        with self.lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs and wait for the running ones (a restore is crash-safe anyway, but
        finishing it beats leaving work for the next command)."""
        with self.lock:
            self._closed = True
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
