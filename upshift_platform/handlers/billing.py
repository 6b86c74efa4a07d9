"""The billing function: what the upshift CLI calls to spend, inspect and buy credits."""

from __future__ import annotations

from typing import Any

from .. import cursor as keyset
from .. import stripe_billing
from ..context import explicit_org
from ..errors import ApiError
from ..models import (
    BillingStatus,
    CheckoutCredits,
    CheckoutResult,
    CheckoutSubscription,
    Consume,
    ConsumeResult,
    InsufficientCredits,
    StatusQuery,
    TransactionsQuery,
)
from ..routing import Ctx, Html, Router
from ..session import Backend, OpenSession, Session

router = Router("billing")


def idempotency_key(ctx: Ctx, body_key: str | None) -> str | None:
    """The header or the body's key; both given must agree (the database checks the key itself)."""
    header = ctx.header("Idempotency-Key")
    if header and body_key and header != body_key:
        raise ApiError(400, "conflicting_idempotency_key",
                       "The Idempotency-Key header and idempotency_key in the body differ.", field="idempotency_key")
    return header or body_key


@router.route("POST", "/credits/consume", response=ConsumeResult,
              summary="Spend credits for an action (the upshift CLI's call)",
              errors=(400, 401, 402, 403, 409), error_models={402: InsufficientCredits},
              fields={"amount": "count", "reason": "action"})
def consume(ctx: Ctx, body: Consume, db: Session) -> dict[str, Any]:
    # debit_credits resolves the org context (explicit, the key's, the default org, or none) and checks
    # the action's price, the count and the caller's role there: every rule is the database's.
    # last=True: the debit travels with its COMMIT (one round trip; the pool's row is held only server-side).
    result = db.call_dict("debit_credits", amount=body.count, reason=body.action, org=explicit_org(ctx, body.org_id),
                          idempotency_key=idempotency_key(ctx, body.idempotency_key),
                          metadata={"action": body.action, "count": body.count}, last=True)
    ctx.note_org(result.get("org_id"))
    return result


@router.route("GET", "/billing/status", response=BillingStatus,
              summary="Tier, the balance the next consume draws from, and the pack bonus", errors=(400, 401, 403))
def status(ctx: Ctx, query: StatusQuery, db: Session) -> dict[str, Any]:
    result = db.call_dict("billing_status", org=explicit_org(ctx, query.org_id))
    if result.get("org"):
        ctx.note_org(result["org"]["id"])
    multiplier = ctx.platform.settings.bonus_multiplier if result["tier"] in ("pro", "team") else 1.0
    return {**result, "bonusMultiplier": multiplier}


@router.route("GET", "/api/credits/transactions", summary="The credit ledger, newest first, as RLS allows",
              errors=(400, 401, 403))
def transactions(ctx: Ctx, query: TransactionsQuery, db: Session) -> dict[str, Any]:
    after = keyset.decode(query.cursor)
    rows = db.call("list_credit_transactions", org=explicit_org(ctx, query.org_id), since=query.since,
                   until=query.until, after_created_at=after[0] if after else None,
                   after_id=after[1] if after else None, page_size=query.limit + 1)
    assert isinstance(rows, list)
    return keyset.page(rows, query.limit)


# --- checkout (Stripe): the caller's transaction, then Stripe outside any, then service_role -----


def _checkout(ctx: Ctx, open_session: OpenSession, backend: Backend, *, kind: str, item: str, org: str | None,
              mode: str, price_setting: str) -> dict[str, Any]:
    """One Checkout flow: configured price, who it is for (decided by begin_checkout), customer, session."""
    settings = ctx.platform.settings
    price = settings.stripe.prices.get(item)
    if not price:
        raise stripe_billing.not_configured(price_setting)
    sc = stripe_billing.client(settings)
    with open_session() as db:
        account = db.call_dict("begin_checkout", kind=kind, org=explicit_org(ctx, org))
    ctx.note_org(account.get("org_id"))
    out: dict[str, Any] = {"account_kind": account["account_kind"], "account_id": account["account_id"]}
    if mode == "payment":
        multiplier = settings.bonus_multiplier if account["tier"] in ("pro", "team") else 1.0
        out["credits"] = int(settings.stripe.pack_credits[item] * multiplier)
        metadata = {"pack": item, "credits": str(out["credits"])}
    else:
        metadata = {"tier": item}
    customer = stripe_billing.ensure_customer(sc, account)
    if customer != account.get("stripe_customer_id"):
        # Backend bookkeeping with ids the database just returned; the permission check happened above.
        with backend() as tx:
            customer = str(tx.call("set_stripe_customer", account_kind=account["account_kind"],
                                   account_id=str(account["account_id"]), customer_id=customer))
    checkout = stripe_billing.create_checkout(sc, settings, mode=mode, price=price, customer=customer,
                                              account=account, metadata=metadata)
    return {"url": checkout.url, "id": checkout.id, **out}


@router.route("POST", "/billing/checkout/credits", response=CheckoutResult,
              summary="A Stripe Checkout page for a credit pack (for the org context as its admin, else for you)",
              errors=(400, 401, 403, 502, 503))
def checkout_credits(ctx: Ctx, body: CheckoutCredits, open_session: OpenSession, backend: Backend) -> dict[str, Any]:
    return _checkout(ctx, open_session, backend, kind="credits", item=body.pack, org=body.org_id, mode="payment",
                     price_setting=f"STRIPE_PRICE_PACK_{body.pack.upper()}")


@router.route("POST", "/billing/checkout/subscription", response=CheckoutResult,
              summary="A Stripe Checkout page for Pro (you) or Team (an org, as its admin)",
              errors=(400, 401, 403, 409, 502, 503))
def checkout_subscription(ctx: Ctx, body: CheckoutSubscription, open_session: OpenSession,
                          backend: Backend) -> dict[str, Any]:
    return _checkout(ctx, open_session, backend, kind=body.tier, item=body.tier, org=body.org_id, mode="subscription",
                     price_setting=f"STRIPE_PRICE_{body.tier.upper()}")


_PAGE = ("<!doctype html><meta charset=utf-8><title>upshift</title>"
         "<body style='font-family:sans-serif;margin:4em'><h1>{title}</h1><p>{text}</p></body>")


@router.route("GET", "/billing/success", summary="Where Stripe Checkout returns after paying")
def checkout_success() -> Html:
    return Html(_PAGE.format(title="Thank you", text="Payment received. Your credits or plan appear as soon as "
                             "Stripe confirms it; check with <code>upshift credits</code>."))


@router.route("GET", "/billing/cancel", summary="Where Stripe Checkout returns when cancelled")
def checkout_cancel() -> Html:
    return Html(_PAGE.format(title="Checkout cancelled", text="Nothing was charged."))
