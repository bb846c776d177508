"""The projects a panel serves, by the short ids it was given at start.

A client names a project only by its id ("0", "comfy"), never by a path: the paths are fixed
when the app is made, and nothing a request carries can point the panel at another folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import snapfs
from snapfs._project import Project, find_root

PathLike = str | os.PathLike[str]
ProjectsArg = Sequence[PathLike] | Mapping[str, PathLike]

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UnknownProject(LookupError):
    """A request named a project id the panel was not given."""


@dataclass(frozen=True)
class ProjectRef:
    id: str
    root: Path
    name: str  # the folder's name, for headings

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "root": str(self.root)}


class Registry:
    """Project ids -> folders, and how to open them (the same store/env/config each time)."""

    def __init__(self, projects: ProjectsArg, open_options: Mapping[str, Any] | None = None):
        if isinstance(projects, (str, os.PathLike)):
            raise TypeError("projects must be a list of paths or a mapping of id -> path")
        items: list[tuple[str, PathLike]]
        if isinstance(projects, Mapping):
            items = [(str(k), v) for k, v in projects.items()]
        else:
            items = [(str(i), v) for i, v in enumerate(projects)]
        if not items:
            raise ValueError("the panel needs at least one project")
        self._refs: dict[str, ProjectRef] = {}
        for pid, path in items:
            if not _ID.match(pid):
                raise ValueError(f"project id {pid!r}: use 1-64 letters, digits, '-' or '_'")
            root = find_root(Path(os.fspath(path)))  # NotAProject if it isn't one
            self._refs[pid] = ProjectRef(pid, root, root.name or str(root))
        self.open_options = dict(open_options or {})

    def __iter__(self) -> Iterator[ProjectRef]:
        return iter(self._refs.values())

    def __len__(self) -> int:
        return len(self._refs)

    def get(self, pid: object) -> ProjectRef:
        """The project for an id from a request: a string id, or an int index-like id."""
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise UnknownProject("A project id is a short name or number.")
        ref = self._refs.get(str(pid))
        if ref is None:
            raise UnknownProject(f"There is no project {str(pid)[:64]!r} in this panel.")
        return ref

    @contextmanager
    def open(
        self, ref: ProjectRef, *, writer: bool = False, recover: bool | None = None
    ) -> Iterator[Project]:
        """A fresh Project for one request or job (Project objects are not shared by threads).

        Readers never recover (a GET changes nothing); writers open like a CLI command does, so
        interrupted work is finished first (unless ``recover`` is False), and fail at once
        instead of waiting on a lock.
        """
        opts = dict(self.open_options)
        if writer:
            opts["lock_wait"] = False
        project = snapfs.open(ref.root, recover=writer if recover is None else recover, **opts)
        try:
            yield project
        finally:
            project.close()
