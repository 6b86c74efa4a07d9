"""The web console's files: ``/console`` (the page), ``/console/<file>`` (its scripts, styles and
vendored libraries, shipped in ``upshift_platform/console/``), ``/console/config.json`` (which
sign-in methods this deployment offers) and ``/`` (a redirect to ``/console``).

Nothing here depends on the HTTP framework: ``answer(method, path, settings)`` returns a ``Static``
(status, headers, body) for a path the console owns, or None for every other path, which the API's
router then answers. Every answer carries a strict Content-Security-Policy: scripts and styles
only from this origin, no inline script or style, no eval, Trusted Types (so the console cannot
write HTML from strings), nothing framed, and ``connect-src`` limited to this origin plus the
Supabase project when Supabase Auth is configured. The console talks only to the public API with
the caller's own credential, so every rule stays in the database.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .settings import Settings

CONSOLE_DIR = Path(__file__).with_name("console")
PREFIX = "/console"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}
_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")  # no "..", no hidden files
# The one Trusted Types policy the console creates (js/vendor.js): it turns only the vendored
# libraries' fixed URLs into script URLs. Any other HTML or script sink refuses a plain string.
TRUSTED_TYPES_POLICY = "upshift-console"


@dataclass(frozen=True)
class Static:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def supabase_origin(settings: Settings) -> str | None:
    """The Supabase project's origin when both SUPABASE_URL and SUPABASE_ANON_KEY are set (and the URL is http(s))."""
    if not settings.supabase_url or not settings.supabase_anon_key:
        return None
    parts = urlsplit(settings.supabase_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(settings: Settings) -> str:
    connect = " ".join(filter(None, ("'self'", supabase_origin(settings))))
    return "; ".join((
        "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "font-src 'self'",
        f"connect-src {connect}", "manifest-src 'self'", "base-uri 'none'", "form-action 'self'",
        "frame-ancestors 'none'", "require-trusted-types-for 'script'", f"trusted-types {TRUSTED_TYPES_POLICY}",
    ))


def security_headers(settings: Settings) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", content_security_policy(settings)),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()"),
        ("Cache-Control", "no-cache"),
    ]


def config(settings: Settings) -> dict[str, object]:
    """What the console needs to know about this deployment; nothing secret (the anon key is public by design)."""
    origin = supabase_origin(settings)
    return {
        "supabase": {"url": settings.supabase_url, "anon_key": settings.supabase_anon_key} if origin else None,
        "checkout": bool(settings.stripe.secret_key),  # Stripe Checkout configured: buy and subscribe buttons
        "packs": settings.stripe.pack_credits,  # credits per pack, for the buttons' labels
    }


def _file(relative: str) -> Path | None:
    if not _FILE.match(relative):
        return None
    path = CONSOLE_DIR / relative
    if path.suffix not in CONTENT_TYPES or not path.is_file():
        return None
    return path


def answer(method: str, path: str, settings: Settings) -> Static | None:
    """The console's answer for ``path``, or None when the path is not the console's."""
    if path != "/" and path != PREFIX and not path.startswith(PREFIX + "/"):
        return None
    if method not in ("GET", "HEAD"):
        return None  # the API router answers (405/404, as JSON)
    headers = security_headers(settings)
    if path == "/":
        return Static(302, [*headers, ("Location", PREFIX)])
    relative = path[len(PREFIX):].lstrip("/")
    if relative in ("", "index.html"):
        file: Path | None = CONSOLE_DIR / "index.html"
    elif relative == "config.json":
        body = json.dumps(config(settings)).encode()
        return Static(200, [*headers, ("Content-Type", "application/json")], body)
    else:
        file = _file(relative)
    if file is None:
        return Static(404, [*headers, ("Content-Type", "text/plain; charset=utf-8")], b"Not found.\n")
    # A HEAD answer keeps the body's headers; the server sends no body for it.
    return Static(200, [*headers, ("Content-Type", CONTENT_TYPES[file.suffix])], file.read_bytes())
