"""CSRF tokens, same-origin checks and response headers for the panel.

* **CSRF.** Each browser session gets a random id in an HttpOnly, SameSite=Strict cookie; its
  token is an HMAC of that id under a key made when the panel starts (so restarting the server
  invalidates old tokens, and the token can't be derived without the key). Pages carry the
  token in a ``<meta>`` tag; every mutating request must send it back in ``X-CSRF-Token``.
  This needs nothing from the host app (no secret key, no session interface).
* **Origin.** A mutating request whose ``Sec-Fetch-Site`` is cross-site or same-site, or
  whose ``Origin`` (else ``Referer``) is not the server's own origin, is refused, token or not.
* **Headers.** A CSP without inline script or style, framing by the same origin only, no
  sniffing, and ``no-store`` on everything but static files.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from flask import Request, Response

COOKIE = "snapfs_sid"
HEADER = "X-CSRF-Token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'self'"
)


class Csrf:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(24)

    def token(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def check(self, sid: str | None, token: str | None) -> bool:
        if not sid or not token:
            return False
        return hmac.compare_digest(self.token(sid), token)


def own_origin(request: Request) -> str:
    return f"{request.scheme}://{request.host}".lower()


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def cross_origin(request: Request, allowed: frozenset[str] = frozenset()) -> str | None:
    """Why a mutating request must be refused as coming from another site, or None."""
    ok = {own_origin(request), *allowed}
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return f"Refused a request from another site (Sec-Fetch-Site: {site[:20]})."
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin.lower() not in ok:
            return "Refused a request from another origin."
        return None
    referer = request.headers.get("Referer")
    if referer:
        if _origin_of(referer) not in ok:
            return "Refused a request referred by another origin."
    return None


def secure_headers(response: Response, *, cache: bool) -> Response:
    h = response.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Frame-Options", "SAMEORIGIN")
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    h.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if not cache:
        h["Cache-Control"] = "no-store"
    return response
