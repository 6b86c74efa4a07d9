"""The one-round-trip request path, attacked: client-side bound statements, the key lookup in SQL, the
lazy transaction, and the database monitor.

A request's setup (role, claims, headers, statement timeout), an API key's lookup
(``public.api_key_claims``) and the handler's statement go to the server as one message, with values
bound client-side (``upshift_platform/db.py``). These tests try to break that as an outsider would.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest

from tests.conftest import acting_as, bearer, by_id, make_token
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.auth import hash_api_key
from upshift_platform.db import Database
from upshift_platform.embedded import free_port
from upshift_platform.settings import Settings

CONSUME = {"action": "explain", "count": 1}


@pytest.fixture
def acme(world):
    team = world.team(balance=100)
    return {**team, "member_key": world.key(team["member"], org=team["org"])["secret"],
            "ci_key": world.key(team["admin"], kind="service", org=team["org"])["secret"]}


def balance(conn, org: str) -> int:
    return int(conn.execute("select balance from public.credit_accounts where id = %s", (org,)).fetchone()["balance"])


def ledger(conn, org: str) -> list[dict[str, Any]]:
    return conn.execute("select amount, idempotency_key, metadata from public.credit_transactions"
                        " where account_id = %s and amount < 0 order by created_at", (org,)).fetchall()


HOSTILE_KEYS = {
    "quote_then_statement": "k'); select public.grant_credits(1000, 'admin_grant', 'acme', null, 'x'); --",
    "semicolon_commit": "k'; commit; select 1; --",
    "backslash_quote": "k\\'; select 1; --",
    "dollar_quoting": "k$$; select 1; $$",
    "percent_placeholders": "k %s %(org)s %%",
    "unicode": "k-\u00e9\u4e2d\U0001f600",
}


@pytest.mark.parametrize("key", by_id(HOSTILE_KEYS))
def test_sql_in_every_bound_value_is_data(client, conn, acme, key):
    """Idempotency key, org header and user agent travel as literals inside the one message: quoted, never run."""
    before = balance(conn, acme["org"])
    headers = {**bearer(acme["member_key"]), "Idempotency-Key": key, "User-Agent": key, "X-Upshift-Org": "acme"}
    resp = client.post("/credits/consume", json=CONSUME, headers=headers)
    assert resp.status_code == 200, resp.get_json()
    assert balance(conn, acme["org"]) == before - 1  # and no grant ran
    rows = ledger(conn, acme["org"])
    assert [r["idempotency_key"] for r in rows] == [key]
    again = client.post("/credits/consume", json=CONSUME, headers=headers)  # a replay finds the same key
    assert again.get_json()["replayed"] is True and balance(conn, acme["org"]) == before - 1


def test_sql_in_an_org_reference_is_a_plain_refusal(client, conn, acme):
    before = balance(conn, acme["org"])
    for org in ("acme'; select 1; --", "acme\\", "' or true or '"):
        resp = client.post("/credits/consume", json={**CONSUME, "org_id": org}, headers=bearer(acme["member_key"]))
        assert resp.status_code in (400, 403), (org, resp.get_json())
    assert balance(conn, acme["org"]) == before


def test_a_nul_in_a_bound_value_is_a_400_and_nothing_is_written(client, conn, acme):
    before = balance(conn, acme["org"])
    resp = client.post("/credits/consume", json={**CONSUME, "idempotency_key": "a\u0000b"},
                       headers=bearer(acme["member_key"]))
    assert resp.status_code == 400, resp.get_json()
    assert balance(conn, acme["org"]) == before


@pytest.mark.parametrize("token", by_id({"unknown": "upk_" + "x" * 40, "prefix_only": "upk_nope",
                                        "service_unknown": "ups_nope"}))
def test_unknown_keys_are_401_from_the_database_and_charge_nothing(client, conn, acme, token):
    message = "Unknown API key."
    before = balance(conn, acme["org"])
    resp = client.post("/credits/consume", json=CONSUME, headers=bearer(token))
    assert resp.status_code == 401 and resp.get_json()["error"] == "unauthenticated"
    assert resp.get_json()["message"] == message
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert balance(conn, acme["org"]) == before


@pytest.mark.parametrize("state", ["revoked", "expired"])
def test_inactive_keys_are_401_on_every_path(client, conn, world, acme, state):
    key = world.key(acme["member"], org=acme["org"])
    if state == "revoked":
        conn.execute("update public.api_keys set revoked_at = now() where id = %s", (key["id"],))
    else:
        conn.execute("update public.api_keys set expires_at = now() - interval '1 second' where id = %s",
                     (key["id"],))
    before = balance(conn, acme["org"])
    for method, path, body in (("POST", "/credits/consume", CONSUME), ("GET", "/billing/status", None),
                               ("GET", "/api/me", None), ("GET", "/api/credits/transactions", None)):
        resp = client.open(path, method=method, json=body, headers=bearer(key["secret"]))
        assert (resp.status_code, resp.get_json()["message"]) == (401, f"API key is {state}."), (path, resp.get_json())
    assert balance(conn, acme["org"]) == before


def test_api_key_claims_is_the_backend_s_alone(conn, acme):
    digest = hash_api_key(acme["member_key"])
    for role, claims in (("anon", None), ("authenticated", {"role": "authenticated", "sub": acme["member"]})):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), acting_as(conn, role, claims) as cur:
            cur.execute("select public.api_key_claims(%s)", (digest,))
    with acting_as(conn, "service_role") as cur:
        claims = cur.execute("select public.api_key_claims(%s) as c", (digest,)).fetchone()["c"]
    assert claims["sub"] == acme["member"] and claims["role"] == "authenticated"
    assert claims["upshift"] == {"key_id": claims["upshift"]["key_id"], "kind": "personal", "org_id": acme["org"]}
    with acting_as(conn, "service_role") as cur:
        ci = cur.execute("select public.api_key_claims(%s) as c", (hash_api_key(acme["ci_key"]),)).fetchone()["c"]
    assert "sub" not in ci and ci["upshift"]["kind"] == "service" and ci["upshift"]["org_id"] == acme["org"]
    for bad in ("' or true --", "A" * 64, "", None):
        with pytest.raises(psycopg.Error) as exc, acting_as(conn, "service_role") as cur:
            cur.execute("select public.api_key_claims(%s)", (bad,))
        assert exc.value.diag.sqlstate == "PT401"


def test_a_failed_debit_leaves_nothing_and_the_connection_serves_the_next_caller(db_url, conn, acme):
    """One pooled connection: a refused one-message debit (402) is rolled back whole, and the next request on
    the same connection acts as its own caller, with nothing left over from the last."""
    conn.execute("update public.credit_accounts set balance = balance where id = %s", (acme["org"],))
    plat = Platform(Settings(database_url=db_url, jwt_secret="x" * 40, pool_min=1, pool_max=1))
    client = create_wsgi_app(plat).test_client()
    try:
        before = balance(conn, acme["org"])
        big = client.post("/credits/consume", json={"action": "explain", "count": 10_000},
                          headers=bearer(acme["member_key"]))
        assert big.status_code == 402 and balance(conn, acme["org"]) == before
        ok = client.post("/credits/consume", json=CONSUME, headers=bearer(acme["ci_key"]))
        assert ok.status_code == 200 and balance(conn, acme["org"]) == before - 1
        with plat.db.pool.connection() as c:
            row = c.execute("select current_user as who, current_setting('request.jwt.claims', true) as claims,"
                            " current_setting('role') as role").fetchone()
        assert row["who"] != "authenticated" and not row["claims"] and row["role"] == "none"
        assert ledger(conn, acme["org"])[-1]["metadata"] == {"action": "explain", "count": 1}
    finally:
        plat.close()


def test_a_handler_that_never_calls_the_database_still_has_its_key_checked(db_url, acme):
    """``GET /api/me`` reads who the caller is before any statement: the key lookup runs on its own."""
    plat = Platform(Settings(database_url=db_url, jwt_secret="x" * 40))
    client = create_wsgi_app(plat).test_client()
    try:
        me = client.get("/api/me", headers=bearer(acme["ci_key"]))
        assert me.status_code == 200 and me.get_json()["service_key"]["org"]["slug"] == "acme"
        assert client.get("/api/me", headers=bearer("ups_" + "z" * 30)).status_code == 401
    finally:
        plat.close()


def test_a_session_commits_once_and_refuses_to_run_after_its_last_statement(db_url, acme):
    db = Database(db_url)
    try:
        with db.transaction("authenticated", {"role": "authenticated", "sub": acme["member"],
                                              "aud": "authenticated"}) as tx:
            assert tx.run("select auth.uid()::text as u")[0]["u"] == acme["member"]
            tx.run("select 1", last=True)
            assert tx.ended
            with pytest.raises(RuntimeError):
                tx.run("select 1")
    finally:
        db.close()


def test_a_dead_database_is_a_fast_503_with_retry_after_on_every_database_path():
    plat = Platform(Settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", jwt_secret="x" * 40))
    client = create_wsgi_app(plat).test_client()
    try:
        assert client.get("/health").status_code == 503  # the monitor has probed once
        token = make_token("00000000-0000-0000-0000-000000000001", secret="x" * 40)
        for method, path, headers, body in (
                ("POST", "/credits/consume", bearer("upk_" + "a" * 40), CONSUME),
                ("GET", "/billing/status", bearer(token), None),
                ("POST", "/stripe/webhook", {"Stripe-Signature": "t=1,v1=x"}, {})):
            started = time.monotonic()
            resp = client.open(path, method=method, headers=headers, data=json.dumps(body) if body is not None else None,
                               content_type="application/json")
            elapsed = time.monotonic() - started
            body_out = resp.get_json()
            if path == "/stripe/webhook":  # no webhook secret here: refused before the database is needed
                assert resp.status_code in (400, 503), body_out
                continue
            assert (resp.status_code, body_out["error"]) == (503, "database_unavailable"), body_out
            assert resp.headers["Retry-After"] == "1" and elapsed < 1.0
        live = client.get("/health/live")
        assert live.status_code == 200 and live.get_json() == {"status": "ok"}
    finally:
        plat.close()


def test_serve_runs_one_worker_per_core_unless_told():
    import os

    from upshift_platform.cli import build_parser
    from upshift_platform.server import default_workers

    assert default_workers() == len(os.sched_getaffinity(0))
    args = build_parser().parse_args(["serve"])
    assert args.workers is None and args.threads == 8  # None: serve() takes default_workers()
