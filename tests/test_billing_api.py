"""The billing function as the upshift CLI calls it (UPSHIFT_CLI.md), through the HTTP layer."""

from __future__ import annotations

import pytest

from tests.conftest import bearer, make_token

CLI_HEADERS = {"Content-Type": "application/json", "User-Agent": "node"}


@pytest.fixture
def acme(world):
    acme = world.team(balance=6)
    org = acme["org"]
    return {
        **acme,
        "member_key": world.key(acme["member"], org=org)["secret"],
        "ci_key": world.key(acme["admin"], kind="service", org=org)["secret"],
        "viewer_key": world.key(acme["viewer"], org=org)["secret"],
    }


def consume(client, token, body, **headers):
    return client.post("/credits/consume", json=body, headers={**CLI_HEADERS, **bearer(token), **headers})


@pytest.mark.parametrize("key", ["member_key", "ci_key"])
def test_cli_consume_and_status_with_org_bound_key(client, acme, key):
    token = acme[key]
    status = client.get("/billing/status", headers={**bearer(token), "User-Agent": "node"})
    assert status.status_code == 200
    body = status.get_json()
    assert body["tier"] == "team" and body["balance"] == 6 and body["bonusMultiplier"] == 1.0
    assert body["source"] == "org" and body["org"]["slug"] == "acme"
    for action, count, left in [("explain", 1, 5), ("fix", 3, 2), ("audit", 2, 0)]:
        resp = consume(client, token, {"action": action, "count": count})
        assert resp.status_code == 200, resp.get_json()
        out = resp.get_json()
        assert out["balance"] == left and out["source"] == "org" and out["org_slug"] == "acme"
        assert out["org_id"] == acme["org"] and out["replayed"] is False and out["transaction_id"]
    resp = consume(client, token, {"action": "explain", "count": 1})
    assert resp.status_code == 402
    assert resp.get_json() == {"error": "insufficient_credits", "message": resp.get_json()["message"],
                               "balance": 0, "needed": 1, "source": "org", "org_id": acme["org"]}
    assert client.get("/billing/status", headers=bearer(token)).get_json()["balance"] == 0


def test_status_without_org_is_personal_and_free(client, world):
    u = world.user()
    body = client.get("/billing/status", headers=bearer(make_token(u))).get_json()
    assert body == {"tier": "free", "balance": 10, "available": 10, "held": 0, "bonusMultiplier": 1.0,
                    "source": "user", "org": None, "personal_balance": 10}
    resp = consume(client, make_token(u), {"action": "fix", "count": 3})
    assert resp.get_json()["source"] == "user" and resp.get_json()["balance"] == 7


def test_explicit_org_header_and_body(client, acme, world):
    token = make_token(acme["member"])
    r = consume(client, token, {"action": "explain", "count": 1}, **{"X-Upshift-Org": "acme"})
    assert r.get_json()["source"] == "org"
    r = consume(client, token, {"action": "explain", "count": 1, "org_id": acme["org"]})
    assert r.get_json()["source"] == "org" and r.get_json()["balance"] == 4
    r = consume(client, token, {"action": "explain", "count": 1})
    assert r.get_json()["source"] == "user"  # no default org, JWT not bound
    other = world.org("other", admin=world.user())
    r = consume(client, token, {"action": "explain", "count": 1, "org_id": "other"})
    assert r.status_code == 403 and r.get_json()["error"] == "org_forbidden"
    assert other
    r = consume(client, token, {"action": "explain", "count": 1, "org_id": "acme"}, **{"X-Upshift-Org": "other"})
    assert r.status_code == 400 and r.get_json()["error"] == "conflicting_org"


def test_viewer_cannot_spend(client, acme, conn):
    r = consume(client, acme["viewer_key"], {"action": "explain", "count": 1})
    assert r.status_code == 403 and r.get_json()["error"] == "cannot_spend"
    assert conn.execute("select balance as credit_balance from public.credit_accounts where id = %s",
                        (acme["viewer"],)).fetchone()["credit_balance"] == 10


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        pytest.param({"action": "summon", "count": 1}, "unknown_action", "action", id="unknown_action"),
        pytest.param({"action": "fix", "count": 1}, "count_below_price", "count", id="count_below_price"),
        # The count's range is debit_credits' rule (its parameter is called amount); its type is checked first.
        pytest.param({"action": "explain", "count": 0}, "invalid_amount", "count", id="zero_count"),
        pytest.param({"action": "explain", "count": "1"}, "invalid_request", "count", id="string_count"),
        pytest.param({"action": "explain", "count": 1.5}, "invalid_request", "count", id="float_count"),
        pytest.param({"count": 1}, "invalid_request", "action", id="missing_action"),
        pytest.param({"action": "explain"}, "invalid_request", "count", id="missing_count"),
        pytest.param({"action": "explain", "count": 10**9}, "invalid_amount", "count", id="huge_count"),
        pytest.param({"action": "explain", "count": 2**63}, "invalid_request", "count", id="count_beyond_bigint"),
    ],
)
def test_consume_validation(client, acme, conn, body, code, field):
    before = conn.execute("select count(*) as n from public.credit_transactions").fetchone()["n"]
    r = consume(client, acme["member_key"], body)
    assert r.status_code == 400
    assert r.get_json()["error"] == code and r.get_json()["field"] == field
    if code == "unknown_action":
        assert r.get_json()["known_actions"] == ["audit", "explain", "fix"]
        assert "audit, explain, fix" in r.get_json()["message"]
    assert conn.execute("select count(*) as n from public.credit_transactions").fetchone()["n"] == before


def test_consume_without_auth_is_401_json(client):
    r = client.post("/credits/consume", json={"action": "explain", "count": 1}, headers=CLI_HEADERS)
    assert r.status_code == 401 and r.get_json()["error"] == "unauthenticated"


def test_count_above_price_charges_count(client, acme):
    r = consume(client, acme["member_key"], {"action": "explain", "count": 2})
    assert r.get_json()["balance"] == 4


def test_idempotency_key_header_and_body(client, acme):
    first = consume(client, acme["ci_key"], {"action": "explain", "count": 1}, **{"Idempotency-Key": "run-7"})
    again = consume(client, acme["ci_key"], {"action": "explain", "count": 1, "idempotency_key": "run-7"})
    assert again.get_json()["replayed"] is True
    assert again.get_json()["transaction_id"] == first.get_json()["transaction_id"]
    assert again.get_json()["balance"] == 5
    conflict = consume(client, acme["ci_key"], {"action": "fix", "count": 3}, **{"Idempotency-Key": "run-7"})
    assert conflict.status_code == 409 and conflict.get_json()["error"] == "idempotency_conflict"
    mismatch = consume(client, acme["ci_key"], {"action": "fix", "count": 3, "idempotency_key": "a"},
                       **{"Idempotency-Key": "b"})
    assert mismatch.status_code == 400


def test_configured_prices(db_url, world):
    from upshift_platform.app import Platform, create_wsgi_app
    from upshift_platform.settings import Settings, _prices

    plat = Platform(Settings(database_url=db_url, jwt_secret="x" * 40, prices=_prices("explain=2,scan=5")))
    try:
        c = create_wsgi_app(plat).test_client()
        u = world.user()
        token = make_token(u, secret="x" * 40)
        assert consume(c, token, {"action": "explain", "count": 1}).get_json()["error"] == "count_below_price"
        assert consume(c, token, {"action": "scan", "count": 5}).get_json()["balance"] == 5
    finally:
        plat.close()


def test_transactions_pagination(client, acme, world):
    token = make_token(acme["admin"])
    for _ in range(5):
        consume(client, make_token(acme["member"]), {"action": "explain", "count": 1, "org_id": "acme"})
    seen, cursor = [], None
    while True:
        url = "/api/credits/transactions?org_id=acme&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=bearer(token)).get_json()
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 6  # 5 debits + the opening grant
    member_view = client.get("/api/credits/transactions?org_id=acme", headers=bearer(make_token(acme["member"])))
    assert len(member_view.get_json()["data"]) == 5  # members see their own rows
    bad = client.get("/api/credits/transactions?cursor=zzz", headers=bearer(token))
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_cursor"
    bad = client.get("/api/credits/transactions?limit=5000", headers=bearer(token))
    assert bad.status_code == 400 and bad.get_json()["field"] == "limit"
    personal = client.get("/api/credits/transactions", headers=bearer(token)).get_json()["data"]
    assert [r["reason"] for r in personal] == ["signup_bonus"]
