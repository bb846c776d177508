"""The recovery panel end to end, in a real headless Chromium (Debian's ``chromium``) driven by
Playwright with the system browser (issue 6).

A host Flask app mounts the panel at /snapfs and shows the status banner on its own home page.
The project's import failed at step 2 of 3 (a 404 from a FaultServer on 127.0.0.1). The test
reads the banner, opens the panel, reads the explanation and its details, applies the "resume"
fix through the confirmation dialog, watches the progress bar reach 100 % and the success
notification, then rolls back to a checkpoint from the timeline and checks the files on disk.
Screenshots of the panel and of the checkpoints page are saved under tests/web/artifacts/ (or
``$SNAPFS_WEB_ARTIFACTS``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, render_template_string

from tests.faultserver import FaultServer, Throttle
from tests.helpers import tree_state
from tests.importkit import sha_of
from tests.web.conftest import DONE, MODEL, WORKFLOW, FailedImport, make_failed_import

# Read at import: the autouse fixture drops SNAPFS_* variables while tests run.
ARTIFACTS = Path(os.environ.get("SNAPFS_WEB_ARTIFACTS") or Path(__file__).parent / "artifacts")
CHROMIUM = (
    os.environ.get("SNAPFS_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or shutil.which("google-chrome")
)

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - .ci/run installs it with the test extra
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(
        sync_playwright is None, reason="playwright is not installed (pip install '.[test]')"
    ),
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium binary (apt-get install chromium; .ci/run does)"
    ),
]

BANNER = "Import of portrait workflow failed at step 2 of 3, 3 fixes available"


@pytest.fixture
def browser() -> Iterator[Browser]:
    # Function scope: Playwright's event loop starts worker threads, which the leak check in
    # conftest wants gone by the end of the test.
    assert sync_playwright is not None and CHROMIUM is not None
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Exception as exc:  # the browser exists but can't start here (no /dev/shm...)
            pytest.skip(reason=f"chromium can't start here: {str(exc).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


class Served:
    def __init__(self, failed: FailedImport, url: str, bp: Any) -> None:
        self.failed = failed
        self.url = url
        self.bp = bp


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The host app on 127.0.0.1 with the panel at /snapfs, over a project whose import
    failed. Everything started here is stopped here (threads are checked by conftest)."""
    from werkzeug.serving import make_server

    web = importlib.import_module("snapfs.web")
    with FaultServer() as srv:
        failed = make_failed_import(tmp_path, srv, blob_size=4 << 20)
        host = Flask("launcher")
        host.config["TRUSTED_HOSTS"] = list(web.LOOPBACK_NAMES)
        bp = web.create_blueprint([failed.root], open_options=failed.options)
        host.register_blueprint(bp, url_prefix="/snapfs")

        @host.get("/")
        def home() -> str:
            return render_template_string(
                "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                "<title>My launcher</title><link rel='icon' href='data:,'></head><body>{{ snapfs_banner() }}"
                "<h1>My launcher</h1></body></html>"
            )

        server = make_server("127.0.0.1", 0, host, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="e2e-server")
        thread.start()
        try:
            yield Served(failed, f"http://127.0.0.1:{server.server_port}", bp)
        finally:
            bp.close()  # ends the event streams so their request threads finish
            server.shutdown()
            thread.join(10)
            server.server_close()
        assert srv.errors == [], srv.errors[0]


@pytest.fixture
def page(browser: Browser, served: Served) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1024, "height": 900})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    try:
        yield pg
    finally:
        context.close()
    # No script error, and nothing the CSP had to refuse (no inline script or style).
    assert problems == [], problems


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    return path


def no_sideways_scroll(page: Page) -> None:
    assert page.viewport_size is not None
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], width


def test_fix_a_failed_import_then_roll_back_from_the_timeline(served: Served, page: Page) -> None:
    failed = served.failed
    root = failed.root
    # The model comes slowly enough to watch: 4 MiB at 1 MiB/s per connection (one request
    # until the server has honoured Range, then parallel ones), about 2 s.
    failed.srv.inject("/portrait.bin", Throttle(1 << 20))

    # 1. The host app's own page shows the banner.
    page.goto(served.url + "/")
    banner = page.locator("#snapfs-banner")
    assert banner.inner_text().strip().startswith("!")
    assert BANNER in banner.inner_text()
    page.get_by_role("link", name="Open the recovery panel").click()
    page.wait_for_url("**/snapfs/#problem-0-op-*")

    # 2. The panel explains the problem in plain language, with details on request.
    problem = page.locator(f"#problem-0-op-{failed.op}")
    assert problem.locator("h3").inner_text() == "Import of portrait workflow failed at step 2 of 3"
    assert "the file is not at that address" in problem.locator(".what").inner_text()
    assert "step 1 is kept" in problem.locator(".state").inner_text()
    detail = problem.locator("pre.detail")
    assert not detail.is_visible()
    problem.get_by_text("Show details").click()
    assert "HTTP 404" in detail.inner_text()
    shot(page, "panel-problem.png")
    page.set_viewport_size({"width": 360, "height": 780})  # readable on a phone
    no_sideways_scroll(page)
    shot(page, "panel-problem-360.png")
    page.set_viewport_size({"width": 1024, "height": 900})

    # 3. Keyboard: Tab reaches the fix; Enter opens the confirmation; Escape cancels it.
    resume = problem.get_by_role("button", name="Resume where it stopped")
    for _ in range(30):
        page.keyboard.press("Tab")
        if resume.evaluate("b => b === document.activeElement"):
            break
    else:
        raise AssertionError("Tab never reached the resume button")
    page.keyboard.press("Enter")
    dialog = page.locator("#snapfs-confirm")
    dialog.wait_for(state="visible")
    assert "Nothing is lost" in dialog.inner_text()
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert served.bp.panel.jobs.all() == []  # cancelled: nothing ran

    # 4. Apply the fix: confirm, watch the bar reach 100 %, read the notification.
    resume.click()
    dialog.wait_for(state="visible")
    assert "Steps already done are checked, not redone" in dialog.inner_text()
    dialog.get_by_role("button", name="Resume where it stopped").click()
    bar = page.locator("#snapfs-jobs progress").first
    bar.wait_for(state="visible")
    seen: list[float] = []
    for _ in range(600):
        value = bar.evaluate("p => p.hasAttribute('value') ? p.value : -1")
        if value >= 0 and (not seen or value != seen[-1]):
            seen.append(value)
        if value == 100:
            break
        page.wait_for_timeout(50)
    assert seen and seen[-1] == 100, seen
    assert seen == sorted(seen), seen  # progress never moves backwards
    assert any(33 < v < 66 for v in seen), seen  # it moved with the download's bytes
    assert page.locator("#snapfs-jobs .pct").first.inner_text() == "100%"
    toast = page.locator(".toast-ok")
    toast.wait_for(state="visible", timeout=30_000)
    assert toast.get_attribute("role") == "status"
    assert toast.locator("p").inner_text() == (
        "Import of portrait workflow finished: 2 step(s) run, 1 already done."
    )
    page.locator("#snapfs-banner.snapfs-banner--ok").wait_for()
    assert "No problems" in page.locator("#snapfs-banner").inner_text()
    assert page.locator(".problem").count() == 0
    assert sha_of(root / MODEL) == failed.blob.sha256
    assert (root / WORKFLOW).exists() and (root / DONE).read_text() == "ok\n"
    shot(page, "panel-fixed.png")

    # 5. The checkpoints timeline: preview a rollback, then do it.
    page.get_by_role("navigation", name="Panel").get_by_role("link", name="Checkpoints").click()
    page.wait_for_url("**/snapfs/projects/0/checkpoints")
    item = page.locator(f"#snap-{failed.initial}")
    assert "fresh install" in item.inner_text() and "Saved by you" in item.inner_text()
    item.get_by_role("button", name="What would change?").click()
    preview = page.locator(f"#preview-{failed.initial}")
    preview.locator(".paths-delete").wait_for()
    assert MODEL in preview.inner_text() and WORKFLOW in preview.inner_text()
    assert "pre-restore" in preview.inner_text()
    shot(page, "checkpoints-preview.png")
    item.get_by_role("button", name="Roll back to this").click()
    dialog.wait_for(state="visible")
    dialog.locator(".paths-delete").wait_for()
    text = dialog.inner_text()
    assert "Will be deleted" in text and MODEL in text
    assert "saved first as a pre-restore snapshot" in text
    dialog.get_by_role("button", name=f"Roll back to snapshot {failed.initial}").click()
    done = page.locator(".toast-ok", has_text=f"Rolled back to snapshot {failed.initial}")
    done.wait_for(timeout=30_000)
    assert "(fresh install)" in done.inner_text() and "previous state is saved" in done.inner_text()
    # The timeline is refreshed: the rolled-back-to checkpoint is HEAD now. The state that was
    # left is the import's post checkpoint, the newest: it recorded that state exactly, so no
    # pre-restore snapshot repeats it.
    item.get_by_text("HEAD: last taken or restored").wait_for()
    newest = page.locator(".timeline > li").first
    assert "After an operation" in newest.inner_text()
    assert "after portrait workflow" in newest.inner_text()
    # And on disk the project is exactly as it was at that checkpoint.
    assert tree_state(root) == failed.before
    assert not (root / MODEL).exists()
    shot(page, "checkpoints.png")

    # 6. Readable at 360 px: no sideways scrolling on any page.
    page.set_viewport_size({"width": 360, "height": 780})
    for path, name in (
        ("/snapfs/", None),
        ("/snapfs/projects/0/checkpoints", "checkpoints-360.png"),
        ("/snapfs/projects/0/operations", "operations-360.png"),
    ):
        page.goto(served.url + path)
        no_sideways_scroll(page)
        if name:
            shot(page, name)
