"""Spend controls: holds and lots (the billing function), spend limits (the orgs function).

Every rule is the database's (``..003300``-``..003320``): who may hold, capture, release or set a limit, what
is available, what a limit allows. A spend limit refusal is *returned* by its RPC (it commits the
``spend_limit_reached`` event it recorded) and answered here as the 402 it is.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from ..context import explicit_org
from ..errors import ApiError, refusal
from ..models import (
    CaptureIn,
    Hold,
    HoldIn,
    HoldsQuery,
    InsufficientCredits,
    LotsQuery,
    ReleaseIn,
    SpendLimitIn,
    SpendLimitReached,
)
from ..routing import Ctx, Router
from ..session import Session
from .billing import idempotency_key

billing = Router("billing")
orgs = Router("orgs")
ORG_ERRORS = (400, 401, 403, 404)


def _hold(ctx: Ctx, result: dict[str, Any]) -> dict[str, Any] | ApiError:
    ctx.note_org(result.get("org_id"))
    return refusal(result) or result


@billing.route("POST", "/credits/holds", status=201, response=Hold,
               summary="Reserve credits before a call whose cost is known afterwards (capture or release it later)",
               errors=(400, 401, 402, 403, 409),
               error_models={402: SpendLimitReached})
def create_hold(ctx: Ctx, body: HoldIn, db: Session) -> dict[str, Any] | ApiError:
    result = db.call_dict("hold_credits", amount=body.amount, reason=body.reason, ttl_seconds=body.ttl_seconds,
                          org=explicit_org(ctx, body.org_id),
                          idempotency_key=idempotency_key(ctx, body.idempotency_key), metadata=body.metadata)
    return _hold(ctx, result)


@billing.route("POST", "/credits/holds/{hold_id}/capture", response=Hold,
               summary="Charge a hold (at most what it holds) and release the rest", errors=(400, 401, 402, 404, 409),
               error_models={402: InsufficientCredits})
def capture_hold(ctx: Ctx, hold_id: UUID, body: CaptureIn, db: Session) -> dict[str, Any] | ApiError:
    return _hold(ctx, db.call_dict("capture_hold", hold_id=hold_id, amount=body.amount))


@billing.route("POST", "/credits/holds/{hold_id}/release", response=Hold,
               summary="Release all of a hold", errors=(400, 401, 404, 409))
def release_hold(ctx: Ctx, hold_id: UUID, body: ReleaseIn, db: Session) -> dict[str, Any] | ApiError:
    return _hold(ctx, db.call_dict("release_hold", hold_id=hold_id))


@billing.route("GET", "/credits/holds", summary="Holds (admins and viewers: the org's; others: their own)",
               errors=(400, 401, 403))
def list_holds(ctx: Ctx, query: HoldsQuery, db: Session) -> object:
    return db.call("list_credit_holds", org=explicit_org(ctx, query.org_id), status=query.status or None)


@billing.route("GET", "/api/credits/lots",
               summary="Credit lots in burn order, with expiring_soon (credits that expire within 7 days)",
               errors=(400, 401, 403))
def list_lots(ctx: Ctx, query: LotsQuery, db: Session) -> object:
    return db.call("list_credit_lots", org=explicit_org(ctx, query.org_id), include_spent=query.include_spent)


@orgs.route("GET", "/api/orgs/{org}/spend-limits",
            summary="Spend limits with used and resets_at (admins and viewers: all; members: their own)",
            errors=ORG_ERRORS)
def list_spend_limits(org: str, db: Session) -> object:
    return db.call("list_spend_limits", org=org)


@orgs.route("PUT", "/api/orgs/{org}/spend-limits/{subject}",
            summary="Set a spend limit (admin): member:<user_id>, key:<key_id>, default:member or default:key",
            errors=ORG_ERRORS)
def set_spend_limit(org: str, subject: str, body: SpendLimitIn, db: Session) -> object:
    return db.call("set_spend_limit", org=org, subject=subject, credits=body.credits, period=body.period)


@orgs.route("DELETE", "/api/orgs/{org}/spend-limits/{subject}", summary="Remove a spend limit (admin)",
            errors=ORG_ERRORS)
def delete_spend_limit(org: str, subject: str, db: Session) -> object:
    return db.call("delete_spend_limit", org=org, subject=subject)
