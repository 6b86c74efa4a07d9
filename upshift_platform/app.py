"""The platform object (settings, database pool, authenticator) and its HTTP entry points.

Each deployable function is a ``Router``; ``functions/main.py`` exposes one
functions-framework target per router. ``create_wsgi_app`` serves them all on one port,
routing by path exactly as the deployed functions' URLs would.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from . import console_routes
from .auth import Authenticator
from .db import Database
from .errors import ApiError
from .handlers import audit, billing, common, orgs, webhook
from .http import MAX_BODY_BYTES, error_response
from .routing import Router
from .settings import Settings, get_settings

# Which function owns which paths (longest prefix first). Deployed, each function gets its own
# URL; locally the one server sends each path to its owner.
PATH_OWNERS: tuple[tuple[str, str], ...] = (
    ("/stripe/webhook", "stripe_webhook"),
    ("/audit-events", "audit"),
    ("/api/audit-logs", "audit"),
    ("/api/credits/", "billing"),
    ("/credits/", "billing"),
    ("/billing/", "billing"),
    ("/api/", "orgs"),
)
FUNCTIONS = ("billing", "stripe_webhook", "audit", "orgs")


def build_routers() -> dict[str, Router]:
    routers = {name: Router(name) for name in FUNCTIONS}
    for router in routers.values():
        router.include(common.router)
    for handlers in (billing.router, orgs.router, audit.router, webhook.router):
        routers[handlers.name].include(handlers)
    return routers


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(
            settings.database_url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            statement_timeout_ms=settings.statement_timeout_ms,
            pool_timeout_s=settings.pool_timeout_s,
        )
        self.auth = Authenticator(settings)
        self.routers = build_routers()
        self._prices_pending = settings.prices is not None
        self._prices_lock = threading.Lock()

    def apply_prices(self) -> None:
        """UPSHIFT_PRICES, when set, replaces the credit_prices table once per process (before the first request)."""
        if not self._prices_pending:
            return
        with self._prices_lock:
            if self._prices_pending:
                from .db import call

                with self.db.request("service_role") as cur:
                    call(cur, "admin_set_prices", prices=self.settings.prices, replace_all=True)
                self._prices_pending = False

    def function_for(self, path: str) -> str:
        for prefix, name in PATH_OWNERS:
            if path == prefix.rstrip("/") or path.startswith(prefix):
                return name
        return "orgs"

    def handle(self, function: str, request: flask.Request) -> flask.Response:
        if function == "orgs" and (page := console_routes.answer(request.method, request.path, self.settings)):
            return flask.Response(page.body, status=page.status, headers=page.headers)  # the web console
        if self._prices_pending:
            try:
                self.apply_prices()
            except Exception:  # the database may be down: the request answers for itself, and we retry next time
                logging.getLogger("upshift.app").exception("could not apply UPSHIFT_PRICES yet")
        return self.routers[function].handle(self, request)

    def close(self) -> None:
        self.db.close()


_lock = threading.Lock()
_platform: Platform | None = None


def platform() -> Platform:
    """The process-wide platform, built from the environment on first use."""
    global _platform
    if _platform is None:
        with _lock:
            if _platform is None:
                _platform = Platform(get_settings())
    return _platform


def create_wsgi_app(plat: Platform | None = None) -> flask.Flask:
    """All functions on one port (``upshift-platform serve``).

    A Flask app (its test client is what the tests drive) whose WSGI entry skips Flask's own URL map,
    contexts and hooks: every path goes straight to ``Platform.handle``, which routes, answers and
    reports every error as JSON itself. That is a good part of a request's CPU on the hot path.
    """
    app = flask.Flask("upshift_platform")

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        p = plat or platform()
        request = flask.Request(environ)
        # Defence in depth only: the Router enforces MAX_BODY_BYTES itself (Ctx.raw_body), since
        # functions-framework serves the routers from its own Flask app without this setting. One byte
        # of slack, because Werkzeug refuses a stream once it *reaches* this limit, and a body of
        # exactly MAX_BODY_BYTES is allowed.
        request.max_content_length = MAX_BODY_BYTES + 1
        try:
            response = p.handle(p.function_for(request.path), request)
        except Exception as exc:  # the Router maps everything; this is for a request it could not even read
            code = (exc.code or 400) if isinstance(exc, HTTPException) else 500
            if code >= 500:
                logging.getLogger("upshift.request").error("request failed before routing", exc_info=exc)
            response = error_response(ApiError(code, "bad_request" if code < 500 else "internal",
                                               "The request could not be read." if code < 500 else "Unexpected error."))
        return response(environ, start_response)

    app.wsgi_app = dispatch  # type: ignore[method-assign]
    return app
