"""snapfs.web: the recovery panel and its HTTP API, as a Flask blueprint (see docs/web.md).

Mount it in a host app::

    from flask import Flask
    from snapfs.web import create_blueprint

    app = Flask(__name__)
    panel = create_blueprint(["/srv/comfyui"])          # project ids: "0", "1", ...
    app.register_blueprint(panel, url_prefix="/snapfs")
    ...                                                 # on shutdown: panel.close()

or serve it alone with ``snapfs ui`` (:func:`create_app` plus a loopback-only server).
Any template of the host app can show the status banner with ``{{ snapfs_banner() }}``.

Layers, pointing down: ``_api`` and ``_pages`` (routes) use ``_panel`` (state, security
hooks, error replies), which uses ``_jobs`` (background jobs, the event feed), ``_actions``
(the mutating library calls) and ``_inspect`` (what is read from a project).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flask import Flask

from ._panel import Panel, SnapfsBlueprint, build_blueprint
from ._registry import ProjectRef, ProjectsArg, UnknownProject

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def create_blueprint(
    projects: ProjectsArg,
    *,
    name: str = "snapfs",
    open_options: Mapping[str, Any] | None = None,
    allowed_origins: Iterable[str] = (),
    title: str = "snapfs recovery",
) -> SnapfsBlueprint:
    """The panel as a blueprint for ``projects``: a list of project folders (ids "0", "1", ...)
    or a mapping of id -> folder. ``open_options`` are passed to every ``snapfs.open`` (store,
    env, config overrides). ``allowed_origins`` lists other origins (``https://host:port``)
    allowed to make changes, for a host app behind a proxy that rewrites Host.

    Call ``close()`` on the result when the server stops: it waits for running jobs and ends
    the event streams.
    """
    panel = Panel(projects, open_options=open_options, allowed_origins=allowed_origins, title=title)
    return build_blueprint(panel, name)


def create_app(
    projects: ProjectsArg,
    *,
    open_options: Mapping[str, Any] | None = None,
    trusted_hosts: Iterable[str] | None = LOOPBACK_NAMES,
    title: str = "snapfs recovery",
) -> Flask:
    """A Flask app serving only the panel, at ``/``. ``trusted_hosts`` (default: loopback
    names) are the only Host headers answered, which defeats DNS rebinding; None allows any.
    ``app.extensions["snapfs"]`` is the blueprint: close it on shutdown."""
    app = Flask(__name__, static_folder=None)
    if trusted_hosts is not None:
        app.config["TRUSTED_HOSTS"] = list(trusted_hosts)
    bp = create_blueprint(projects, open_options=open_options, title=title)
    app.register_blueprint(bp)
    app.extensions["snapfs"] = bp
    return app


__all__ = [
    "LOOPBACK_NAMES",
    "Panel",
    "ProjectRef",
    "SnapfsBlueprint",
    "UnknownProject",
    "create_app",
    "create_blueprint",
]
