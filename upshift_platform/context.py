"""The org context of a request, resolved once: explicit org → the key's org → default org → none.

The resolution itself (and the 403 for an org the caller does not belong to) happens in
``public.resolve_org``; this module only picks the explicit value out of the request.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .db import call
from .errors import ApiError
from .http import Ctx

ORG_HEADER = "X-Upshift-Org"


def explicit_org(ctx: Ctx, body_org: str | None = None) -> str | None:
    header = (ctx.request.headers.get(ORG_HEADER) or "").strip() or None
    body_org = (body_org or "").strip() or None
    if header and body_org and header != body_org:
        raise ApiError(400, "conflicting_org",
                       f"The {ORG_HEADER} header and org_id in the body name different orgs.", field="org_id")
    org = body_org or header
    if org is not None and len(org) > 64:
        raise ApiError(400, "invalid_request", "org_id: at most 64 characters.", field="org_id")
    return org


def resolve(ctx: Ctx, cur: psycopg.Cursor[Any], explicit: str | None) -> dict[str, Any] | None:
    org = call(cur, "resolve_org", org=explicit)
    if org:
        ctx.org_id = str(org["id"])
    return org  # type: ignore[no-any-return]
