"""The org context of a request, resolved once: explicit org → the key's org → default org → none.

The resolution itself (and the 403 for an org the caller does not belong to) happens in
``public.resolve_org``; this module only picks the explicit value out of the request: the
``X-Upshift-Org`` header or ``org_id`` in the body, which must agree.
"""

from __future__ import annotations

from typing import Any

from .errors import ApiError
from .models import ORG_REF_MAX_LENGTH
from .routing import Ctx
from .session import Session

ORG_HEADER = "X-Upshift-Org"


def explicit_org(ctx: Ctx, body_org: str | None = None) -> str | None:
    header = ctx.header(ORG_HEADER)
    body_org = (body_org or "").strip() or None
    if header and body_org and header != body_org:
        raise ApiError(400, "conflicting_org",
                       f"The {ORG_HEADER} header and org_id in the body name different orgs.", field="org_id")
    org = body_org or header
    if org is not None and len(org) > ORG_REF_MAX_LENGTH:  # the same rule as models.OrgRef, for the header
        raise ApiError(400, "invalid_request", f"org_id: at most {ORG_REF_MAX_LENGTH} characters.", field="org_id")
    return org


def resolve(ctx: Ctx, db: Session, explicit: str | None) -> dict[str, Any] | None:
    """``public.resolve_org``: the org context as a JSON object (with the caller's role), or None (personal)."""
    org = db.call("resolve_org", org=explicit)
    if not isinstance(org, dict):
        return None
    ctx.note_org(org["id"])
    return org
