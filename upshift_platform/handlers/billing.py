"""The billing function: what the upshift CLI calls to spend and inspect credits."""

from __future__ import annotations

from typing import Any

from .. import cursor as keyset
from ..auth import session
from ..context import explicit_org, resolve
from ..db import call
from ..errors import ApiError
from ..http import Ctx, Router
from ..models import BillingStatus, Consume, ConsumeResult, InsufficientCredits, TransactionsQuery

router = Router("billing")


def idempotency_key(ctx: Ctx, body_key: str | None) -> str | None:
    header = (ctx.request.headers.get("Idempotency-Key") or "").strip() or None
    if header and body_key and header != body_key:
        raise ApiError(400, "conflicting_idempotency_key",
                       "The Idempotency-Key header and idempotency_key in the body differ.", field="idempotency_key")
    key = header or body_key
    if key is not None and len(key) > 200:
        raise ApiError(400, "invalid_request", "idempotency_key: at most 200 characters.", field="idempotency_key")
    return key


@router.route("POST", "/credits/consume", body=Consume, response=ConsumeResult,
              summary="Spend credits for an action (the upshift CLI's call)",
              errors=(400, 401, 402, 403, 409), error_models={402: InsufficientCredits})
def consume(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(Consume)
    prices = ctx.platform.settings.prices
    price = prices.get(body.action)
    if price is None:
        known = ", ".join(sorted(prices))
        raise ApiError(400, "unknown_action", f"Unknown action {body.action!r}; known actions: {known}.",
                       field="action", known_actions=sorted(prices))
    if body.count < price:
        raise ApiError(400, "count_below_price",
                       f"{body.action} costs {price} credit(s); count {body.count} is below that.",
                       field="count", price=price)
    key = idempotency_key(ctx, body.idempotency_key)
    with session(ctx) as (_actor, cur):
        org = resolve(ctx, cur, explicit_org(ctx, body.org_id))
        result = call(cur, "debit_credits", amount=body.count, reason=body.action,
                      org=str(org["id"]) if org else None, idempotency_key=key,
                      metadata={"action": body.action, "count": body.count})
    return {k: result[k] for k in ("balance", "source", "org_id", "org_slug", "transaction_id", "replayed")}


@router.route("GET", "/billing/status", response=BillingStatus,
              summary="Tier, the balance the next consume draws from, and the pack bonus", errors=(400, 401, 403))
def status(ctx: Ctx):  # type: ignore[no-untyped-def]
    with session(ctx) as (_actor, cur):
        explicit = explicit_org(ctx, ctx.request.args.get("org_id"))
        result: dict[str, Any] = call(cur, "billing_status", org=explicit)
    if result.get("org"):
        ctx.org_id = str(result["org"]["id"])
    multiplier = ctx.platform.settings.bonus_multiplier if result["tier"] in ("pro", "team") else 1.0
    return {
        "tier": result["tier"],
        "balance": result["balance"],
        "bonusMultiplier": multiplier,
        "source": result["source"],
        "org": result["org"],
        "personal_balance": result["personal_balance"],
    }


@router.route("GET", "/api/credits/transactions", query=TransactionsQuery,
              summary="The credit ledger, newest first, as RLS allows", errors=(400, 401, 403))
def transactions(ctx: Ctx):  # type: ignore[no-untyped-def]
    q = ctx.query(TransactionsQuery)
    after = keyset.decode(q.cursor)
    with session(ctx) as (actor, cur):
        org = resolve(ctx, cur, explicit_org(ctx, q.org_id))
        where = ["t.org_id = %(org)s" if org else "t.org_id is null and t.user_id = %(uid)s"]
        if q.since:
            where.append("t.created_at >= %(since)s")
        if q.until:
            where.append("t.created_at < %(until)s")
        if after:
            where.append("(t.created_at, t.id) < (%(after_ts)s, %(after_id)s)")
        rows = cur.execute(
            "select t.id, t.org_id, t.user_id, t.service_key_id, t.amount, t.balance_after, t.reason,"
            " t.idempotency_key, t.metadata, t.created_at from public.credit_transactions t"
            f" where {' and '.join(where)} order by t.created_at desc, t.id desc limit %(limit)s",
            {"org": org["id"] if org else None, "uid": actor.user_id, "since": q.since, "until": q.until,
             "after_ts": after[0] if after else None, "after_id": after[1] if after else None,
             "limit": q.limit + 1},
        ).fetchall()
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    next_cursor = keyset.encode(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return {"data": rows, "next_cursor": next_cursor}
