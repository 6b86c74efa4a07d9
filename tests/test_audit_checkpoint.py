"""Signed audit checkpoints: removing the newest audit rows is detectable by whoever kept one.

Signatures are checked here with ``cryptography`` directly, from the published public key and
the canonical payload as docs/api.md describes it, not through ``upshift_platform.signing``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import psycopg
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.conftest import TEST_JWT_SECRET, acting_as, age_audit_logs, bearer, make_token

SEED = bytes(range(32))
SEED_B64 = base64.b64encode(SEED).decode()
ZERO = "0" * 64
SIGNED = ("format", "scope_id", "org_id", "seq", "hash", "signed_at", "key_id")
UPGRADE = {"event_type": "upgrade", "resource_type": "package", "resource_id": "is-number",
           "metadata": {"from_version": "6.0.0", "to_version": "7.0.0", "outcome": "success"}, "org_id": "acme"}
CLI = {"Content-Type": "application/json", "User-Agent": "node"}


@pytest.fixture
def settings(db_url):
    from upshift_platform.settings import Settings

    return Settings.from_env({"DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
                              "UPSHIFT_DB_POOL_MAX": "4", "UPSHIFT_AUDIT_SIGNING_KEY": SEED_B64})


@pytest.fixture
def acme(world):
    acme = world.team(balance=100, outsider=True)
    return {**acme, "ci_key": world.key(acme["admin"], kind="service", org=acme["org"])}


def post(client, acme, events):
    resp = client.post("/audit-events", json={"events": events}, headers={**CLI, **bearer(acme["ci_key"]["secret"])})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["events"]


def get(client, url, user):
    return client.get(url, headers=bearer(make_token(user)))


def take(client, user, org="acme"):
    resp = get(client, "/api/audit-logs/checkpoint" + (f"?org_id={org}" if org else ""), user)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def check(client, user, cp, org="acme"):
    qs = f"checkpoint_seq={cp['seq']}&checkpoint_hash={cp['hash']}" + (f"&org_id={org}" if org else "")
    resp = get(client, f"/api/audit-logs/verify?{qs}", user)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def plain_verify(client, user, org="acme"):
    return get(client, "/api/audit-logs/verify" + (f"?org_id={org}" if org else ""), user).get_json()


def payload(cp):
    """The canonical serialization, written out independently of upshift_platform.signing."""
    return json.dumps({k: cp[k] for k in SIGNED}, sort_keys=True, separators=(",", ":")).encode()


def published_key(client) -> Ed25519PublicKey:
    body = client.get("/api/audit-logs/public-key").get_json()
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(body["public_key"]))


def is_valid(key: Ed25519PublicKey, cp) -> bool:
    try:
        key.verify(base64.urlsafe_b64decode(cp["signature"]), payload(cp))
    except InvalidSignature:
        return False
    return True


def head(conn, scope):
    return conn.execute("select seq, encode(hash, 'hex') as hash from public.audit_logs where scope_id = %s"
                        " order by seq desc limit 1", (scope,)).fetchone()


def superuser_delete(conn, sql, *params):
    """What an attacker with superuser rights does: switch the append-only trigger off, delete, switch it on."""
    with conn.transaction():
        conn.execute("alter table public.audit_logs disable trigger audit_logs_no_delete")
        conn.execute(sql, params)
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_delete")


def superuser_update(conn, sql, *params):
    with conn.transaction():
        conn.execute("alter table public.audit_logs disable trigger audit_logs_no_update")
        conn.execute(sql, params)
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")


# --- the public key and the signature ---------------------------------------------------------


def test_public_key_needs_no_auth_and_is_the_configured_key(client):
    resp = client.get("/api/audit-logs/public-key")
    assert resp.status_code == 200
    body = resp.get_json()
    raw = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
    assert body["algorithm"] == "Ed25519" and base64.b64decode(body["public_key"]) == raw
    assert load_pem_public_key(body["public_key_pem"].encode()).public_bytes_raw() == raw
    assert body["key_id"] == hashlib.sha256(raw).hexdigest()[:16]


def test_checkpoint_is_the_head_and_its_signature_verifies(client, conn, acme):
    post(client, acme, [UPGRADE] * 3)
    cp = take(client, acme["viewer"])
    row = head(conn, acme["org"])
    assert cp["seq"] == row["seq"] and cp["hash"] == row["hash"]
    assert cp["scope_id"] == acme["org"] and cp["org_id"] == acme["org"]
    assert cp["algorithm"] == "Ed25519" and cp["format"] == "upshift.audit-checkpoint.v1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cp["signed_at"])
    assert cp["key_id"] == client.get("/api/audit-logs/public-key").get_json()["key_id"]
    assert is_valid(published_key(client), cp)
    # The PEM form checks it as well.
    pem = load_pem_public_key(client.get("/api/audit-logs/public-key").get_json()["public_key_pem"].encode())
    pem.verify(base64.urlsafe_b64decode(cp["signature"]), payload(cp))


@pytest.mark.parametrize(("field", "value"), [
    ("seq", 1), ("hash", "f" * 64), ("signed_at", "2030-01-01T00:00:00Z"), ("scope_id", "00000000-0000-0000-0000-000000000000"),
    ("org_id", None), ("key_id", "0123456789abcdef"), ("format", "upshift.audit-checkpoint.v2"),
])
def test_tampered_checkpoint_fails_to_verify(client, acme, field, value):
    post(client, acme, [UPGRADE] * 3)
    cp = take(client, acme["admin"])
    key = published_key(client)
    assert is_valid(key, cp)
    assert cp[field] != value
    assert not is_valid(key, {**cp, field: value})


def test_checkpoint_signed_by_another_key_fails(client, acme):
    cp = take(client, acme["admin"])
    other = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    forged = {**cp, "signature": base64.urlsafe_b64encode(other.sign(payload(cp))).decode()}
    assert is_valid(published_key(client), cp) and not is_valid(published_key(client), forged)


def test_empty_personal_log_is_seq_0_and_the_zero_hash(client, world):
    user = world.user()
    cp = take(client, user, org=None)
    assert (cp["scope_id"], cp["org_id"], cp["seq"], cp["hash"]) == (user, None, 0, ZERO)
    assert is_valid(published_key(client), cp)
    body = check(client, user, cp, org=None)
    assert body["ok"] is True and body["checkpoint"]["status"] == "confirmed"


# --- verify with a checkpoint -----------------------------------------------------------------


def test_checkpoint_then_more_events_verifies(client, acme):
    post(client, acme, [UPGRADE] * 2)
    cp = take(client, acme["admin"])
    post(client, acme, [UPGRADE] * 3)
    body = check(client, acme["admin"], cp)
    assert body["ok"] is True and body["checkpoint"]["status"] == "confirmed"
    assert body["head_seq"] == cp["seq"] + 3 and body["checkpoint"]["seq"] == cp["seq"]


def test_tail_truncation_is_detected_only_with_a_checkpoint(client, conn, acme):
    post(client, acme, [UPGRADE] * 3)
    cp = take(client, acme["admin"])
    post(client, acme, [UPGRADE] * 2)
    # The attack: delete the newest rows, from the checkpoint's row on.
    superuser_delete(conn, "delete from public.audit_logs where scope_id = %s and seq >= %s", acme["org"], cp["seq"] - 1)
    assert conn.execute("select tgenabled from pg_trigger where tgname = 'audit_logs_no_delete'"
                        ).fetchone()["tgenabled"] == "A"  # the trigger is back, firing always
    plain = plain_verify(client, acme["admin"])
    assert plain["ok"] is True and plain["head_seq"] == cp["seq"] - 2  # a shorter chain still verifies
    body = check(client, acme["admin"], cp)
    assert body["ok"] is False and body["reason"] == "checkpoint_missing"
    assert body["checkpoint"]["status"] == "missing" and body["first_bad_seq"] == cp["seq"] - 1
    assert f"row {cp['seq']}" in body["message"] and "removed" in body["message"]
    # New events take the deleted sequence numbers: the row is back with another hash.
    post(client, acme, [UPGRADE] * 4)
    assert plain_verify(client, acme["admin"])["ok"] is True
    body = check(client, acme["admin"], cp)
    assert body["ok"] is False and body["reason"] == "checkpoint_mismatch"
    assert body["checkpoint"]["found_hash"] != cp["hash"]


def test_rewritten_checkpoint_row_is_a_mismatch(client, conn, acme):
    post(client, acme, [UPGRADE] * 3)
    cp = take(client, acme["admin"])
    # Change the head row and recompute its hash: the chain alone cannot tell.
    superuser_update(conn, "update public.audit_logs set resource_id = 'evil' where scope_id = %s and seq = %s",
                     acme["org"], cp["seq"])
    superuser_update(conn, "update public.audit_logs l set hash = private.audit_hash(l) where scope_id = %s and seq = %s",
                     acme["org"], cp["seq"])
    assert plain_verify(client, acme["admin"])["ok"] is True
    body = check(client, acme["admin"], cp)
    assert body["ok"] is False and body["reason"] == "checkpoint_mismatch" and body["first_bad_seq"] == cp["seq"]
    assert body["checkpoint"]["status"] == "mismatch" and "changed or replaced" in body["message"]


def test_edited_checkpoint_row_breaks_the_chain(client, conn, acme):
    post(client, acme, [UPGRADE] * 3)
    cp = take(client, acme["admin"])
    post(client, acme, [UPGRADE])
    superuser_update(conn, "update public.audit_logs set resource_id = 'evil' where scope_id = %s and seq = %s",
                     acme["org"], cp["seq"])
    body = check(client, acme["admin"], cp)  # the stored hash still matches; the content does not
    assert body["ok"] is False and body["reason"] == "content_mismatch" and body["first_bad_seq"] == cp["seq"]
    assert body["checkpoint"]["status"] == "confirmed"
    superuser_update(conn, "update public.audit_logs l set hash = private.audit_hash(l) where scope_id = %s and seq = %s",
                     acme["org"], cp["seq"])
    body = check(client, acme["admin"], cp)  # rehashed: the next link breaks, and the checkpoint no longer matches
    assert body["ok"] is False and body["reason"] == "checkpoint_mismatch"
    assert body["chain_reason"] == "broken_link" and body["first_bad_seq"] == cp["seq"] + 1


def test_checkpoints_and_the_retention_purge(client, conn, acme):
    post(client, acme, [UPGRADE] * 2)
    old = take(client, acme["admin"])
    post(client, acme, [UPGRADE] * 2)
    at_purge = take(client, acme["admin"])
    cut = conn.execute("select clock_timestamp() as t").fetchone()["t"]
    post(client, acme, [UPGRADE])
    age_audit_logs(conn, acme["org"], 366, until=cut)  # a year passes for everything up to at_purge
    with acting_as(conn, "service_role", commit=True) as cur:
        cur.execute("select public.purge_audit_logs()")
    purged_through = conn.execute("select seq from public.audit_checkpoints where scope_id = %s",
                                  (acme["org"],)).fetchone()["seq"]
    assert purged_through == at_purge["seq"]
    body = check(client, acme["admin"], old)
    assert body["ok"] is True and body["checkpoint"]["status"] == "purged"
    assert body["checkpoint"]["purged_through"] == purged_through and "retention" in body["checkpoint"]["message"]
    assert body["retention_checkpoint"]["seq"] == purged_through
    body = check(client, acme["admin"], at_purge)
    assert body["ok"] is True and body["checkpoint"]["status"] == "confirmed"
    body = check(client, acme["admin"], {**at_purge, "hash": "ab" * 32})
    assert body["ok"] is False and body["reason"] == "checkpoint_mismatch"


def test_after_a_purge_the_log_goes_on_from_the_retention_checkpoint(client, conn, acme):
    post(client, acme, [UPGRADE] * 2)
    before = take(client, acme["admin"])
    age_audit_logs(conn, acme["org"], 3650)
    with acting_as(conn, "service_role", commit=True) as cur:
        cur.execute("select public.purge_audit_logs()")
    rows = conn.execute("select seq, prev_hash, event_type from public.audit_logs where scope_id = %s",
                        (acme["org"],)).fetchall()
    assert [(r["seq"], r["prev_hash"].hex(), r["event_type"]) for r in rows] == [
        (before["seq"] + 1, before["hash"], "audit_purged")]
    assert check(client, acme["admin"], before)["checkpoint"]["status"] == "confirmed"
    cp = take(client, acme["admin"])
    assert cp["seq"] == before["seq"] + 1
    assert check(client, acme["admin"], cp)["ok"] is True


# --- access and configuration ---------------------------------------------------------------


@pytest.mark.parametrize(("who", "status", "code"), [
    ("member", 403, "audit_role_required"), ("outsider", 403, "org_forbidden"),
])
def test_checkpoint_access_is_verify_access(client, acme, who, status, code):
    qs = f"checkpoint_seq=1&checkpoint_hash={ZERO}&org_id=acme"
    for url in ("/api/audit-logs/checkpoint?org_id=acme", f"/api/audit-logs/verify?{qs}", "/api/audit-logs/verify?org_id=acme"):
        resp = get(client, url, acme[who])
        assert resp.status_code == status and resp.get_json()["error"] == code, url


def test_checkpoint_other_callers(client, conn, acme):
    ci = client.get("/api/audit-logs/checkpoint?org_id=acme", headers=bearer(acme["ci_key"]["secret"]))
    assert ci.status_code == 403
    assert client.get("/api/audit-logs/checkpoint?org_id=acme").status_code == 401
    assert take(client, acme["viewer"])["scope_id"] == acme["org"]
    conn.execute("update public.orgs set plan = 'pro' where id = %s", (acme["org"],))
    pro = get(client, "/api/audit-logs/checkpoint?org_id=acme", acme["admin"])
    assert pro.status_code == 403 and pro.get_json()["error"] == "team_plan_required"
    mine = take(client, acme["member"], org=None)  # personal log: always readable by its owner
    assert mine["scope_id"] == acme["member"] and mine["org_id"] is None


@pytest.mark.parametrize("rpc", ["audit_head(null)", f"verify_audit_checkpoint(0, '{ZERO}')"])
def test_head_rpcs_are_for_authenticated_callers_only(conn, acme, rpc):
    for role in ("anon", "service_role"):
        with acting_as(conn, role), pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select public.{rpc}")
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": acme["member"]}) as cur:
        cur.execute(f"select public.{rpc}")


def test_missing_signing_key_is_503(db_url, acme):
    from upshift_platform.app import Platform, create_wsgi_app
    from upshift_platform.settings import Settings

    plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET))
    try:
        c = create_wsgi_app(plat).test_client()
        for url in ("/api/audit-logs/checkpoint?org_id=acme", "/api/audit-logs/public-key"):
            resp = get(c, url, acme["admin"])
            assert resp.status_code == 503, url
            body = resp.get_json()
            assert body["error"] == "signing_not_configured" and "UPSHIFT_AUDIT_SIGNING_KEY" in body["message"]
        assert plain_verify(c, acme["admin"])["ok"] is True  # the rest works
        assert get(c, f"/api/audit-logs/verify?org_id=acme&checkpoint_seq=0&checkpoint_hash={ZERO}",
                   acme["admin"]).status_code == 200
    finally:
        plat.close()


@pytest.mark.parametrize(("qs", "code", "field"), [
    ("checkpoint_seq=3", "checkpoint_incomplete", "checkpoint_hash"),
    (f"checkpoint_hash={ZERO}", "checkpoint_incomplete", "checkpoint_seq"),
    # Values are the RPC's to judge (the same codes as test_the_rpc_checks_its_own_input); malformed
    # numbers are refused before it.
    ("checkpoint_seq=3&checkpoint_hash=abc", "invalid_checkpoint_hash", "checkpoint_hash"),
    (f"checkpoint_seq=3&checkpoint_hash={'g' * 64}", "invalid_checkpoint_hash", "checkpoint_hash"),
    (f"checkpoint_seq=-1&checkpoint_hash={ZERO}", "invalid_checkpoint_seq", "checkpoint_seq"),
    (f"checkpoint_seq=x&checkpoint_hash={ZERO}", "invalid_request", "checkpoint_seq"),
    (f"checkpoint_seq=99999999999999999999&checkpoint_hash={ZERO}", "invalid_request", "checkpoint_seq"),
])
def test_bad_checkpoint_parameters_are_400(client, acme, qs, code, field):
    resp = get(client, f"/api/audit-logs/verify?org_id=acme&{qs}", acme["admin"])
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == code and resp.get_json()["field"] == field


def test_checkpoint_rejects_unknown_parameters(client, acme):
    resp = get(client, "/api/audit-logs/checkpoint?org_id=acme&seq=3", acme["admin"])
    assert resp.status_code == 400 and resp.get_json()["field"] == "seq"


@pytest.mark.parametrize(("sql", "code"), [
    ("select public.verify_audit_checkpoint(null, null, 'acme')", "checkpoint_incomplete"),
    ("select public.verify_audit_checkpoint(-1, repeat('0', 64), 'acme')", "invalid_checkpoint_seq"),
    ("select public.verify_audit_checkpoint(1, 'zz', 'acme')", "invalid_checkpoint_hash"),
])
def test_the_rpc_checks_its_own_input(conn, acme, sql, code):
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": acme["admin"]}) as cur, \
            pytest.raises(psycopg.Error) as err:
        cur.execute(sql)
    assert err.value.diag.sqlstate == "PT400" and json.loads(err.value.diag.message_detail)["error"] == code


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode(), base64.b64encode(SEED * 2).decode()])
def test_malformed_signing_key_fails_at_startup_without_echoing_it(db_url, value):
    from upshift_platform.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as err:
        Settings.from_env({"DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": "x" * 40, "UPSHIFT_AUDIT_SIGNING_KEY": value})
    assert "UPSHIFT_AUDIT_SIGNING_KEY" in str(err.value) and value not in str(err.value)


def test_settings_never_show_the_signing_key(settings):
    assert settings.audit_signing_key is not None
    assert SEED_B64 not in repr(settings) and repr(SEED) not in repr(settings)
    assert settings.audit_signing_key.key_id in repr(settings)


def test_the_snippet_in_the_docs_checks_a_checkpoint(client, acme):
    from upshift_platform.paths import project_root

    doc = (project_root() / "docs" / "api.md").read_text().split("## Checkpoints", 1)[1]
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, "docs/api.md", "exec"), scope)
    cp = take(client, acme["admin"])
    public = client.get("/api/audit-logs/public-key").get_json()["public_key"]
    scope["check_checkpoint"](cp, public)
    with pytest.raises(InvalidSignature):
        scope["check_checkpoint"]({**cp, "seq": cp["seq"] - 1}, public)
    with pytest.raises(ValueError, match="another key"):
        other = base64.b64encode(Ed25519PrivateKey.from_private_bytes(b"\x03" * 32).public_key().public_bytes_raw())
        scope["check_checkpoint"](cp, other.decode())
