"""Routes every function serves: health."""

from __future__ import annotations

from ..http import Ctx, Router, json_response

router = Router("common")


@router.route("GET", "/health", summary="Liveness and database reachability", auth=False,
              errors=(503,))
def health(ctx: Ctx):  # type: ignore[no-untyped-def]
    try:
        ctx.platform.db.ping()
    except Exception as exc:  # psycopg errors, pool timeouts, OS errors: all mean "unreachable" here
        return json_response(
            {"status": "degraded", "database": "unreachable", "error": "database_unavailable",
             "message": f"The database is unreachable ({type(exc).__name__})."},
            503,
        )
    return {"status": "ok", "database": "ok"}


@router.route("GET", "/openapi.json", summary="This API's OpenAPI 3.1 description", auth=False)
def openapi(ctx: Ctx):  # type: ignore[no-untyped-def]
    from ..openapi import document

    return document(ctx.platform.routers, ctx.platform.settings.public_base_url)
