"""``snapfs ui``: serve the recovery panel (snapfs.web) for one or more projects, on loopback."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from snapfs import UsageError

from .render import safe

if TYPE_CHECKING:
    from . import Ctx


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        import ipaddress  # only `snapfs ui` needs it: kept out of every command's start-up

        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Only loopback unless --i-know-this-is-exposed.",
)
@click.option(
    "--project",
    "projects",
    multiple=True,
    metavar="PATH",
    help="A project to serve (repeatable; default: the current one, or -C PATH).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the panel in a browser.")
@click.option(
    "--i-know-this-is-exposed",
    "exposed",
    is_flag=True,
    help="Allow a non-loopback --host: anyone who can reach it can roll your projects back.",
)
@click.pass_obj
def ui(
    c: Ctx,
    port: int,
    host: str,
    projects: tuple[str, ...],
    open_browser: bool,
    exposed: bool,
) -> None:
    """Serve the recovery panel: problems and fixes, checkpoints, operations, live progress."""
    loopback = is_loopback(host)
    if not loopback and not exposed:
        raise UsageError(
            f"Refusing to serve on {host}: anyone who can reach it could roll back or change "
            "your projects.",
            hint="Use the default 127.0.0.1, or add --i-know-this-is-exposed.",
        )
    from werkzeug.serving import make_server

    from snapfs.web import LOOPBACK_NAMES, create_app

    paths = list(projects) or [c.path or "."]
    open_options: dict[str, Any] = {"env": dict(os.environ)}
    if c.store:
        open_options["store"] = c.store
    app = create_app(
        paths,
        open_options=open_options,
        trusted_hosts=LOOPBACK_NAMES if loopback else None,
    )
    bp = app.extensions["snapfs"]
    if not loopback:
        click.echo(
            f"WARNING: serving on {host}, which is not loopback. Anyone who can reach this "
            "address can roll back your projects; the CSRF token only protects browsers.",
            err=True,
        )
    if not c.debug:  # one line per request is noise for a person running the panel
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"
    for ref in bp.panel.registry:
        click.echo(safe(f"Project {ref.id}: {ref.root}"), err=True)
    click.echo(f"snapfs recovery panel: {url}  (Ctrl-C stops)", err=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(0.3, webbrowser.open, args=(url,)).start()
    try:
        server.serve_forever()  # Werkzeug's returns on Ctrl-C (and SIGTERM, via the CLI)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("Stopping the panel.", err=True)
        bp.close()  # ends the event streams, waits for running jobs
        server.server_close()
