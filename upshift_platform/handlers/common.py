"""Routes every function serves: health and the OpenAPI document. Both are public."""

from __future__ import annotations

from typing import Any

from ..errors import ApiError
from ..openapi import document
from ..routing import Ctx, Router

router = Router("common")


@router.route("GET", "/health", summary="Liveness and database reachability", errors=(503,))
def health(ctx: Ctx) -> dict[str, str]:
    try:
        ctx.platform.db.ping()
    except Exception as exc:  # psycopg errors, pool timeouts, OS errors: all mean "unreachable" here
        raise ApiError(503, "database_unavailable", f"The database is unreachable ({type(exc).__name__}).",
                       status="degraded", database="unreachable") from None
    return {"status": "ok", "database": "ok"}


@router.route("GET", "/openapi.json", summary="This API's OpenAPI 3.1 description")
def openapi(ctx: Ctx) -> dict[str, Any]:
    return document(ctx.platform.routers, ctx.platform.settings.public_base_url)
