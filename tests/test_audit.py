"""Audit logs: append-only storage, tamper evidence, retention, ingest, query, export, verify."""

from __future__ import annotations

import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import acting_as, age_audit_logs, bearer, claims_for, make_token

UPGRADE = {"event_type": "upgrade", "resource_type": "package", "resource_id": "is-number",
           "metadata": {"from_version": "6.0.0", "to_version": "7.0.0", "outcome": "success"},
           "org_id": "acme", "timestamp": "2026-11-25T08:13:58.336Z"}
FIX = {"event_type": "fix", "resource_type": "package", "resource_id": "lodash",
       "metadata": {"applied": True, "fix_count": 2, "from_version": "4.17.20", "to_version": "4.17.21"},
       "org_id": "acme", "timestamp": "2026-11-25T08:14:00Z"}
SCAN = {"event_type": "scan_upload", "resource_type": "report", "resource_id": None,
        "metadata": {"outdated_count": 7, "cwd": "/home/dev/app"}, "org_id": "acme",
        "timestamp": "2026-11-25T08:15:00.000Z"}
CLI = {"Content-Type": "application/json", "User-Agent": "node"}


@pytest.fixture
def acme(world):
    acme = world.team(balance=100, outsider=True)
    return {**acme, "member_key": world.key(acme["member"], org=acme["org"]),
            "ci_key": world.key(acme["admin"], kind="service", org=acme["org"])}


def post(client, token, body, **headers):
    return client.post("/audit-events", json=body, headers={**CLI, **bearer(token), **headers})


def org_rows(conn, org_id):
    return conn.execute("select * from public.audit_logs where scope_id = %s order by seq", (org_id,)).fetchall()


def verify(conn, org="acme"):
    return conn.execute("select public.admin_verify_audit_log(%s) as r", (org,)).fetchone()["r"]


# --- ingest ----------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [UPGRADE, FIX, SCAN], ids=["upgrade", "fix", "scan_upload"])
@pytest.mark.parametrize("key", ["member_key", "ci_key"])
def test_cli_events_are_recorded_with_actor_ip_and_agent(client, conn, acme, event, key):
    resp = post(client, acme[key]["secret"], event)
    assert resp.status_code == 201, resp.get_json()
    out = resp.get_json()
    assert out["count"] == 1 and out["replayed"] is False
    row = conn.execute("select * from public.audit_logs where id = %s", (out["events"][0]["id"],)).fetchone()
    assert row["seq"] == out["events"][0]["seq"]
    assert str(row["org_id"]) == acme["org"] and row["event_type"] == event["event_type"]
    assert row["metadata"] == event["metadata"] and row["user_agent"] == "node"
    assert str(row["ip"]) == "127.0.0.1"
    assert row["client_timestamp"] is not None
    if key == "ci_key":
        assert row["actor_kind"] == "service_key" and str(row["service_key_id"]) == acme["ci_key"]["id"]
        assert row["user_id"] is None
    else:
        assert row["actor_kind"] == "user" and str(row["user_id"]) == acme["member"]


def test_actor_comes_from_the_token_not_the_body(client, conn, acme):
    body = {**UPGRADE, "user_id": acme["admin"], "actor_kind": "system", "service_key_id": acme["ci_key"]["id"]}
    out = post(client, acme["member_key"]["secret"], body).get_json()
    row = conn.execute("select * from public.audit_logs where id = %s", (out["events"][0]["id"],)).fetchone()
    assert str(row["user_id"]) == acme["member"] and row["actor_kind"] == "user"


def test_batch_of_events_gets_consecutive_sequence_numbers(client, acme):
    resp = post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX, SCAN] * 3})
    assert resp.status_code == 201
    seqs = [e["seq"] for e in resp.get_json()["events"]]
    assert seqs == list(range(seqs[0], seqs[0] + 9))


def test_scope_rules(client, conn, acme, world):
    # personal scope: no org anywhere, JWT user
    body = {k: v for k, v in UPGRADE.items() if k != "org_id"}
    out = post(client, make_token(acme["member"]), body).get_json()["events"][0]
    assert out["org_id"] is None and out["scope_id"] == acme["member"]
    # viewer: 403
    viewer_key = world.key(acme["viewer"], org=acme["org"])["secret"]
    resp = post(client, viewer_key, UPGRADE)
    assert resp.status_code == 403 and resp.get_json()["error"] == "cannot_write_audit"
    # another org: 403
    resp = post(client, acme["member_key"]["secret"], {**UPGRADE, "org_id": "other"})
    assert resp.status_code == 403
    # service key naming another org: 403
    resp = post(client, acme["ci_key"]["secret"], {**UPGRADE, "org_id": "other"})
    assert resp.status_code == 403
    # org by id works too
    resp = post(client, acme["ci_key"]["secret"], {**UPGRADE, "org_id": acme["org"]})
    assert resp.status_code == 201


BAD = [
    pytest.param({**UPGRADE, "event_type": None}, 400, "invalid_request", id="missing_event_type"),
    pytest.param({**UPGRADE, "event_type": "Upgrade!"}, 400, "invalid_event_type", id="bad_event_type"),
    pytest.param({**UPGRADE, "event_type": "credit_debit"}, 400, "reserved_event_type", id="platform_type"),
    pytest.param({k: v for k, v in UPGRADE.items() if k != "resource_type"}, 400, "invalid_request",
                 id="missing_resource_type"),
    pytest.param({**UPGRADE, "metadata": [1]}, 400, "invalid_request", id="metadata_not_object"),
    pytest.param({**UPGRADE, "metadata": {"x": "y" * 17000}}, 413, "metadata_too_large", id="metadata_too_big"),
    pytest.param({**UPGRADE, "metadata": {"from_version": "1"}}, 400, "invalid_metadata", id="upgrade_missing"),
    pytest.param({**FIX, "metadata": {**FIX["metadata"], "fix_count": -1}}, 400, "invalid_metadata",
                 id="fix_negative_count"),
    pytest.param({**FIX, "metadata": {**FIX["metadata"], "applied": "yes"}}, 400, "invalid_metadata",
                 id="fix_applied_not_bool"),
    pytest.param({**SCAN, "metadata": {"cwd": "/x"}}, 400, "invalid_metadata", id="scan_missing_count"),
    pytest.param({**UPGRADE, "timestamp": "yesterday"}, 400, "invalid_timestamp", id="bad_timestamp"),
    pytest.param({**UPGRADE, "timestamp": "2026-13-45T00:00:00Z"}, 400, "invalid", id="impossible_date"),
    pytest.param({"events": []}, 400, "invalid_request", id="empty_batch"),
    pytest.param({"events": [UPGRADE] * 501}, 400, "too_many_events", id="batch_too_big"),
    pytest.param({"events": [UPGRADE, {**FIX, "event_type": "credit_debit"}]}, 400, "reserved_event_type",
                 id="one_bad_in_batch"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD)
def test_bad_events_are_rejected_whole_and_logged(client, conn, acme, body, status, code, caplog):
    before = conn.execute("select count(*) as n from public.audit_logs").fetchone()["n"]
    resp = post(client, acme["member_key"]["secret"], body)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"] == code
    assert conn.execute("select count(*) as n from public.audit_logs").fetchone()["n"] == before
    assert "audit_event_rejected" in caplog.text
    assert acme["member_key"]["secret"] not in caplog.text


def test_unauthenticated_post_is_401(client):
    resp = client.post("/audit-events", json=UPGRADE, headers=CLI)
    assert resp.status_code == 401


def test_idempotency_key_records_once(client, conn, acme):
    first = post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX]}, **{"Idempotency-Key": "run-1"})
    again = post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX]}, **{"Idempotency-Key": "run-1"})
    assert again.status_code == 201 and again.get_json()["replayed"] is True
    assert again.get_json()["events"] == first.get_json()["events"]
    assert conn.execute("select count(*) as n from public.audit_logs where event_type in ('upgrade','fix')"
                        ).fetchone()["n"] == 2
    conflict = post(client, acme["ci_key"]["secret"], {"events": [FIX]}, **{"Idempotency-Key": "run-1"})
    assert conflict.status_code == 409


def test_forwarded_for_trusted_only_from_configured_proxies(db_url, conn, acme):
    from tests.conftest import TEST_JWT_SECRET
    from upshift_platform.app import Platform, create_wsgi_app
    from upshift_platform.settings import Settings

    for proxies, expected in [((), "127.0.0.1"), (("127.0.0.0/8",), "203.0.113.9")]:
        plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, trusted_proxies=proxies))
        try:
            c = create_wsgi_app(plat).test_client()
            out = post(c, acme["ci_key"]["secret"], UPGRADE, **{"X-Forwarded-For": "10.9.9.9, 203.0.113.9"})
            row = conn.execute("select host(ip) as ip from public.audit_logs where id = %s",
                               (out.get_json()["events"][0]["id"],)).fetchone()
            assert row["ip"] == expected
        finally:
            plat.close()


# --- platform events -------------------------------------------------------------------------


def test_platform_events_are_written_with_their_change(client, conn, acme):
    client.post("/credits/consume", json={"action": "fix", "count": 3}, headers={**CLI, **bearer(acme["ci_key"]["secret"])})
    client.patch(f"/api/orgs/acme/members/{acme['member']}", json={"role": "viewer"}, headers=bearer(make_token(acme["admin"])))
    inv = client.post("/api/orgs/acme/invites", json={"email": "n@acme.test"}, headers=bearer(make_token(acme["admin"])))
    assert inv.status_code == 201
    types = [r["event_type"] for r in org_rows(conn, acme["org"])]
    for expected in ("credits_granted", "api_key_created", "credit_debit", "member_role_changed", "invite_created"):
        assert expected in types
    debit = next(r for r in org_rows(conn, acme["org"]) if r["event_type"] == "credit_debit")
    assert debit["actor_kind"] == "service_key"
    assert debit["metadata"]["amount"] == 3 and debit["metadata"]["balance_after"] == 97
    assert debit["metadata"]["source"] == "org"
    assert inv.get_json()["token"] not in json.dumps([r["metadata"] for r in org_rows(conn, acme["org"])])


def test_failed_change_writes_no_event(client, conn, acme):
    before = len(org_rows(conn, acme["org"]))
    resp = client.post("/credits/consume", json={"action": "fix", "count": 300},
                       headers={**CLI, **bearer(acme["ci_key"]["secret"])})
    assert resp.status_code == 402
    assert len(org_rows(conn, acme["org"])) == before


# --- append-only -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
@pytest.mark.parametrize("sql", [
    "update public.audit_logs set metadata = '{}'",
    "delete from public.audit_logs",
    "truncate public.audit_logs",
    "insert into public.audit_logs (scope_id, seq, actor_kind, event_type, resource_type, created_at, prev_hash, hash)"
    " values (gen_random_uuid(), 1, 'system', 'x', 'y', now(), '\\x00', '\\x00')",
], ids=["update", "delete", "truncate", "insert"])
def test_api_roles_cannot_write_audit_logs(acme, as_role, role, sql):
    with as_role(role, acme["admin"] if role == "authenticated" else None) as cur, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute(sql)


@pytest.mark.parametrize("sql", ["update public.audit_logs set metadata = '{}'", "delete from public.audit_logs",
                                 "truncate public.audit_logs"], ids=["update", "delete", "truncate"])
@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
def test_owner_cannot_change_audit_logs(conn, acme, sql, replica):
    with conn.transaction(force_rollback=True):
        if replica:
            conn.execute("set local session_replication_role = replica")
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql)
    assert "append-only" in err.value.diag.message_primary


# --- tamper evidence -------------------------------------------------------------------------


def tamper(conn, sql, *params):
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("alter table public.audit_logs disable trigger all")
        conn.execute(sql, params)
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_delete")
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_truncate")


@pytest.fixture
def chain(client, conn, acme):
    post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX, SCAN, UPGRADE, FIX]})
    rows = org_rows(conn, acme["org"])
    assert verify(conn)["ok"] is True
    return rows


def test_edited_row_is_detected(conn, acme, chain):
    target = chain[3]
    tamper(conn, "update public.audit_logs set metadata = jsonb_set(metadata, '{outcome}', '\"failed\"')"
                 " where id = %s", target["id"])
    result = verify(conn)
    assert result["ok"] is False and result["first_bad_seq"] == target["seq"] and result["reason"] == "content_mismatch"


def test_edit_with_recomputed_hash_breaks_the_next_link(conn, acme, chain):
    target = chain[2]
    tamper(conn, "update public.audit_logs l set resource_id = 'evil' where id = %s", target["id"])
    tamper(conn, "update public.audit_logs l set hash = private.audit_hash(l) where id = %s", target["id"])
    result = verify(conn)
    assert result["ok"] is False and result["first_bad_seq"] == target["seq"] + 1
    assert result["reason"] == "broken_link"


def test_deleted_row_is_detected(conn, acme, chain):
    target = chain[1]
    tamper(conn, "delete from public.audit_logs where id = %s", target["id"])
    result = verify(conn)
    assert result["ok"] is False and result["first_bad_seq"] == target["seq"] and result["reason"] == "missing"


def test_reordered_rows_are_detected(conn, acme, chain):
    a, b = chain[1], chain[2]
    tamper(conn, "update public.audit_logs set seq = seq + 1000000 where id in (%s, %s)", a["id"], b["id"])
    tamper(conn, "update public.audit_logs set seq = case when id = %s then %s else %s end where id in (%s, %s)",
           a["id"], b["seq"], a["seq"], a["id"], b["id"])
    result = verify(conn)
    assert result["ok"] is False and result["first_bad_seq"] == a["seq"]


def test_concurrent_appends_do_not_fork_the_chain(db_url, conn, acme):
    def work(i):
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
            for _ in range(10):
                with acting_as(c, "authenticated", claims_for(acme["member"]), commit=True) as cur:
                    cur.execute("select public.record_audit_events(%s, 'acme')", (json.dumps([UPGRADE]),))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    rows = org_rows(conn, acme["org"])
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert verify(conn)["ok"] is True


# --- retention -------------------------------------------------------------------------------


def test_purge_keeps_a_verifiable_chain(conn, client, acme):
    post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX]})
    cut = conn.execute("select clock_timestamp() as t").fetchone()["t"]
    post(client, acme["ci_key"]["secret"], {"events": [SCAN, UPGRADE]})
    kept_from = conn.execute("select min(seq) as s from public.audit_logs where scope_id = %s and created_at > %s",
                             (acme["org"], cut)).fetchone()["s"]
    age_audit_logs(conn, acme["org"], 366, until=cut)  # a year passes for the first two
    with acting_as(conn, "service_role", commit=True) as cur:
        out = cur.execute("select public.purge_audit_logs() as r").fetchone()["r"]
    assert out["deleted"] >= 1
    rows = org_rows(conn, acme["org"])
    assert rows[0]["seq"] == kept_from
    assert rows[-1]["event_type"] == "audit_purged"
    result = verify(conn)
    assert result["ok"] is True and result["checkpoint"]["seq"] == kept_from - 1
    # The chain continues from there.
    post(client, acme["ci_key"]["secret"], UPGRADE)
    assert verify(conn)["ok"] is True


def test_retention_is_by_plan_and_operator_setting(conn, acme):
    days = lambda org: conn.execute("select private.audit_retention_days(%s) as d", (org,)).fetchone()["d"]  # noqa: E731
    assert days(acme["org"]) == 365
    conn.execute("update public.orgs set plan = 'pro' where id = %s", (acme["org"],))
    assert days(acme["org"]) == 90
    with acting_as(conn, "service_role", commit=True) as cur:
        cur.execute("select public.admin_set_audit_retention('acme', 30)")
    assert days(acme["org"]) == 30


def test_purge_is_operator_only(acme, as_role):
    with as_role("authenticated", acme["admin"]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("select public.purge_audit_logs()")


# --- query -----------------------------------------------------------------------------------


def test_query_access_rules(client, conn, acme, world):
    post(client, acme["ci_key"]["secret"], UPGRADE)
    ok = client.get("/api/audit-logs?org_id=acme", headers=bearer(make_token(acme["viewer"])))
    assert ok.status_code == 200 and ok.get_json()["data"]
    member = client.get("/api/audit-logs?org_id=acme", headers=bearer(make_token(acme["member"])))
    assert member.status_code == 403 and member.get_json()["error"] == "audit_role_required"
    outsider = client.get("/api/audit-logs?org_id=acme", headers=bearer(make_token(acme["outsider"])))
    assert outsider.status_code == 403
    ci = client.get("/api/audit-logs?org_id=acme", headers=bearer(acme["ci_key"]["secret"]))
    assert ci.status_code == 403
    conn.execute("update public.orgs set plan = 'pro' where id = %s", (acme["org"],))
    pro = client.get("/api/audit-logs?org_id=acme", headers=bearer(make_token(acme["admin"])))
    assert pro.status_code == 403 and pro.get_json()["error"] == "team_plan_required"
    assert "Team plan" in pro.get_json()["message"]
    # personal: only my own events
    mine = client.get("/api/audit-logs", headers=bearer(make_token(acme["member"]))).get_json()["data"]
    assert all(r["org_id"] is None and r["scope_id"] == acme["member"] for r in mine)


def test_query_filters(client, acme):
    post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX, SCAN]})
    post(client, acme["member_key"]["secret"], FIX)
    h = bearer(make_token(acme["admin"]))
    get = lambda qs: client.get(f"/api/audit-logs?org_id=acme&{qs}", headers=h).get_json()["data"]  # noqa: E731
    assert {r["event_type"] for r in get("event_type=fix&event_type=upgrade")} == {"fix", "upgrade"}
    assert [r["actor_kind"] for r in get(f"actor={acme['member']}")] == ["user"]
    assert all(r["service_key_id"] == acme["ci_key"]["id"] for r in get(f"actor={acme['ci_key']['id']}"))
    assert [r["resource_id"] for r in get("resource_type=package&resource_id=lodash")] == ["lodash", "lodash"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert get(f"since={future}") == []
    bad = client.get("/api/audit-logs?org_id=acme&limit=1001", headers=h)
    assert bad.status_code == 400 and bad.get_json()["field"] == "limit"
    bad = client.get("/api/audit-logs?org_id=acme&actor=nope", headers=h)
    assert bad.status_code == 400 and bad.get_json()["field"] == "actor"


def test_cursor_pagination_neither_skips_nor_repeats_when_events_arrive(client, acme):
    post(client, acme["ci_key"]["secret"], {"events": [UPGRADE] * 25})
    h = bearer(make_token(acme["admin"]))
    seen, cursor, pages = [], None, 0
    while True:
        url = "/api/audit-logs?org_id=acme&event_type=upgrade&limit=7" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=h).get_json()
        seen += [r["id"] for r in page["data"]]
        pages += 1
        if pages == 2:  # new events arrive between pages: they are newer than the cursor
            post(client, acme["ci_key"]["secret"], {"events": [UPGRADE] * 5})
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 25
    created = [r["created_at"] for r in client.get("/api/audit-logs?org_id=acme&limit=1000", headers=h).get_json()["data"]]
    assert created == sorted(created, reverse=True)


# --- export and verify ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_export_streams_every_row_and_is_itself_audited(client, conn, acme, fmt):
    post(client, acme["ci_key"]["secret"], {"events": [UPGRADE, FIX, SCAN]})
    resp = client.get(f"/api/audit-logs/export?org_id=acme&format={fmt}", headers=bearer(make_token(acme["viewer"])))
    assert resp.status_code == 200 and resp.is_streamed
    body = resp.get_data(as_text=True)
    if fmt == "csv":
        lines = body.strip().splitlines()
        assert lines[0].startswith("id,seq,org_id")
        n = len(lines) - 1
    else:
        n = len([json.loads(line) for line in body.strip().splitlines()])
    total = conn.execute("select count(*) as n from public.audit_logs where scope_id = %s", (acme["org"],)).fetchone()["n"]
    assert n == total  # includes the audit_export event recorded before streaming
    export_event = conn.execute("select * from public.audit_logs where event_type = 'audit_export'").fetchone()
    assert str(export_event["user_id"]) == acme["viewer"] and export_event["metadata"]["format"] == fmt


def test_export_denied_for_member_and_bad_format(client, acme):
    assert client.get("/api/audit-logs/export?org_id=acme", headers=bearer(make_token(acme["member"]))).status_code == 403
    resp = client.get("/api/audit-logs/export?org_id=acme&format=xml", headers=bearer(make_token(acme["admin"])))
    assert resp.status_code == 400 and resp.get_json()["field"] == "format"


def _bulk(conn, org, start, n):
    conn.execute(
        "insert into public.audit_logs (scope_id, seq, org_id, actor_kind, event_type, resource_type, resource_id,"
        " metadata, created_at, prev_hash, hash)"
        " select %s, %s + g, %s, 'system', 'bulk', 'package', 'p' || g,"
        " jsonb_build_object('n', g, 'pad', repeat('x', 200)), clock_timestamp(), '\\x00', '\\x00'"
        " from generate_series(1, %s) g", (org, start, org, n))


def _export_peak(client, token):
    resp = client.get("/api/audit-logs/export?org_id=acme&format=ndjson", headers=bearer(token))
    assert resp.is_streamed
    tracemalloc.start()
    total = 0
    for chunk in resp.response:
        total += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return total, peak


def test_export_memory_stays_flat(client, conn, acme):
    token = make_token(acme["admin"])
    _bulk(conn, acme["org"], 1000, 5000)
    small_total, small_peak = _export_peak(client, token)
    _bulk(conn, acme["org"], 100000, 20000)
    big_total, big_peak = _export_peak(client, token)
    assert big_total > 4 * small_total
    assert big_peak < small_peak * 1.5, (small_peak, big_peak)


def test_verify_endpoint(client, conn, acme, chain):
    h = bearer(make_token(acme["admin"]))
    body = client.get("/api/audit-logs/verify?org_id=acme", headers=h).get_json()
    assert body["ok"] is True and body["checked"] == len(chain)
    tamper(conn, "update public.audit_logs set resource_id = 'x' where id = %s", chain[0]["id"])
    body = client.get("/api/audit-logs/verify?org_id=acme", headers=h).get_json()
    assert body["ok"] is False and body["first_bad_seq"] == chain[0]["seq"]
    assert client.get("/api/audit-logs/verify?org_id=acme", headers=bearer(make_token(acme["member"]))).status_code == 403
    mine = client.get("/api/audit-logs/verify", headers=bearer(make_token(acme["member"]))).get_json()
    assert mine["ok"] is True
