"""Stripe billing: checkout against a local stand-in, verified and idempotent webhooks."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import stripe

from tests import stripe_fakes as sf
from tests.conftest import bearer, make_token, stripe_settings
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.settings import StripeSettings
from upshift_platform.stripe_billing import STRIPE_API_VERSION


@pytest.fixture
def settings(db_url, standin):
    """Stripe against the stand-in, its requests forgotten; conftest's ``platform`` and ``client`` use them."""
    standin.requests.clear()
    return stripe_settings(db_url, standin, pool_max=8)


@pytest.fixture
def acme(world):
    admin, member = world.user("admin@acme.test"), world.user("member@acme.test")
    org = world.org("acme", plan="pro", admin=admin)
    world.member(org, member, "member")
    return {"org": org, "admin": admin, "member": member, "admin_key": world.key(admin, org=org)["secret"]}


def deliver(client, payload, **kw):
    body, headers = sf.signed(payload, **kw)
    return client.post("/stripe/webhook", data=body, headers=headers)


def balance(conn, org=None, user=None):
    if org:
        return conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (org,)).fetchone()["credit_balance"]
    return conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (user,)).fetchone()["credit_balance"]


def assert_invariant(conn):
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []
    assert conn.execute("select * from public.lot_mismatches()").fetchall() == []  # lots = balance


def test_pinned_api_version_is_the_librarys():
    assert STRIPE_API_VERSION == stripe.api_version


# --- checkout --------------------------------------------------------------------------------


def test_cli_buy_credits_for_org_as_admin(client, standin, acme, conn):
    resp = client.post("/billing/checkout/credits", json={"pack": "medium", "token": acme["admin_key"]},
                       headers=bearer(acme["admin_key"]))
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["url"].startswith("https://checkout.stripe.test/") and body["account_kind"] == "org"
    assert body["credits"] == 300
    customer_calls = standin.of("/v1/customers")
    assert len(customer_calls) == 1
    assert customer_calls[0]["params"]["metadata"] == {"account_kind": "org", "account_id": acme["org"]}
    assert customer_calls[0]["headers"]["Stripe-Version"] == STRIPE_API_VERSION
    (call,) = standin.of("/v1/checkout/sessions")
    p = call["params"]
    assert p["mode"] == "payment"
    assert p["line_items"] == [{"price": "price_pack_medium", "quantity": "1"}]
    assert p["client_reference_id"] == f"org:{acme['org']}"
    assert p["customer"] == customer_calls[0]["params"].get("customer", p["customer"])
    assert p["metadata"] == {"account_kind": "org", "account_id": acme["org"], "purchaser_id": acme["admin"],
                             "pack": "medium", "credits": "300"}
    assert p["payment_intent_data"]["metadata"] == p["metadata"]
    assert p["success_url"] == "https://upshift.example/billing/success?session_id={CHECKOUT_SESSION_ID}"
    assert p["cancel_url"] == "https://upshift.example/billing/cancel"
    # The token the CLI repeats in the body went nowhere.
    assert acme["admin_key"] not in json.dumps(standin.requests)
    stored = conn.execute("select stripe_customer_id from public.credit_accounts where id = %s", (acme["org"],)).fetchone()
    assert stored["stripe_customer_id"] == p["customer"]
    # A second purchase reuses the customer.
    client.post("/billing/checkout/credits", json={"pack": "small"}, headers=bearer(acme["admin_key"]))
    assert len(standin.of("/v1/customers")) == 1
    assert standin.of("/v1/checkout/sessions")[1]["params"]["customer"] == p["customer"]


def test_buy_credits_for_org_needs_admin_and_personal_works(client, standin, acme, world):
    member_key = world.key(acme["member"], org=acme["org"])["secret"]
    resp = client.post("/billing/checkout/credits", json={"pack": "small"}, headers=bearer(member_key))
    assert resp.status_code == 403 and resp.get_json()["error"] == "admin_required"
    assert standin.requests == []
    resp = client.post("/billing/checkout/credits", json={"pack": "small"}, headers=bearer(make_token(acme["member"])))
    assert resp.status_code == 200 and resp.get_json()["account_kind"] == "user"
    assert standin.of("/v1/checkout/sessions")[0]["params"]["client_reference_id"] == f"user:{acme['member']}"


@pytest.mark.parametrize(("body", "field"), [({"pack": "huge"}, "pack"), ({}, "pack"), ({"pack": 1}, "pack")])
def test_checkout_validation(client, acme, body, field):
    resp = client.post("/billing/checkout/credits", json=body, headers=bearer(acme["admin_key"]))
    assert resp.status_code == 400 and resp.get_json()["field"] == field


def test_subscriptions_checkout(client, standin, acme):
    pro = client.post("/billing/checkout/subscription", json={"tier": "pro"}, headers=bearer(make_token(acme["member"])))
    assert pro.status_code == 200 and pro.get_json()["account_kind"] == "user"
    p = standin.of("/v1/checkout/sessions")[-1]["params"]
    assert p["mode"] == "subscription" and p["line_items"] == [{"price": "price_pro_monthly", "quantity": "1"}]
    assert p["subscription_data"]["metadata"]["tier"] == "pro"
    team = client.post("/billing/checkout/subscription", json={"tier": "team", "org_id": "acme"},
                       headers=bearer(make_token(acme["admin"])))
    assert team.status_code == 200 and team.get_json()["account_kind"] == "org"
    no_org = client.post("/billing/checkout/subscription", json={"tier": "team"}, headers=bearer(make_token(acme["member"])))
    assert no_org.status_code == 400 and no_org.get_json()["error"] == "org_required"
    member = client.post("/billing/checkout/subscription", json={"tier": "team", "org_id": "acme"},
                         headers=bearer(make_token(acme["member"])))
    assert member.status_code == 403


def test_stripe_errors_are_502(client, standin, acme):
    standin.fail_next = True
    resp = client.post("/billing/checkout/credits", json={"pack": "small"}, headers=bearer(make_token(acme["member"])))
    assert resp.status_code == 502 and resp.get_json()["error"] == "stripe_error"


@pytest.mark.parametrize(
    ("overrides", "path", "body", "missing"),
    [
        pytest.param({"stripe": StripeSettings()}, "/billing/checkout/credits", {"pack": "small"},
                     "STRIPE_PRICE_PACK_SMALL", id="no_stripe_at_all"),
        pytest.param({"stripe": StripeSettings(prices={"small": "p"})}, "/billing/checkout/credits", {"pack": "small"},
                     "STRIPE_SECRET_KEY", id="no_secret_key"),
        pytest.param({"public_base_url": None}, "/billing/checkout/credits", {"pack": "small"},
                     "UPSHIFT_PUBLIC_BASE_URL", id="no_public_url"),
        pytest.param({"stripe": StripeSettings(secret_key="sk")}, "/billing/checkout/subscription", {"tier": "pro"},
                     "STRIPE_PRICE_PRO", id="no_pro_price"),
    ],
)
def test_missing_configuration_is_503(db_url, standin, acme, overrides, path, body, missing):
    plat = Platform(stripe_settings(db_url, standin, **overrides))
    try:
        resp = create_wsgi_app(plat).test_client().post(path, json=body, headers=bearer(make_token(acme["member"])))
        assert resp.status_code == 503
        assert resp.get_json()["error"] == "stripe_not_configured" and missing in resp.get_json()["message"]
    finally:
        plat.close()


def test_webhook_without_secret_accepts_nothing(db_url, standin, conn, acme):
    plat = Platform(stripe_settings(db_url, standin, stripe=StripeSettings(secret_key=sf.SECRET_KEY)))
    try:
        body, headers = sf.signed(sf.checkout_completed("cs_x", "org", acme["org"]))
        resp = create_wsgi_app(plat).test_client().post("/stripe/webhook", data=body, headers=headers)
        assert resp.status_code == 503 and resp.get_json()["error"] == "stripe_not_configured"
        assert balance(conn, org=acme["org"]) == 0
    finally:
        plat.close()


# --- webhook verification --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda p: (json.dumps(p), {"Content-Type": "application/json"}), "missing_signature", id="missing_header"),
        pytest.param(lambda p: sf.signed(p, secret="whsec_wrong"), "invalid_signature", id="bad_signature"),
        pytest.param(lambda p: sf.signed(p, timestamp=int(time.time()) - 3600), "invalid_signature", id="stale_timestamp"),
        pytest.param(lambda p: (json.dumps(p), {"Stripe-Signature": "garbage"}), "invalid_signature", id="malformed_header"),
        pytest.param(lambda p: (json.dumps({**p, "id": "evt_other"}), sf.signed(p)[1]), "invalid_signature",
                     id="body_changed_after_signing"),
    ],
)
def test_unverified_webhooks_are_400_and_change_nothing(client, conn, acme, make, code):
    body, headers = make(sf.checkout_completed("cs_1", "org", acme["org"]))
    resp = client.post("/stripe/webhook", data=body, headers=headers)
    assert resp.status_code == 400 and resp.get_json()["error"] == code
    assert balance(conn, org=acme["org"]) == 0
    assert conn.execute("select count(*) as n from public.stripe_events").fetchone()["n"] == 0


def test_signed_garbage_is_400(client):
    body, headers = sf.signed("[1, 2]")
    assert client.post("/stripe/webhook", data=body, headers=headers).status_code == 400
    body, headers = sf.signed({"hello": "world"})
    resp = client.post("/stripe/webhook", data=body, headers=headers)
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_event"


# --- fulfilment ------------------------------------------------------------------------------


def test_purchase_credits_once_even_when_delivered_twice(client, conn, acme):
    evt = sf.checkout_completed("cs_1", "org", acme["org"], credits=300, pack="medium")
    first = deliver(client, evt)
    assert first.status_code == 200 and first.get_json()["outcome"] == "credits_granted"
    second = deliver(client, evt)
    assert second.status_code == 200 and second.get_json()["duplicate"] is True
    assert balance(conn, org=acme["org"]) == 300
    # A different event about the same session grants nothing more.
    again = deliver(client, sf.checkout_completed("cs_1", "org", acme["org"], credits=300,
                                                  type_="checkout.session.async_payment_succeeded"))
    assert again.get_json()["outcome"] == "already_granted"
    assert balance(conn, org=acme["org"]) == 300
    events = [r["event_type"] for r in conn.execute("select event_type from public.audit_logs where scope_id = %s",
                                                    (acme["org"],))]
    assert events.count("credits_purchased") == 1
    assert_invariant(conn)


def test_same_event_delivered_twice_concurrently(platform, conn, acme):
    evt = sf.checkout_completed("cs_c", "org", acme["org"], credits=100)
    app = create_wsgi_app(platform)
    results = []

    def go():
        results.append(deliver(app.test_client(), evt).get_json())

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["duplicate"] for r in results) == [False, True, True, True]
    assert balance(conn, org=acme["org"]) == 100


def test_async_payment_waits_for_success(client, conn, acme):
    pending = sf.checkout_completed("cs_a", "user", acme["member"], payment_status="unpaid", payment_intent="pi_a")
    assert deliver(client, pending).get_json()["outcome"] == "awaiting_payment"
    assert balance(conn, user=acme["member"]) == 10
    failed = sf.checkout_completed("cs_a", "user", acme["member"], payment_status="unpaid",
                                   type_="checkout.session.async_payment_failed")
    assert deliver(client, failed).get_json()["outcome"] == "payment_failed"
    ok = sf.checkout_completed("cs_a", "user", acme["member"], payment_intent="pi_a",
                               type_="checkout.session.async_payment_succeeded")
    assert deliver(client, ok).get_json()["outcome"] == "credits_granted"
    assert balance(conn, user=acme["member"]) == 110


def test_subscription_lifecycle_with_renewal_and_stale_events(client, conn, acme):
    now = int(time.time())
    created = sf.subscription_event("customer.subscription.created", "sub_1", "user", acme["member"], "pro", "active",
                                    created=now)
    assert deliver(client, created).get_json()["outcome"] == "subscription_active"
    assert conn.execute("select plan from public.profiles where id = %s", (acme["member"],)).fetchone()["plan"] == "pro"
    assert deliver(client, sf.invoice_paid("in_1", "sub_1", "user", acme["member"], "pro")).get_json()["outcome"] \
        == "plan_credits_granted"
    assert balance(conn, user=acme["member"]) == 110
    renewal = sf.invoice_paid("in_2", "sub_1", "user", acme["member"], "pro", billing_reason="subscription_cycle")
    deliver(client, renewal)
    deliver(client, renewal)
    assert balance(conn, user=acme["member"]) == 210
    status = client.get("/billing/status", headers=bearer(make_token(acme["member"]))).get_json()
    assert status["tier"] == "pro" and status["balance"] == 210
    # Cancellation, then an older "updated" event arrives late: ignored.
    deleted = sf.subscription_event("customer.subscription.deleted", "sub_1", "user", acme["member"], "pro", "canceled",
                                    created=now + 20)
    assert deliver(client, deleted).get_json()["outcome"] == "subscription_canceled"
    late = sf.subscription_event("customer.subscription.updated", "sub_1", "user", acme["member"], "pro", "active",
                                 created=now + 10)
    assert deliver(client, late).get_json()["outcome"] == "stale_ignored"
    assert conn.execute("select plan from public.profiles where id = %s", (acme["member"],)).fetchone()["plan"] == "free"
    changes = conn.execute("select metadata from public.audit_logs where event_type = 'plan_changed' order by seq").fetchall()
    assert [(c["metadata"]["from"], c["metadata"]["to"]) for c in changes] == [("free", "pro"), ("pro", "free")]


def test_team_subscription_sets_org_plan_and_bonus(db_url, standin, conn, acme):
    plat = Platform(stripe_settings(db_url, standin, bonus_multiplier=1.5))
    try:
        c = create_wsgi_app(plat).test_client()
        deliver(c, sf.subscription_event("customer.subscription.created", "sub_t", "org", acme["org"], "team", "active"))
        deliver(c, sf.invoice_paid("in_t", "sub_t", "org", acme["org"], "team"))
        assert balance(conn, org=acme["org"]) == 1000
        status = c.get("/billing/status", headers=bearer(acme["admin_key"])).get_json()
        assert status["tier"] == "team" and status["bonusMultiplier"] == 1.5
        out = c.post("/billing/checkout/credits", json={"pack": "small"}, headers=bearer(acme["admin_key"])).get_json()
        assert out["credits"] == 150
    finally:
        plat.close()


def test_refund_after_part_was_spent_never_goes_below_zero(client, conn, acme):
    token = make_token(acme["member"])
    deliver(client, sf.checkout_completed("cs_r", "user", acme["member"], credits=100, payment_intent="pi_r"))
    assert balance(conn, user=acme["member"]) == 110
    for _ in range(30):  # spend 90 of 110
        client.post("/credits/consume", json={"action": "fix", "count": 3}, headers=bearer(token))
    assert balance(conn, user=acme["member"]) == 20
    half = deliver(client, sf.charge_refunded("ch_r", "pi_r", amount=500, refunded=250))
    assert half.get_json()["outcome"] == "refund_applied"
    assert balance(conn, user=acme["member"]) == 0  # 50 due, 20 taken, 30 short
    row = conn.execute("select * from public.audit_logs where event_type = 'credits_refunded'").fetchone()
    assert row["metadata"]["credits"] == 50 and row["metadata"]["taken"] == 20 and row["metadata"]["shortfall"] == 30
    ledger = conn.execute("select * from public.credit_transactions where reason = 'refund'").fetchone()
    assert ledger["amount"] == -20 and ledger["metadata"]["shortfall"] == 30
    # The same refund state again changes nothing; the rest of the refund takes the other half.
    deliver(client, sf.charge_refunded("ch_r", "pi_r", amount=500, refunded=250))
    client.post("/credits/consume", json={"action": "explain", "count": 1}, headers=bearer(token))  # 402 at 0
    deliver(client, sf.invoice_paid("in_x", "sub_x", "user", acme["member"], "pro"))  # +100
    deliver(client, sf.charge_refunded("ch_r", "pi_r", amount=500, refunded=500))
    assert balance(conn, user=acme["member"]) == 50
    assert_invariant(conn)


def test_dispute_is_a_full_refund_until_won(client, conn, acme):
    deliver(client, sf.checkout_completed("cs_d", "org", acme["org"], credits=100, payment_intent="pi_d"))
    deliver(client, sf.dispute("charge.dispute.created", "dp_1", "pi_d"))
    assert balance(conn, org=acme["org"]) == 0
    deliver(client, sf.dispute("charge.dispute.closed", "dp_1", "pi_d", status="won"))
    assert balance(conn, org=acme["org"]) == 100
    assert_invariant(conn)


def test_refund_before_checkout_event_is_applied_when_the_grant_arrives(client, conn, acme):
    assert deliver(client, sf.charge_refunded("ch_o", "pi_o", amount=500, refunded=500)).get_json()["outcome"] \
        == "refund_pending"
    deliver(client, sf.checkout_completed("cs_o", "org", acme["org"], credits=100, payment_intent="pi_o"))
    assert balance(conn, org=acme["org"]) == 0
    assert_invariant(conn)


def test_unknown_event_type_is_200_ignored(client, conn):
    resp = deliver(client, sf.event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert resp.status_code == 200 and resp.get_json()["outcome"] == "ignored"


def test_event_that_cannot_be_applied_is_500_and_rolled_back(client, conn):
    evt = sf.checkout_completed("cs_bad", "org", "00000000-0000-4000-8000-000000000000", credits=100)
    resp = deliver(client, evt)
    assert resp.status_code == 500 and resp.get_json()["error"] == "internal"
    assert conn.execute("select count(*) as n from public.stripe_events").fetchone()["n"] == 0  # Stripe will retry


def test_shuffled_purchase_events_end_the_same(client, conn, acme):
    events = [
        sf.checkout_completed("cs_s", "org", acme["org"], credits=100, payment_intent="pi_s", payment_status="unpaid"),
        sf.checkout_completed("cs_s", "org", acme["org"], credits=100, payment_intent="pi_s",
                              type_="checkout.session.async_payment_succeeded"),
        sf.charge_refunded("ch_s", "pi_s", amount=500, refunded=100),
        sf.charge_refunded("ch_s", "pi_s", amount=500, refunded=300),
    ]
    rng = random.Random(7)
    for _ in range(3):
        order = events * 2
        rng.shuffle(order)
        for e in order:
            assert deliver(client, e).status_code == 200
    assert balance(conn, org=acme["org"]) == 40  # 100 bought, 60% refunded
    assert_invariant(conn)
