"""Org management through the API and directly in SQL, as each kind of caller."""

from __future__ import annotations

import logging

import psycopg
import pytest

from tests.conftest import bearer, make_token


@pytest.fixture
def acme(world):
    return world.team(balance=0, outsider=True)


def h(user_id: str) -> dict[str, str]:
    return bearer(make_token(user_id))


def test_create_org_makes_caller_admin_and_lists_it(client, world):
    u = world.user()
    resp = client.post("/api/orgs", json={"name": "Beta Co", "slug": "Beta"}, headers=h(u))
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["slug"] == "beta" and body["role"] == "admin" and body["credit_balance"] == 0
    listed = client.get("/api/orgs", headers=h(u)).get_json()["data"]
    assert [(o["slug"], o["role"]) for o in listed] == [("beta", "admin")]
    assert client.get(f"/api/orgs/{body['id']}", headers=h(u)).get_json()["slug"] == "beta"
    assert client.get("/api/orgs/beta", headers=h(u)).get_json()["id"] == body["id"]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        pytest.param({"name": "X"}, 400, "invalid_request", "slug", id="missing_slug"),
        pytest.param({"name": "X", "slug": "-bad-"}, 400, "invalid_slug", "slug", id="bad_slug"),
        pytest.param({"name": "", "slug": "ok"}, 400, "invalid_name", "name", id="empty_name"),
        pytest.param({"name": "X", "slug": "ok", "plan": "team"}, 400, "invalid_request", "plan", id="extra_field"),
        pytest.param({"name": "X", "slug": "acme"}, 409, "slug_taken", "slug", id="slug_taken"),
        pytest.param({"name": "X", "slug": "12345678-1234-1234-1234-123456789012"}, 400, "invalid_slug",
                     "slug", id="uuid_slug"),
    ],
)
def test_create_org_validation(client, acme, conn, body, status, code, field):
    before = conn.execute("select count(*) as n from public.orgs").fetchone()["n"]
    resp = client.post("/api/orgs", json=body, headers=h(acme["member"]))
    assert resp.status_code == status
    assert resp.get_json()["error"] == code
    assert resp.get_json().get("field") == field
    assert conn.execute("select count(*) as n from public.orgs").fetchone()["n"] == before


def test_invalid_json_body(client, acme):
    resp = client.post("/api/orgs", data="{nope", content_type="application/json", headers=h(acme["admin"]))
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_json"
    resp = client.post("/api/orgs", json=[1, 2], headers=h(acme["admin"]))
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_request"


def test_update_org_admin_only(client, acme):
    path = "/api/orgs/acme"
    assert client.patch(path, json={"name": "Acme Inc"}, headers=h(acme["member"])).status_code == 403
    assert client.patch(path, json={"name": "Acme Inc"}, headers=h(acme["outsider"])).status_code == 403
    resp = client.patch(path, json={"name": "Acme Inc", "slug": "acme-inc"}, headers=h(acme["admin"]))
    assert resp.status_code == 200
    assert resp.get_json()["slug"] == "acme-inc" and resp.get_json()["name"] == "Acme Inc"
    taken = client.patch("/api/orgs/acme-inc", json={"slug": "other"}, headers=h(acme["admin"]))
    assert taken.status_code == 409 and taken.get_json()["error"] == "slug_taken"


def test_members_roles_and_last_admin(client, acme):
    base = "/api/orgs/acme/members"
    members = client.get(base, headers=h(acme["viewer"])).get_json()["data"]
    assert {m["email"]: m["role"] for m in members} == {
        "admin@acme.test": "admin", "member@acme.test": "member", "viewer@acme.test": "viewer"}
    # A member cannot change roles, not even their own.
    resp = client.patch(f"{base}/{acme['member']}", json={"role": "admin"}, headers=h(acme["member"]))
    assert resp.status_code == 403
    # Demoting or removing the last admin is a 409.
    resp = client.patch(f"{base}/{acme['admin']}", json={"role": "member"}, headers=h(acme["admin"]))
    assert resp.status_code == 409 and resp.get_json()["error"] == "last_admin"
    resp = client.delete(f"{base}/{acme['admin']}", headers=h(acme["admin"]))
    assert resp.status_code == 409
    # Promote someone, then the first admin may step down.
    assert client.patch(f"{base}/{acme['member']}", json={"role": "admin"}, headers=h(acme["admin"])).status_code == 200
    resp = client.patch(f"{base}/{acme['admin']}", json={"role": "viewer"}, headers=h(acme["admin"]))
    assert resp.status_code == 200 and resp.get_json()["previous_role"] == "admin"
    # Bad input.
    assert client.patch(f"{base}/not-a-uuid", json={"role": "admin"}, headers=h(acme["member"])).status_code == 400
    assert client.patch(f"{base}/{acme['viewer']}", json={"role": "owner"},
                        headers=h(acme["member"])).get_json()["field"] == "role"
    resp = client.patch(f"{base}/{acme['outsider']}", json={"role": "admin"}, headers=h(acme["member"]))
    assert resp.status_code == 404 and resp.get_json()["error"] == "member_not_found"


def test_member_leaves_and_admin_removes(client, acme, conn):
    conn.execute("update public.profiles set default_org_id = %s where id = %s", (acme["org"], acme["viewer"]))
    assert client.delete(f"/api/orgs/acme/members/{acme['viewer']}", headers=h(acme["viewer"])).status_code == 200
    assert conn.execute("select default_org_id from public.profiles where id = %s",
                        (acme["viewer"],)).fetchone()["default_org_id"] is None
    assert client.delete(f"/api/orgs/acme/members/{acme['admin']}", headers=h(acme["member"])).status_code == 403
    assert client.delete(f"/api/orgs/acme/members/{acme['member']}", headers=h(acme["admin"])).status_code == 200


def test_invite_flow(client, acme, world, conn):
    resp = client.post("/api/orgs/acme/invites", json={"email": "New@Acme.test", "role": "viewer"},
                       headers=h(acme["admin"]))
    assert resp.status_code == 201
    invite = resp.get_json()
    token = invite["token"]
    assert token.startswith("upi_")
    pending = client.get("/api/orgs/acme/invites", headers=h(acme["admin"])).get_json()["data"]
    assert [i["email"] for i in pending] == ["new@acme.test"] and "token" not in pending[0]
    assert client.get("/api/orgs/acme/invites", headers=h(acme["member"])).status_code == 403
    # The wrong person cannot use it.
    resp = client.post("/api/invites/accept", json={"token": token}, headers=h(acme["outsider"]))
    assert resp.status_code == 403 and resp.get_json()["error"] == "invite_email_mismatch"
    newbie = world.user("new@acme.test")
    resp = client.post("/api/invites/accept", json={"token": token}, headers=h(newbie))
    assert resp.status_code == 200 and resp.get_json()["role"] == "viewer"
    again = client.post("/api/invites/accept", json={"token": token}, headers=h(newbie))
    assert again.status_code == 409 and again.get_json()["error"] == "invite_used"
    unknown = client.post("/api/invites/accept", json={"token": "upi_" + "f" * 64}, headers=h(newbie))
    assert unknown.status_code == 404
    # Only hashes are stored.
    assert conn.execute("select count(*) as n from public.org_invites where token_hash = %s",
                        (token,)).fetchone()["n"] == 0


def test_invite_expired_and_revoked(client, acme, world, conn):
    later = world.user("later@acme.test")
    inv = client.post("/api/orgs/acme/invites", json={"email": "later@acme.test"}, headers=h(acme["admin"])).get_json()
    conn.execute("update public.org_invites set expires_at = now() - interval '1 s' where id = %s", (inv["id"],))
    resp = client.post("/api/invites/accept", json={"token": inv["token"]}, headers=h(later))
    assert resp.status_code == 409 and resp.get_json()["error"] == "invite_expired"
    inv2 = client.post("/api/orgs/acme/invites", json={"email": "later@acme.test"}, headers=h(acme["admin"])).get_json()
    assert client.delete(f"/api/orgs/acme/invites/{inv2['id']}", headers=h(acme["admin"])).status_code == 200
    resp = client.post("/api/invites/accept", json={"token": inv2["token"]}, headers=h(later))
    assert resp.status_code == 409 and resp.get_json()["error"] == "invite_revoked"
    assert client.delete(f"/api/orgs/acme/invites/{inv2['id']}", headers=h(acme["admin"])).status_code == 404


def test_api_keys_lifecycle(client, acme, conn):
    resp = client.post("/api/api-keys", json={"name": "laptop", "org_id": "acme"}, headers=h(acme["member"]))
    assert resp.status_code == 201
    key = resp.get_json()
    assert key["kind"] == "personal" and key["org_id"] == acme["org"] and key["prefix"] == key["secret"][:12]
    # A member may not create a service key; an admin may.
    resp = client.post("/api/api-keys", json={"name": "ci", "kind": "service", "org_id": "acme"},
                       headers=h(acme["member"]))
    assert resp.status_code == 403
    svc = client.post("/api/api-keys", json={"name": "ci", "kind": "service", "org_id": "acme"},
                      headers=h(acme["admin"])).get_json()
    assert svc["secret"].startswith("ups_")
    missing_org = client.post("/api/api-keys", json={"name": "ci", "kind": "service"}, headers=h(acme["admin"]))
    assert missing_org.status_code == 400
    # Listing never shows secrets; admins see their orgs' service keys.
    admin_keys = client.get("/api/api-keys", headers=h(acme["admin"])).get_json()["data"]
    assert [k["name"] for k in admin_keys] == ["ci"] and all("secret" not in k for k in admin_keys)
    member_keys = client.get("/api/api-keys", headers=h(acme["member"])).get_json()["data"]
    assert [k["name"] for k in member_keys] == ["laptop"]
    # Revocation: the owner, or an org admin for service keys; others see 404.
    assert client.delete(f"/api/api-keys/{key['id']}", headers=h(acme["admin"])).status_code == 404
    assert client.delete(f"/api/api-keys/{svc['id']}", headers=h(acme["member"])).status_code == 404
    assert client.delete(f"/api/api-keys/{svc['id']}", headers=h(acme["admin"])).status_code == 200
    assert client.get("/api/me", headers=bearer(svc["secret"])).status_code == 401
    assert client.delete(f"/api/api-keys/{key['id']}", headers=h(acme["member"])).status_code == 200
    past = client.post("/api/api-keys", json={"name": "old", "expires_at": "2020-01-01T00:00:00Z"},
                       headers=h(acme["member"]))
    assert past.status_code == 400 and past.get_json()["error"] == "invalid_expires_at"


def test_key_plaintext_exists_nowhere_in_the_database_or_logs(client, acme, conn, caplog):
    with caplog.at_level(logging.DEBUG):
        key = client.post("/api/api-keys", json={"name": "k", "kind": "service", "org_id": "acme"},
                          headers=h(acme["admin"])).get_json()
        client.get("/api/me", headers=bearer(key["secret"]))
    secret = key["secret"]
    assert secret not in caplog.text
    tables = conn.execute(
        "select format('%I.%I', table_schema, table_name) as t from information_schema.tables"
        " where table_schema not in ('pg_catalog', 'information_schema', 'supabase_migrations')"
        " and table_type = 'BASE TABLE'").fetchall()
    assert len(tables) >= 5
    for t in tables:
        hits = conn.execute(
            f"select count(*) as n from {t['t']} x where strpos(row_to_json(x)::text, %s) > 0",
            (secret[4:20],)).fetchone()["n"]
        assert hits == 0, t
    import hashlib
    stored = conn.execute("select key_hash from public.api_keys where id = %s", (key["id"],)).fetchone()
    assert stored["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()


def test_me_and_default_org(client, acme):
    me = client.get("/api/me", headers=h(acme["member"])).get_json()
    assert me["credit_balance"] == 10 and me["plan"] == "free" and me["default_org"] is None
    assert [m["slug"] for m in me["memberships"]] == ["acme"]
    resp = client.put("/api/me/default-org", json={"org_id": "acme"}, headers=h(acme["member"]))
    assert resp.status_code == 200 and resp.get_json()["default_org"]["slug"] == "acme"
    resp = client.put("/api/me/default-org", json={"org_id": "other"}, headers=h(acme["member"]))
    assert resp.status_code == 403
    resp = client.put("/api/me/default-org", json={"org_id": None}, headers=h(acme["member"]))
    assert resp.get_json()["default_org"] is None


# --- isolation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", "/api/orgs/other", None, id="read_org"),
        pytest.param("PATCH", "/api/orgs/other", {"name": "pwned"}, id="rename_org"),
        pytest.param("GET", "/api/orgs/other/members", None, id="read_members"),
        pytest.param("PATCH", "/api/orgs/other/members/{outsider}", {"role": "viewer"}, id="change_member"),
        pytest.param("DELETE", "/api/orgs/other/members/{outsider}", None, id="remove_member"),
        pytest.param("GET", "/api/orgs/other/invites", None, id="read_invites"),
        pytest.param("POST", "/api/orgs/other/invites", {"email": "x@y.test"}, id="create_invite"),
        pytest.param("POST", "/api/api-keys", {"name": "k", "kind": "service", "org_id": "other"}, id="service_key"),
        pytest.param("POST", "/api/api-keys", {"name": "k", "org_id": "other"}, id="bound_key"),
    ],
)
def test_member_of_one_org_cannot_touch_another_through_api(client, acme, conn, method, path, body):
    before = conn.execute("select (select count(*) from public.org_members) + (select count(*) from"
                          " public.org_invites) + (select count(*) from public.api_keys) as n").fetchone()["n"]
    resp = client.open(path.format(**acme), method=method, json=body, headers=h(acme["admin"]))
    assert resp.status_code == 403, resp.get_json()
    assert resp.get_json()["error"] == "org_forbidden"
    after = conn.execute("select (select count(*) from public.org_members) + (select count(*) from"
                         " public.org_invites) + (select count(*) from public.api_keys) as n").fetchone()["n"]
    assert after == before
    assert conn.execute("select name from public.orgs where slug = 'other'").fetchone()["name"] == "Other"


def test_member_of_one_org_cannot_touch_another_in_sql(as_role, acme, world):
    world.key(acme["outsider"], kind="service", org=acme["other"])
    with as_role("authenticated", acme["admin"]) as cur:
        assert cur.execute("select id from public.org_invites where org_id = %s", (acme["other"],)).fetchall() == []
        assert cur.execute("select id from public.api_keys where org_id = %s", (acme["other"],)).fetchall() == []
        assert cur.execute("select * from public.org_members where org_id = %s", (acme["other"],)).fetchall() == []
    for sql in ["insert into public.org_invites (org_id, email, role, token_hash) values (%s, 'a@b.c', 'admin', 'x')",
                "update public.api_keys set revoked_at = now() where org_id = %s",
                "delete from public.org_members where org_id = %s"]:
        with as_role("authenticated", acme["admin"]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute(sql, (acme["other"],))
    with as_role("authenticated", acme["admin"]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("select key_hash from public.api_keys")
    with as_role("authenticated", acme["admin"]) as cur, pytest.raises(psycopg.Error) as err:
        cur.execute("select public.set_member_role('other', %s, 'viewer')", (acme["outsider"],))
    assert err.value.diag.sqlstate == "PT403"


# --- org context ----------------------------------------------------------------------------


def _context(as_role, user_id, explicit=None, **claims):
    with as_role("authenticated", user_id, **claims) as cur:
        row = cur.execute("select public.resolve_org(%s) as r", (explicit,)).fetchone()["r"]
    return None if row is None else (row["slug"], row["source"])


def test_org_context_order(as_role, acme, world, conn):
    member = acme["member"]
    second = world.org("second", admin=acme["admin"])
    world.member(second, member, "member")
    key = world.key(member, org=second)
    key_claims = {"upshift": {"key_id": key["id"], "kind": "personal", "org_id": second}}
    # No explicit org, no key binding, no default: personal.
    assert _context(as_role, member) is None
    # Default org.
    conn.execute("update public.profiles set default_org_id = %s where id = %s", (acme["org"], member))
    assert _context(as_role, member) == ("acme", "default_org")
    # The key's org beats the default.
    assert _context(as_role, member, **key_claims) == ("second", "api_key")
    # An explicit org (id or slug) beats both.
    assert _context(as_role, member, "acme", **key_claims) == ("acme", "explicit")
    assert _context(as_role, member, acme["org"], **key_claims) == ("acme", "explicit")
    # An explicit org the caller does not belong to is a 403, not a fallback.
    for explicit in ("other", "no-such-org", acme["other"]):
        with as_role("authenticated", member) as cur, pytest.raises(psycopg.Error) as err:
            cur.execute("select public.resolve_org(%s)", (explicit,))
        assert err.value.diag.sqlstate == "PT403"
    # A stale default (the member left) falls back to personal.
    conn.execute("delete from public.org_members where org_id = %s and user_id = %s", (acme["org"], member))
    assert _context(as_role, member) is None


def test_service_key_context_is_its_org_only(as_role, acme, world):
    key = world.key(acme["admin"], kind="service", org=acme["org"])
    claims = {"upshift": {"key_id": key["id"], "kind": "service", "org_id": acme["org"]}}
    assert _context(as_role, None, **claims) == ("acme", "api_key")
    with as_role("authenticated", None, **claims) as cur, pytest.raises(psycopg.Error) as err:
        cur.execute("select public.resolve_org('other')")
    assert err.value.diag.sqlstate == "PT403"
    # Forged claims naming a key that does not exist grant nothing.
    forged = {"upshift": {"key_id": "00000000-0000-4000-8000-000000000000", "kind": "service", "org_id": acme["org"]}}
    with as_role("authenticated", None, **forged) as cur, pytest.raises(psycopg.Error) as err:
        cur.execute("select public.resolve_org(null)")
    assert err.value.diag.sqlstate == "PT403"
