"""A local stand-in for Stripe's API, and webhook events shaped like API version 2026-10-28.endive."""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import stripe

WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
SECRET_KEY = "sk_test_upshift_0123456789"
PRICES = {"small": "price_pack_small", "medium": "price_pack_medium", "large": "price_pack_large",
          "pro": "price_pro_monthly", "team": "price_team_monthly"}


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``line_items[0][price]=x``) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node: Any = root
        for part, nxt in itertools.pairwise(parts):
            container: Any = [] if nxt.isdigit() else {}
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if node[idx] is None:
                    node[idx] = container
                node = node[idx]
            else:
                node = node.setdefault(part, container)
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            while len(node) <= idx:
                node.append(None)
            node[idx] = value
        else:
            node[last] = value
    return root


class StripeStandIn:
    """Answers POST /v1/customers and /v1/checkout/sessions; records every request it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.customers: dict[str, str] = {}  # idempotency key -> customer id
        self.fail_next = False
        self._ids = itertools.count(1)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                params = unflatten(parse_qsl(body, keep_blank_values=True))
                record = {"path": self.path, "params": params, "headers": dict(self.headers.items())}
                outer.requests.append(record)
                status, payload = outer.answer(self.path, params, self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str, params: dict[str, Any], headers: Any) -> tuple[int, dict[str, Any]]:
        if headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            return 401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}
        if self.fail_next:
            self.fail_next = False
            return 400, {"error": {"type": "invalid_request_error", "message": "No such price", "code": "resource_missing"}}
        if path == "/v1/customers":
            key = headers.get("Idempotency-Key") or f"anon-{next(self._ids)}"
            cid = self.customers.setdefault(key, f"cus_test{next(self._ids)}")
            return 200, {"id": cid, "object": "customer", "email": params.get("email"), "metadata": params.get("metadata", {})}
        if path == "/v1/checkout/sessions":
            sid = f"cs_test_{next(self._ids)}"
            return 200, {"id": sid, "object": "checkout.session", "mode": params.get("mode"),
                         "url": f"https://checkout.stripe.test/c/pay/{sid}", "customer": params.get("customer"),
                         "client_reference_id": params.get("client_reference_id"), "metadata": params.get("metadata", {}),
                         "status": "open", "payment_status": "unpaid"}
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {path}"}}

    def of(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.httpd.shutdown()


# --- events ----------------------------------------------------------------------------------

_event_ids = itertools.count(1)


def event(type_: str, obj: dict[str, Any], *, created: int | None = None, event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_test_{next(_event_ids)}_{int(time.time() * 1000)}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": created or int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type_,
        "data": {"object": obj},
    }


def checkout_completed(session_id: str, account_kind: str, account_id: str, *, pack: str = "small",
                       credits: int = 100, amount: int = 500, payment_intent: str = "pi_1",
                       payment_status: str = "paid", type_: str = "checkout.session.completed", **kw: Any) -> dict[str, Any]:
    meta = {"account_kind": account_kind, "account_id": account_id, "purchaser_id": account_id, "pack": pack,
            "credits": str(credits)}
    return event(type_, {
        "id": session_id, "object": "checkout.session", "mode": "payment", "status": "complete",
        "payment_status": payment_status, "amount_total": amount, "currency": "usd", "customer": "cus_test1",
        "client_reference_id": f"{account_kind}:{account_id}", "metadata": meta, "payment_intent": payment_intent,
    }, **kw)


def subscription_event(type_: str, sub_id: str, account_kind: str, account_id: str, tier: str, status: str,
                       **kw: Any) -> dict[str, Any]:
    return event(type_, {
        "id": sub_id, "object": "subscription", "status": status, "customer": "cus_test1",
        "metadata": {"account_kind": account_kind, "account_id": account_id, "tier": tier},
        "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                                              "price": {"id": PRICES[tier], "object": "price"},
                                              "current_period_end": int(time.time()) + 30 * 86400}]},
    }, **kw)


def invoice_paid(invoice_id: str, sub_id: str, account_kind: str, account_id: str, tier: str,
                 billing_reason: str = "subscription_create", **kw: Any) -> dict[str, Any]:
    return event("invoice.paid", {
        "id": invoice_id, "object": "invoice", "status": "paid", "billing_reason": billing_reason,
        "customer": "cus_test1", "amount_paid": 900, "currency": "usd",
        "parent": {"type": "subscription_details", "quote_details": None, "subscription_details": {
            "subscription": sub_id, "metadata": {"account_kind": account_kind, "account_id": account_id, "tier": tier}}},
        "lines": {"object": "list", "data": [{"object": "line_item",
                                              "pricing": {"type": "price_details", "price_details": {"price": PRICES[tier]}}}]},
    }, **kw)


def charge_refunded(charge_id: str, payment_intent: str, amount: int, refunded: int, **kw: Any) -> dict[str, Any]:
    return event("charge.refunded", {"id": charge_id, "object": "charge", "amount": amount, "amount_refunded": refunded,
                                     "payment_intent": payment_intent, "refunded": refunded >= amount,
                                     "currency": "usd"}, **kw)


def dispute(type_: str, dispute_id: str, payment_intent: str, status: str = "needs_response", **kw: Any) -> dict[str, Any]:
    return event(type_, {"id": dispute_id, "object": "dispute", "charge": "ch_1", "payment_intent": payment_intent,
                         "amount": 500, "status": status}, **kw)


def signed(payload: dict[str, Any] | str, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> tuple[str, dict[str, str]]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
    return body, {"Stripe-Signature": header, "Content-Type": "application/json"}
