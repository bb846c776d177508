"""Thread pools, imported on first use: concurrent.futures pulls in logging, which most
commands never need."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")


class Pool(Protocol):
    """What callers that only fan work out need of an executor."""

    def map(self, fn: Callable[[T], R], items: Iterable[T], /) -> Iterator[R]: ...


def executor(**kwargs: Any) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(**kwargs)


class LazyPool:
    """A thread pool started by its first ``map``: most restores never need one."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Iterable[T], /) -> Iterator[R]:
        if self._pool is None:
            self._pool = executor(**self._kwargs)
        return self._pool.map(fn, items)

    def shutdown(self) -> None:
        """Wait for the running tasks; the queued ones are dropped (after an error)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
