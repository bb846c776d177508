"""Thread pools, imported on first use: concurrent.futures pulls in logging, which most
commands never need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


def executor(**kwargs: Any) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(**kwargs)
