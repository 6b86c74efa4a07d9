"""Foundation: migrations, the Supabase compat bootstrap, request transactions, health."""

from __future__ import annotations

import json

import psycopg
import pytest

from upshift_platform.db import Database
from upshift_platform.migrate import applied_versions, discover, migrate


def test_migrations_recorded_like_supabase_cli_and_idempotent(db_url, conn):
    versions = applied_versions(conn)
    assert versions == {m.version for m in discover()}
    assert migrate(db_url, log=lambda _m: None) == []  # second run applies nothing
    cols = {r["column_name"] for r in conn.execute(
        "select column_name from information_schema.columns"
        " where table_schema = 'supabase_migrations' and table_name = 'schema_migrations'")}
    assert {"version", "statements", "name"} <= cols


def test_compat_bootstrap_is_idempotent(conn):
    from upshift_platform.paths import compat_sql

    before = conn.execute("select pg_get_functiondef('auth.uid()'::regprocedure) as d").fetchone()
    conn.execute(compat_sql().read_text())  # a second application changes nothing
    after = conn.execute("select pg_get_functiondef('auth.uid()'::regprocedure) as d").fetchone()
    assert before == after
    roles = {r["rolname"]: r for r in conn.execute(
        "select rolname, rolbypassrls, rolcanlogin from pg_roles"
        " where rolname in ('anon','authenticated','service_role','authenticator')")}
    assert set(roles) == {"anon", "authenticated", "service_role", "authenticator"}
    assert roles["service_role"]["rolbypassrls"]
    assert not roles["authenticated"]["rolbypassrls"]


@pytest.mark.parametrize(
    ("claims", "uid", "role"),
    [
        pytest.param('{"sub":"6f1c1f0e-0000-4000-8000-000000000001","role":"authenticated"}',
                     "6f1c1f0e-0000-4000-8000-000000000001", "authenticated", id="claims"),
        pytest.param("", None, None, id="empty_setting_is_null"),
        pytest.param('{"role":"anon"}', None, "anon", id="anon"),
    ],
)
def test_auth_functions_read_request_claims(conn, claims, uid, role):
    with conn.transaction(force_rollback=True):
        conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
        row = conn.execute("select auth.uid()::text as uid, auth.role() as role, auth.jwt() as jwt").fetchone()
    assert row["uid"] == uid
    assert row["role"] == role
    assert row["jwt"] == (json.loads(claims) if claims else None)


def test_new_user_gets_profile_with_ten_credits(world, conn):
    uid = world.user("new@example.test")
    row = conn.execute("select a.balance as credit_balance, p.plan, p.email from public.profiles p join public.credit_accounts a on a.id = p.id where p.id = %s", (uid,)).fetchone()
    assert row == {"credit_balance": 10, "plan": "free", "email": "new@example.test"}


def test_request_transaction_sets_role_and_claims_locally(db_url, world):
    uid = world.user()
    db = Database(db_url, max_size=2)
    try:
        with db.request("authenticated", {"sub": uid, "role": "authenticated"}) as cur:
            row = cur.execute(
                "select current_user as who, auth.uid()::text as uid,"
                " current_setting('statement_timeout') as st").fetchone()
        assert row == {"who": "authenticated", "uid": uid, "st": "5s"}
        # Nothing leaks into the next transaction on the same pooled connection.
        with db.pool.connection() as c:
            after = c.execute("select current_user as who,"
                              " current_setting('request.jwt.claims', true) as claims").fetchone()
        assert after["who"] != "authenticated"
        assert not after["claims"]
        with pytest.raises(ValueError, match="unknown API role"):
            with db.request("postgres"):
                pass
    finally:
        db.close()


def test_request_transaction_rolls_back_on_error(db_url, conn, world):
    uid = world.user()
    db = Database(db_url, max_size=1)
    try:
        with pytest.raises(RuntimeError):
            with db.request("service_role") as cur:
                cur.execute("select 1")
                conn.execute("select 1")
                raise RuntimeError("boom")
        with db.request("authenticated", {"sub": uid, "role": "authenticated"}) as cur:
            assert cur.execute("select count(*) as n from public.profiles").fetchone()["n"] == 1
    finally:
        db.close()


def test_statement_timeout_is_enforced(db_url):
    db = Database(db_url, max_size=1, statement_timeout_ms=100)
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            with db.request("service_role") as cur:
                cur.execute("select pg_sleep(1)")
    finally:
        db.close()


def test_health_ok(client):
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "database": "ok"}
    assert resp.headers["X-Request-Id"]


def test_health_503_when_database_unreachable():
    from upshift_platform.app import Platform, create_wsgi_app
    from upshift_platform.embedded import free_port
    from upshift_platform.settings import Settings

    plat = Platform(Settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                             jwt_secret="x"))
    try:
        resp = create_wsgi_app(plat).test_client().get("/health")
        assert resp.status_code == 503
        body = resp.get_json()
        assert body["database"] == "down"
        assert body["error"] == "database_unavailable"
    finally:
        plat.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        pytest.param("GET", "/nope", 404, "not_found", id="unknown_path"),
        pytest.param("DELETE", "/health", 405, "method_not_allowed", id="wrong_method"),
    ],
)
def test_unknown_routes_answer_json(client, method, path, status, code):
    resp = client.open(path, method=method)
    assert resp.status_code == status
    assert resp.get_json()["error"] == code


def test_request_id_is_echoed(client):
    resp = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
