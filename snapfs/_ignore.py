"""Ignore rules: ``.snapfsignore`` at the project root, in gitignore syntax.

``.snapfs/`` itself is always ignored, at any depth (a nested project's state is its own). An ignored path is neither snapshotted nor deleted or
reverted by a restore.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ._errors import UsageError
from ._hashing import Oid, hash_bytes

IGNORE_FILE = ".snapfsignore"
STATE_DIR = b".snapfs"


class Ignore:
    def __init__(self, lines: list[str]) -> None:
        self._lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._spec: Any = None
        # Names what the rules are, for caches of results that depend on them.
        self.fingerprint: Oid = hash_bytes(
            "\n".join(["snapfs-ignore-1", *lines]).encode("utf-8", "surrogateescape")
        )
        if not self._lines:
            return
        import pathspec  # only when there are rules: it is slow to import

        try:
            self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
        except (ValueError, TypeError, re.error) as exc:  # re.error: a bad [range]
            raise UsageError(f"{IGNORE_FILE} has a pattern snapfs can't read: {exc}.") from exc

    @classmethod
    def load(cls, root: Path) -> Ignore:
        try:
            text = (root / IGNORE_FILE).read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return cls([])
        except IsADirectoryError:
            raise UsageError(f"{IGNORE_FILE} must be a file, not a directory.") from None
        return cls(text.splitlines())

    def __bool__(self) -> bool:
        return self._spec is not None

    def __call__(self, relpath: bytes) -> bool:
        """Is this project-relative path ignored? Directories are passed with a trailing slash."""
        if STATE_DIR in relpath.split(b"/"):
            return True  # snapfs state, this project's or a nested project's
        if self._spec is None:
            return False
        return bool(self._spec.match_file(os.fsdecode(relpath)))
