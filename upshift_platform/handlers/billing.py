"""The billing function: what the upshift CLI calls to spend and inspect credits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import flask
import psycopg

from .. import cursor as keyset
from .. import stripe_billing
from ..auth import session
from ..context import explicit_org
from ..db import call
from ..errors import ApiError, from_database
from ..http import Ctx, Router
from ..models import (
    BillingStatus,
    CheckoutCredits,
    CheckoutResult,
    CheckoutSubscription,
    Consume,
    ConsumeResult,
    InsufficientCredits,
    TransactionsQuery,
)

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


# debit_credits' arguments as the upshift CLI's body names them (in the errors the database raises).
CONSUME_FIELDS = {"amount": "count", "reason": "action"}


def api_fields(err: ApiError, names: dict[str, str]) -> ApiError:
    if err.fields.get("field") in names:
        err.fields["field"] = names[err.fields["field"]]
    return err


@router.route("POST", "/credits/consume", body=Consume, response=ConsumeResult,
              summary="Spend credits for an action (the upshift CLI's call)",
              errors=(400, 401, 402, 403, 409), error_models={402: InsufficientCredits})
def consume(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(Consume)
    key = idempotency_key(ctx, body.idempotency_key)
    with session(ctx) as (_actor, cur):
        # debit_credits resolves the org context (explicit, the key's, the default org, or none),
        # checks the price and the caller's role there: the rules are the database's.
        try:
            result = call(cur, "debit_credits", amount=body.count, reason=body.action,
                          org=explicit_org(ctx, body.org_id), idempotency_key=key,
                          metadata={"action": body.action, "count": body.count})
        except psycopg.Error as exc:
            raise api_fields(from_database(exc), CONSUME_FIELDS) from None
    if result.get("org_id"):
        ctx.org_id = str(result["org_id"])
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
    with session(ctx) as (_actor, cur):
        rows = call(cur, "list_credit_transactions", org=explicit_org(ctx, q.org_id), since=q.since, until=q.until,
                    after_created_at=after[0] if after else None, after_id=after[1] if after else None,
                    page_size=q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    next_cursor = keyset.encode(datetime.fromisoformat(rows[-1]["created_at"]), rows[-1]["id"]) if more else None
    return {"data": rows, "next_cursor": next_cursor}


# --- checkout (Stripe) -------------------------------------------------------------------------


def _begin(ctx: Ctx, kind: str, body_org: str | None) -> dict[str, Any]:
    with session(ctx) as (_actor, cur):
        account: dict[str, Any] = call(cur, "begin_checkout", kind=kind, org=explicit_org(ctx, body_org))
    if account.get("org_id"):
        ctx.org_id = str(account["org_id"])
    return account


def _customer(ctx: Ctx, sc: Any, account: dict[str, Any]) -> str:
    customer = stripe_billing.ensure_customer(sc, account)
    if customer != account.get("stripe_customer_id"):
        # Backend bookkeeping with ids the database just returned; the permission check happened above.
        with ctx.platform.db.request("service_role") as cur:
            customer = call(cur, "set_stripe_customer", account_kind=account["account_kind"],
                            account_id=str(account["account_id"]), customer_id=customer)
    return customer


def _checkout(ctx: Ctx, *, kind: str, item: str, org: str | None, mode: str, price_setting: str) -> dict[str, Any]:
    """One Checkout flow: configured price, who it is for (decided by begin_checkout), customer, session."""
    settings = ctx.platform.settings
    price = settings.stripe.prices.get(item)
    if not price:
        raise stripe_billing.not_configured(price_setting)
    sc = stripe_billing.client(settings)
    account = _begin(ctx, kind, org)
    out: dict[str, Any] = {"account_kind": account["account_kind"], "account_id": account["account_id"]}
    if mode == "payment":
        multiplier = settings.bonus_multiplier if account["tier"] in ("pro", "team") else 1.0
        out["credits"] = int(settings.stripe.pack_credits[item] * multiplier)
        metadata = {"pack": item, "credits": str(out["credits"])}
    else:
        metadata = {"tier": item}
    customer = _customer(ctx, sc, account)
    checkout = stripe_billing.create_checkout(sc, settings, mode=mode, price=price, customer=customer,
                                              account=account, metadata=metadata)
    return {"url": checkout.url, "id": checkout.id, **out}


@router.route("POST", "/billing/checkout/credits", body=CheckoutCredits, response=CheckoutResult,
              summary="A Stripe Checkout page for a credit pack (for the org context as its admin, else for you)",
              errors=(400, 401, 403, 502, 503))
def checkout_credits(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(CheckoutCredits)
    return _checkout(ctx, kind="credits", item=body.pack, org=body.org_id, mode="payment",
                     price_setting=f"STRIPE_PRICE_PACK_{body.pack.upper()}")


@router.route("POST", "/billing/checkout/subscription", body=CheckoutSubscription, response=CheckoutResult,
              summary="A Stripe Checkout page for Pro (you) or Team (an org, as its admin)",
              errors=(400, 401, 403, 409, 502, 503))
def checkout_subscription(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(CheckoutSubscription)
    return _checkout(ctx, kind=body.tier, item=body.tier, org=body.org_id, mode="subscription",
                     price_setting=f"STRIPE_PRICE_{body.tier.upper()}")


_PAGE = ("<!doctype html><meta charset=utf-8><title>upshift</title>"
         "<body style='font-family:sans-serif;margin:4em'><h1>{title}</h1><p>{text}</p></body>")


@router.route("GET", "/billing/success", auth=False, summary="Where Stripe Checkout returns after paying")
def checkout_success(ctx: Ctx):  # type: ignore[no-untyped-def]
    return flask.Response(_PAGE.format(title="Thank you", text="Payment received. Your credits or plan appear as soon "
                                       "as Stripe confirms it; check with <code>upshift credits</code>."),
                          mimetype="text/html")


@router.route("GET", "/billing/cancel", auth=False, summary="Where Stripe Checkout returns when cancelled")
def checkout_cancel(ctx: Ctx):  # type: ignore[no-untyped-def]
    return flask.Response(_PAGE.format(title="Checkout cancelled", text="Nothing was charged."), mimetype="text/html")
