"""Talking to Stripe: customers and Checkout sessions (outbound), event verification (inbound).

The Stripe API version is pinned to the one the installed ``stripe`` library is written for;
``STRIPE_API_BASE`` points the library at another base URL (a local stand-in in tests).
"""

from __future__ import annotations

import json
from typing import Any

import stripe

from .errors import ApiError
from .settings import Settings

STRIPE_API_VERSION = "2026-10-28.endive"  # what stripe-python 16.1 is written for (stripe.api_version)


def not_configured(what: str) -> ApiError:
    return ApiError(503, "stripe_not_configured", f"Stripe billing is not configured on this server ({what} missing).")


def client(settings: Settings) -> stripe.StripeClient:
    cfg = settings.stripe
    if not cfg.secret_key:
        raise not_configured("STRIPE_SECRET_KEY")
    kwargs: dict[str, Any] = {"stripe_version": STRIPE_API_VERSION, "max_network_retries": 2}
    if cfg.api_base:
        kwargs["base_addresses"] = {"api": cfg.api_base}
    return stripe.StripeClient(cfg.secret_key, **kwargs)


def _stripe_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except stripe.StripeError as exc:
        message = getattr(exc, "user_message", None) or "Stripe did not accept the request."
        raise ApiError(502, "stripe_error", f"Stripe: {message}", stripe_code=getattr(exc, "code", None)) from None


def ensure_customer(sc: stripe.StripeClient, account: dict[str, Any]) -> str:
    """The account's Stripe customer, created once (Stripe's idempotency key covers a race)."""
    if account.get("stripe_customer_id"):
        return str(account["stripe_customer_id"])
    params: dict[str, Any] = {
        "name": account.get("name") or account.get("email") or str(account["account_id"]),
        "metadata": {"account_kind": account["account_kind"], "account_id": str(account["account_id"])},
    }
    if account.get("email"):
        params["email"] = account["email"]
    customer = _stripe_call(
        sc.v1.customers.create, params=params,
        options={"idempotency_key": f"upshift-customer-{account['account_kind']}-{account['account_id']}"},
    )
    return str(customer.id)


def create_checkout(sc: stripe.StripeClient, settings: Settings, *, mode: str, price: str, customer: str,
                    account: dict[str, Any], metadata: dict[str, str]) -> Any:
    base = settings.public_base_url
    if not base:
        raise not_configured("UPSHIFT_PUBLIC_BASE_URL")
    meta = {"account_kind": account["account_kind"], "account_id": str(account["account_id"]),
            "purchaser_id": str(account["purchaser_id"]), **metadata}
    params: dict[str, Any] = {
        "mode": mode,
        "line_items": [{"price": price, "quantity": 1}],
        "customer": customer,
        "client_reference_id": f"{account['account_kind']}:{account['account_id']}",
        "metadata": meta,
        "success_url": f"{base}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{base}/billing/cancel",
    }
    if mode == "payment":
        params["payment_intent_data"] = {"metadata": meta}
    else:
        params["subscription_data"] = {"metadata": meta}
    return _stripe_call(sc.v1.checkout.sessions.create, params=params)


def verify_event(settings: Settings, payload: bytes, signature: str | None) -> dict[str, Any]:
    """The event, if the signature over the raw body is valid and recent (Stripe's default tolerance)."""
    secret = settings.stripe.webhook_secret
    if not secret:
        raise not_configured("STRIPE_WEBHOOK_SECRET")
    if not signature:
        raise ApiError(400, "missing_signature", "The Stripe-Signature header is missing.")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_payload", "The body is not UTF-8.") from None
    try:
        stripe.WebhookSignature.verify_header(text, signature, secret, tolerance=stripe.Webhook.DEFAULT_TOLERANCE)
    except stripe.SignatureVerificationError as exc:
        reason = "timestamp outside the tolerance" if "tolerance" in str(exc).lower() else "no matching signature"
        raise ApiError(400, "invalid_signature", f"Stripe signature verification failed: {reason}.") from None
    except (ValueError, IndexError, TypeError):  # TypeError: hmac.compare_digest on a non-ASCII signature
        raise ApiError(400, "invalid_signature", "The Stripe-Signature header is malformed.") from None
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_payload", "The body is not JSON.") from None
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_payload", "The body is not a Stripe event.")
    return event
