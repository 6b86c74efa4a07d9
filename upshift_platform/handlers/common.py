"""Routes every function serves: health and the OpenAPI document. Both are public."""

from __future__ import annotations

from typing import Any

from ..db import CONNECT_TIMEOUT_S, RETRY_AFTER_S
from ..errors import ApiError
from ..openapi import document
from ..routing import Ctx, Router

router = Router("common")


@router.route("GET", "/health", summary="Readiness: is the database reachable (from the monitor, no query)",
              errors=(503,))
def health(ctx: Ctx) -> dict[str, str]:
    """Answered from the database monitor's last probe (``db.Monitor``), never by waiting on the database;
    only a process's very first call waits for the first probe (up to the connect timeout)."""
    if ctx.platform.db.health(wait=CONNECT_TIMEOUT_S) != "up":
        raise ApiError(503, "database_unavailable", "The database is unreachable.",
                       status="degraded", database="down", retry_after=RETRY_AFTER_S)
    return {"status": "ok", "database": "ok"}


@router.route("GET", "/health/live", summary="Liveness: the process is serving (whatever the database's state)")
def live() -> dict[str, str]:
    return {"status": "ok"}


@router.route("GET", "/openapi.json", summary="This API's OpenAPI 3.1 description")
def openapi(ctx: Ctx) -> dict[str, Any]:
    return document(ctx.platform.routers, ctx.platform.settings.public_base_url)
