"""Spend controls (issue 14): limits per member and per key, credit lots with expiry and burn order, holds.

Against real PostgreSQL: 32-way races on a limit, holds racing spends and expiry, lots expiring during
spends, and property tests of the invariants (balance = sum of the unexpired lots' remaining = sum of the
ledger; no lot's remaining below 0 or above its amount).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import acting_as, bearer, claims_for, make_token, run_together


@pytest.fixture
def acme(world):
    t = world.team("acme", balance=100, roles={"member": "member", "m2": "member", "viewer": "viewer"},
                   outsider=True)
    t["key"] = world.key(t["admin"], kind="service", org=t["org"])
    return t


def call(conn, user_id, sql, params=(), claims=None, commit=True):
    with acting_as(conn, "authenticated", claims or claims_for(user_id), commit=commit) as cur:
        return cur.execute(sql, params).fetchone()["r"]


def debit(conn, user_id, amount=1, reason="explain", org="acme", key=None, claims=None):
    return call(conn, user_id, "select public.debit_credits(%s, %s, %s, %s) as r", (amount, reason, org, key),
                claims=claims)


def key_claims(key):
    return {"role": "authenticated", "upshift": {"key_id": key["id"], "org_id": key["org_id"]}}


def set_limit(conn, admin, subject, credits, period="day", org="acme"):
    return call(conn, admin, "select public.set_spend_limit(%s, %s, %s, %s) as r", (org, subject, credits, period))


def hold(conn, user_id, amount, ttl=900, org="acme", key=None, claims=None):
    return call(conn, user_id, "select public.hold_credits(%s, 'explain', %s, %s, %s) as r",
                (amount, ttl, org, key), claims=claims)


def settle(conn, user_id, fn, hold_id, *args, claims=None):
    placeholders = ", ".join(["%s"] * (1 + len(args)))
    return call(conn, user_id, f"select public.{fn}({placeholders}) as r", (hold_id, *args), claims=claims)


def error_of(fn):
    with pytest.raises(psycopg.Error) as err:
        fn()
    return err.value.diag.sqlstate, json.loads(err.value.diag.message_detail or "{}")


def balance(conn, org):
    return conn.execute("select private.account_balance(%s) as b", (org,)).fetchone()["b"]


def events(conn, org, event_type):
    conn.execute("select public.seal_audit_logs()")
    return conn.execute("select * from public.audit_logs where scope_id = %s and event_type = %s order by seq",
                        (org, event_type)).fetchall()


def assert_invariants(conn):
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []
    assert conn.execute("select * from public.lot_mismatches()").fetchall() == []


def expire_now(conn, lot_id):
    """Make a lot due (as the owner): its expiry in the past, as if time had passed."""
    conn.execute("update public.credit_lots set expires_at = now() - interval '1 second' where id = %s", (lot_id,))
    conn.execute("update public.credit_accounts a set lots_expire_at = now() - interval '1 second'"
                 " from public.credit_lots l where l.id = %s and a.id = l.account_id", (lot_id,))


def grant(conn, org, amount, expires_at=None, reason="admin_grant"):
    meta = {"expires_at": expires_at} if expires_at else {}
    return conn.execute("select public.grant_credits(%s, %s, %s, null, %s, %s) as r",
                        (amount, reason, org, f"t-{uuid.uuid4().hex}", json.dumps(meta))).fetchone()["r"]


# --- limits --------------------------------------------------------------------------------------


def test_limit_race_32_spends_exactly_10_succeed(conn, db_url, acme):
    set_limit(conn, acme["admin"], f"member:{acme['member']}", 10, "day")
    outcomes: list[str] = []
    lock = threading.Lock()

    def work(i: int, c: psycopg.Connection[Any]) -> None:
        with c.transaction(), c.cursor() as cur:
            cur.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                        (json.dumps(claims_for(acme["member"])),))
            r = cur.execute("select public.debit_credits(1, 'explain', 'acme') as r").fetchone()["r"]
        with lock:
            outcomes.append(r.get("error", "ok"))

    run_together(db_url, 32, work)
    assert outcomes.count("ok") == 10 and outcomes.count("spend_limit_reached") == 22
    assert balance(conn, acme["org"]) == 90
    # One spend_limit_reached event for the period, not one per refusal.
    reached = events(conn, acme["org"], "spend_limit_reached")
    assert len(reached) == 1 and reached[0]["metadata"]["subject"] == f"member:{acme['member']}"
    assert reached[0]["metadata"]["limit"] == 10 and reached[0]["metadata"]["used"] == 10
    assert_invariants(conn)


def test_a_limit_refusal_charges_nothing_and_says_why(conn, acme):
    set_limit(conn, acme["admin"], f"member:{acme['member']}", 5, "month")
    assert debit(conn, acme["member"], 3, "fix")["balance"] == 97
    r = debit(conn, acme["member"], 3, "fix")
    assert r["error"] == "spend_limit_reached" and r["limit"] == 5 and r["used"] == 3 and r["period"] == "month"
    assert r["needed"] == 3 and r["resets_at"] is not None
    assert balance(conn, acme["org"]) == 97
    # other members are not limited; the fast path still serves them
    assert debit(conn, acme["m2"], 3, "fix")["balance"] == 94
    listed = call(conn, acme["admin"], "select public.list_spend_limits('acme') as r")["data"]
    assert [(x["subject"], x["used"], x["remaining"]) for x in listed] == [(f"member:{acme['member']}", 3, 2)]


def test_a_service_key_limit_and_total_period(conn, acme):
    k = acme["key"]
    set_limit(conn, acme["admin"], f"key:{k['id']}", 2, "total")
    assert debit(conn, None, 2, claims=key_claims(k))["balance"] == 98
    r = debit(conn, None, 1, claims=key_claims(k))
    assert r["error"] == "spend_limit_reached" and r["period"] == "total" and r["resets_at"] is None


def test_a_new_limit_counts_what_was_already_spent_this_period(conn, acme):
    debit(conn, acme["member"], 3, "fix")
    limit = set_limit(conn, acme["admin"], f"member:{acme['member']}", 4, "day")
    assert limit["used"] == 3 and limit["remaining"] == 1
    assert debit(conn, acme["member"], 2, "audit")["error"] == "spend_limit_reached"


def test_a_replayed_spend_does_not_count_twice(conn, acme):
    set_limit(conn, acme["admin"], f"member:{acme['member']}", 3, "day")
    first = debit(conn, acme["member"], 3, "fix", key="k1")
    again = debit(conn, acme["member"], 3, "fix", key="k1")
    assert again["replayed"] is True and again["transaction_id"] == first["transaction_id"]


@pytest.mark.parametrize("who", ["member", "viewer", "outsider"])
def test_only_admins_set_or_remove_limits(conn, acme, who):
    subject = f"member:{acme['member']}"
    state, _detail = error_of(lambda: set_limit(conn, acme[who], subject, 1))
    assert state == "PT403"
    set_limit(conn, acme["admin"], subject, 5)
    state, _ = error_of(lambda: call(conn, acme[who], "select public.delete_spend_limit('acme', %s) as r", (subject,)))
    assert state == "PT403"
    assert conn.execute("select credits from public.spend_limits where subject = %s", (subject,)).fetchone()["credits"] == 5


@pytest.mark.parametrize(("subject", "code"), [
    pytest.param("member:00000000-0000-0000-0000-000000000000", "member_not_found", id="not_a_member"),
    pytest.param("key:00000000-0000-0000-0000-000000000000", "key_not_found", id="unknown_key"),
    pytest.param("user:abc", "invalid_subject", id="bad_kind"),
    pytest.param("default:viewer", "invalid_subject", id="bad_default"),
    pytest.param("", "invalid_subject", id="empty"),
])
def test_bad_subjects_are_refused(conn, acme, subject, code):
    _, detail = error_of(lambda: set_limit(conn, acme["admin"], subject, 1))
    assert detail["error"] == code


@pytest.mark.parametrize(("credits", "period", "code"), [
    pytest.param(-1, "day", "invalid_credits", id="negative"),
    pytest.param(10, "week", "invalid_period", id="week"),
    pytest.param(10, None, "invalid_period", id="no_period"),
])
def test_bad_limits_are_refused(conn, acme, credits, period, code):
    _, detail = error_of(lambda: set_limit(conn, acme["admin"], f"member:{acme['member']}", credits, period))
    assert detail["error"] == code


def test_limit_of_another_orgs_member_cannot_be_set(conn, acme):
    _, detail = error_of(lambda: set_limit(conn, acme["admin"], f"member:{acme['outsider']}", 1))
    assert detail["error"] == "member_not_found"
    state, _ = error_of(lambda: set_limit(conn, acme["admin"], f"member:{acme['member']}", 1, org="other"))
    assert state == "PT403"


def test_defaults_apply_to_new_members_and_keys_and_changes_are_audited(conn, world, acme):
    set_limit(conn, acme["admin"], "default:member", 2, "day")
    set_limit(conn, acme["admin"], "default:key", 1, "day")
    newbie = world.user()
    world.member(acme["org"], newbie)
    key = world.key(acme["admin"], kind="service", org=acme["org"])
    assert debit(conn, newbie, 2, "audit")["balance"] == 98
    assert debit(conn, newbie, 1)["error"] == "spend_limit_reached"
    assert debit(conn, None, 1, claims=key_claims(key))["balance"] == 97
    assert debit(conn, None, 1, claims=key_claims(key))["error"] == "spend_limit_reached"
    # existing members keep spending freely
    assert "error" not in debit(conn, acme["member"], 3, "fix")
    call(conn, acme["admin"], "select public.delete_spend_limit('acme', %s) as r", (f"member:{newbie}",))
    assert debit(conn, newbie, 1)["balance"] == 93
    kinds = [e["metadata"].get("subject") for e in events(conn, acme["org"], "spend_limit_set")]
    assert {"default:member", "default:key", f"member:{newbie}", f"key:{key['id']}"} <= set(kinds)
    assert len(events(conn, acme["org"], "spend_limit_removed")) == 1


def test_members_read_their_own_limit_only(conn, acme):
    set_limit(conn, acme["admin"], f"member:{acme['member']}", 5)
    set_limit(conn, acme["admin"], f"member:{acme['m2']}", 6)
    mine = call(conn, acme["member"], "select public.list_spend_limits('acme') as r")["data"]
    assert [x["subject"] for x in mine] == [f"member:{acme['member']}"]
    assert len(call(conn, acme["viewer"], "select public.list_spend_limits('acme') as r")["data"]) == 2
    state, _ = error_of(lambda: call(conn, acme["outsider"], "select public.list_spend_limits('acme') as r"))
    assert state == "PT403"
    own = call(conn, acme["member"], "select public.my_spend_limits() as r")
    assert [(x["org_id"], x["credits"]) for x in own] == [(acme["org"], 5)]


# --- holds ---------------------------------------------------------------------------------------


def test_hold_capture_release_and_available(conn, acme):
    h = hold(conn, acme["member"], 30)
    assert h["status"] == "active" and h["balance"] == 100 and h["available"] == 70
    # a spend sees what is available, not the balance
    _, detail = error_of(lambda: debit(conn, acme["m2"], 71, "explain"))
    assert detail["error"] == "insufficient_credits" and detail["available"] == 70 and detail["held"] == 30
    c = settle(conn, acme["member"], "capture_hold", h["id"], 12)
    assert c["status"] == "captured" and c["captured"] == 12 and c["balance"] == 88 and c["available"] == 88
    again = settle(conn, acme["member"], "capture_hold", h["id"], 12)
    assert again["replayed"] is True and again["balance"] == 88
    _, detail = error_of(lambda: settle(conn, acme["member"], "capture_hold", h["id"], 13))
    assert detail["error"] == "hold_not_active"
    _, detail = error_of(lambda: settle(conn, acme["member"], "release_hold", h["id"]))
    assert detail["error"] == "hold_not_active"
    h2 = hold(conn, acme["member"], 5)
    r = settle(conn, acme["member"], "release_hold", h2["id"])
    assert r["status"] == "released" and r["balance"] == 88
    assert settle(conn, acme["member"], "release_hold", h2["id"])["replayed"] is True
    reasons = [t["reason"] for t in conn.execute(
        "select reason from public.credit_transactions where account_id = %s order by created_at, reason",
        (acme["org"],)).fetchall()]
    assert reasons.count("hold") == 2 and reasons.count("hold_released") == 1
    assert {e["event_type"] for e in conn.execute("select event_type from public.audit_logs where scope_id = %s",
                                                   (acme["org"],)).fetchall()} >= {"hold_created", "hold_captured",
                                                                                  "hold_released"}
    assert_invariants(conn)


def test_hold_refusals_and_who_may_settle(conn, acme):
    _, detail = error_of(lambda: hold(conn, acme["member"], 101))
    assert detail["error"] == "insufficient_credits"
    _, detail = error_of(lambda: hold(conn, acme["viewer"], 1))
    assert detail["error"] == "cannot_spend"
    _, detail = error_of(lambda: hold(conn, acme["member"], 1, ttl=0))
    assert detail["error"] == "invalid_ttl_seconds"
    h = hold(conn, acme["member"], 10)
    for who in ("m2", "viewer", "outsider"):
        _, detail = error_of(lambda who=who: settle(conn, acme[who], "capture_hold", h["id"], 1))
        assert detail["error"] == "hold_not_found"
    _, detail = error_of(lambda: settle(conn, acme["member"], "capture_hold", h["id"], 11))
    assert detail["error"] == "invalid_amount"
    # an admin may settle a member's hold
    assert settle(conn, acme["admin"], "release_hold", h["id"])["status"] == "released"
    # a member removed (or demoted to viewer) since holding may release, not charge
    h = hold(conn, acme["member"], 10)
    conn.execute("update public.org_members set role = 'viewer' where user_id = %s", (acme["member"],))
    _, detail = error_of(lambda: settle(conn, acme["member"], "capture_hold", h["id"], 1))
    assert detail["error"] == "cannot_spend"
    assert settle(conn, acme["member"], "release_hold", h["id"])["status"] == "released"


def test_holds_are_idempotent_by_key(conn, acme):
    a = hold(conn, acme["member"], 7, key="h1")
    b = hold(conn, acme["member"], 7, key="h1")
    assert a["id"] == b["id"] and b["replayed"] is True and b["available"] == 93
    _, detail = error_of(lambda: hold(conn, acme["member"], 8, key="h1"))
    assert detail["error"] == "idempotency_conflict"


def test_holds_count_against_limits(conn, acme):
    set_limit(conn, acme["admin"], f"member:{acme['member']}", 10)
    h = hold(conn, acme["member"], 8)
    assert debit(conn, acme["member"], 3, "fix")["error"] == "spend_limit_reached"
    settle(conn, acme["member"], "capture_hold", h["id"], 5)  # 3 of the 8 go back to the limit
    assert debit(conn, acme["member"], 3, "fix")["balance"] == 92
    assert hold(conn, acme["member"], 3)["error"] == "spend_limit_reached"


def test_an_expired_hold_is_ignored_then_swept(conn, acme):
    h = hold(conn, acme["member"], 90, ttl=1)
    time.sleep(1.2)
    status = call(conn, acme["member"], "select public.billing_status('acme') as r")
    assert status["available"] == 100 and status["held"] == 0
    assert debit(conn, acme["m2"], 95, "explain")["balance"] == 5  # the spend swept it first
    row = conn.execute("select status from public.credit_holds where id = %s", (h["id"],)).fetchone()
    assert row["status"] == "expired"
    _, detail = error_of(lambda: settle(conn, acme["member"], "capture_hold", h["id"], 1))
    assert detail["error"] == "hold_expired"
    assert len(events(conn, acme["org"], "hold_expired")) == 1


def test_the_job_sweeps_expired_holds_and_lots(conn, acme):
    hold(conn, acme["member"], 10, ttl=1)
    lot = grant(conn, acme["org"], 20, expires_at="2999-01-01T00:00:00Z")
    lot_id = conn.execute("select id from public.credit_lots where transaction_id = %s",
                          (lot["transaction_id"],)).fetchone()["id"]
    expire_now(conn, lot_id)
    time.sleep(1.2)
    out = conn.execute("select public.run_credit_jobs() as r").fetchone()["r"]
    assert out["accounts_swept"] >= 1 and out["holds_expired"] == 1 and out["credits_expired"] == 20
    assert balance(conn, acme["org"]) == 100
    assert conn.execute("select held from public.credit_accounts where id = %s", (acme["org"],)).fetchone()["held"] == 0
    assert conn.execute("select public.run_credit_jobs() as r").fetchone()["r"]["accounts_swept"] == 0
    exp = events(conn, acme["org"], "credits_expired")
    assert len(exp) == 1 and exp[0]["metadata"]["credits"] == 20
    assert_invariants(conn)


def test_holds_race_spends_and_expiry(conn, db_url, acme):
    """Balance 100: 16 clients holding 10 race 16 spending 10 (exactly 10 succeed, available never below 0);
    then the holds expire while 16 more spends race the job: exactly the freed credits are spent."""
    def race(sqls: list[str]) -> list[str]:
        results: list[str] = []
        lock = threading.Lock()

        def work(i: int, c: psycopg.Connection[Any]) -> None:
            try:
                with c.transaction(), c.cursor() as cur:
                    if "run_credit_jobs" not in sqls[i]:  # the job runs as the backend
                        cur.execute("select set_config('role', 'authenticated', true),"
                                    " set_config('request.jwt.claims', %s, true)",
                                    (json.dumps(claims_for(acme["member"] if i % 2 else acme["m2"])),))
                    cur.execute(sqls[i]).fetchone()
                out = "ok"
            except psycopg.Error as exc:
                out = exc.diag.sqlstate or "?"
            with lock:
                results.append(out)

        run_together(db_url, len(sqls), work)
        return results

    hold_sql = "select public.hold_credits(10, 'explain', 900, 'acme')"
    spend_sql = "select public.debit_credits(10, 'explain', 'acme')"
    results = race([hold_sql if i % 2 else spend_sql for i in range(32)])
    assert set(results) <= {"ok", "PT402"} and results.count("ok") == 10
    row = conn.execute("select balance, held from public.credit_accounts where id = %s", (acme["org"],)).fetchone()
    assert row["balance"] - row["held"] == 0 and row["held"] % 10 == 0
    held = row["held"]
    # Every hold passes its expiry (as if time had passed); the job and 16 spends race to use it.
    conn.execute("update public.credit_holds set expires_at = now() - interval '1 second' where status = 'active'")
    conn.execute("update public.credit_accounts set holds_expire_at = now() - interval '1 second' where id = %s",
                 (acme["org"],))
    results = race([spend_sql] * 15 + ["select public.run_credit_jobs()"])
    assert results.count("ok") == held // 10 + 1  # the freed credits, plus the job's own success
    row = conn.execute("select balance, held from public.credit_accounts where id = %s", (acme["org"],)).fetchone()
    assert row == {"balance": 0, "held": 0}
    assert conn.execute("select count(*) as n from public.credit_holds where status = 'active'").fetchone()["n"] == 0
    assert_invariants(conn)


def test_holds_on_a_sliced_pool(conn, acme):
    conn.execute("select public.admin_set_slices('acme', 4)")
    h = hold(conn, acme["member"], 60)
    _, detail = error_of(lambda: debit(conn, acme["m2"], 41, "explain"))
    assert detail["error"] == "insufficient_credits"
    assert debit(conn, acme["m2"], 40, "explain")["balance"] == 60
    assert settle(conn, acme["member"], "capture_hold", h["id"], 60)["balance"] == 0
    assert_invariants(conn)


# --- lots ----------------------------------------------------------------------------------------


def lots(conn, user_id, org="acme", include_spent=True):
    return call(conn, user_id, "select public.list_credit_lots(%s, %s) as r", (org, include_spent))


def test_burn_order_soonest_expiry_first_then_oldest(conn, acme):
    soon = grant(conn, acme["org"], 10, expires_at="2999-01-01T00:00:00Z")
    later = grant(conn, acme["org"], 10, expires_at="2999-06-01T00:00:00Z")
    spent = debit(conn, acme["member"], 15, "explain")
    listed = {x["transaction_id"]: x for x in lots(conn, acme["admin"])["data"]}
    assert listed[soon["transaction_id"]]["remaining"] == 0
    assert listed[later["transaction_id"]]["remaining"] == 5
    opening = next(x for x in listed.values() if x["expires_at"] is None)
    assert opening["remaining"] == 100 and opening["source"] == "admin"
    row = conn.execute("select line_to from public.credit_transactions where id = %s",
                       (spent["transaction_id"],)).fetchone()
    assert row["line_to"] is not None
    out = lots(conn, acme["admin"], include_spent=False)
    assert out["expiring_soon"] == 0 and out["balance"] == 105 and len(out["data"]) == 2
    assert_invariants(conn)


def test_expiry_is_a_ledger_row_and_applied_inside_a_spend(conn, acme):
    g = grant(conn, acme["org"], 50, expires_at="2999-01-01T00:00:00Z")
    lot_id = conn.execute("select id from public.credit_lots where transaction_id = %s",
                          (g["transaction_id"],)).fetchone()["id"]
    debit(conn, acme["member"], 20, "explain")  # from the expiring lot first: 30 of it left
    expire_now(conn, lot_id)
    _, detail = error_of(lambda: debit(conn, acme["member"], 101, "explain"))
    assert detail["error"] == "insufficient_credits" and detail["balance"] == 100
    r = debit(conn, acme["member"], 1, "explain")  # the job is late: the spend expires the lot itself
    assert r["balance"] == 99
    row = conn.execute("select amount, reason from public.credit_transactions where reason = 'expired'"
                       " and account_id = %s", (acme["org"],)).fetchone()
    assert row["amount"] == -30
    lot = next(x for x in lots(conn, acme["admin"])["data"] if x["id"] == str(lot_id))
    assert lot["expired"] == 30 and lot["spent"] == 20 and lot["remaining"] == 0
    assert_invariants(conn)


def test_expiring_soon_and_the_notice(conn, acme):
    conn.execute("select public.grant_credits(7, 'promo', 'acme', null, 'p1', jsonb_build_object('expires_at',"
                 " now() + interval '3 days'))")
    out = lots(conn, acme["member"], include_spent=False)
    assert out["expiring_soon"] == 7
    assert [x["source"] for x in out["data"] if x["expires_at"]] == ["promo"]
    assert conn.execute("select public.run_credit_jobs() as r").fetchone()["r"]["expiring_notices"] == 1
    assert conn.execute("select public.run_credit_jobs() as r").fetchone()["r"]["expiring_notices"] == 0
    assert len(events(conn, acme["org"], "credits_expiring")) == 1


def test_a_grant_must_expire_in_the_future(conn, acme):
    _, detail = error_of(lambda: grant(conn, acme["org"], 5, expires_at="2001-01-01T00:00:00Z"))
    assert detail["error"] == "invalid_expires_at"
    _, detail = error_of(lambda: grant(conn, acme["org"], 5, expires_at="soon"))
    assert detail["error"] == "invalid_expires_at"


def test_lots_expiring_during_spends(conn, db_url, acme):
    """32 spends race a lot's expiry (the job running too): every credit is either spent or expired, once."""
    g = grant(conn, acme["org"], 64, expires_at="2999-01-01T00:00:00Z")
    lot_id = conn.execute("select id from public.credit_lots where transaction_id = %s",
                          (g["transaction_id"],)).fetchone()["id"]

    def work(i: int, c: psycopg.Connection[Any]) -> None:
        if i == 0:
            time.sleep(0.05)
            expire_now(c, lot_id)
            return
        if i == 1:
            time.sleep(0.1)
            c.execute("select public.run_credit_jobs()")
            return
        with c.transaction(), c.cursor() as cur:
            cur.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                        (json.dumps(claims_for(acme["member"] if i % 2 else acme["m2"])),))
            cur.execute("select public.debit_credits(3, 'fix', 'acme')")

    run_together(db_url, 32, work)
    conn.execute("select public.run_credit_jobs()")
    spent = conn.execute("select coalesce(-sum(amount), 0) as s from public.credit_transactions"
                         " where account_id = %s and reason = 'fix'", (acme["org"],)).fetchone()["s"]
    expired = conn.execute("select coalesce(-sum(amount), 0) as s from public.credit_transactions"
                           " where account_id = %s and reason = 'expired'", (acme["org"],)).fetchone()["s"]
    assert spent == 30 * 3 and balance(conn, acme["org"]) == 164 - spent - expired
    lot = conn.execute("select expired, expired_at from public.credit_lots where id = %s", (lot_id,)).fetchone()
    assert lot["expired_at"] is not None and lot["expired"] == expired
    assert_invariants(conn)


def test_refunds_take_back_from_the_purchase_lot_first(conn, acme):
    conn.execute("select public.grant_credits(10, 'purchase', 'acme', null, 'cs_1', '{\"payment\": \"pi_1\"}')")
    conn.execute("select public.grant_credits(10, 'purchase', 'acme', null, 'cs_2', '{\"payment\": \"pi_2\"}')")
    conn.execute("select private.apply_credit_change(%s, -15, 'refund', 'reversal:pi_2', true, '{\"payment\": \"pi_2\"}',"
                 " p_partial => true, p_audit => false)", (acme["org"],))
    by_payment = {x["payment_key"]: x for x in conn.execute(
        "select payment_key, taken from public.credit_lots where payment_key is not null").fetchall()}
    assert by_payment["pi_2"]["taken"] == 10 and by_payment["pi_1"]["taken"] == 0
    assert balance(conn, acme["org"]) == 105
    assert_invariants(conn)


# --- the invariants, property-tested --------------------------------------------------------------


OPS = st.lists(st.one_of(
    st.tuples(st.just("grant"), st.integers(1, 50), st.sampled_from([None, "soon", "later"])),
    st.tuples(st.just("spend"), st.integers(1, 40), st.sampled_from(["member", "m2"])),
    st.tuples(st.just("hold"), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("expire"), st.integers(0, 5), st.none()),
    st.tuples(st.just("refund"), st.integers(1, 30), st.none()),
), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_property_balance_equals_lots_equals_ledger(conn, world, ops):
    admin, member, m2 = world.user(), world.user(), world.user()
    slug = f"p-{uuid.uuid4().hex[:8]}"
    org = world.org(slug, admin=admin)
    world.member(org, member)
    world.member(org, m2)
    who = {"member": member, "m2": m2}
    holds: list[str] = []
    for op, n, arg in ops:
        try:
            with conn.transaction():
                if op == "grant":
                    exp = {"soon": "2999-01-01T00:00:00Z", "later": "2999-06-01T00:00:00Z"}.get(arg or "")
                    grant(conn, org, n, expires_at=exp, reason="purchase" if arg is None else "promo")
                elif op == "spend":
                    debit(conn, who[arg], n, "explain", org=slug)
                elif op == "hold":
                    h = hold(conn, member, n, org=slug)
                    if "id" in h:
                        holds.append(h["id"])
                    if arg and holds:
                        settle(conn, member, "capture_hold", holds.pop(0), 1)
                elif op == "expire":
                    row = conn.execute("select id from public.credit_lots where account_id = %s and expired_at is null"
                                       " and expires_at is not null order by created_at offset %s limit 1",
                                       (org, n)).fetchone()
                    if row:
                        expire_now(conn, row["id"])
                        conn.execute("select public.run_credit_jobs()")
                elif op == "refund":
                    conn.execute("select private.apply_credit_change(%s, %s, 'refund', %s, true, '{}',"
                                 " p_partial => true, p_audit => false)", (org, -n, f"r-{uuid.uuid4().hex}"))
        except psycopg.Error as exc:
            assert exc.diag.sqlstate in ("PT402", "PT409"), exc
        assert_invariants(conn)
        row = conn.execute("select balance, held from public.credit_accounts where id = %s", (org,)).fetchone()
        assert row["balance"] >= 0 and 0 <= row["held"]


# --- HTTP ----------------------------------------------------------------------------------------


def test_http_limits_holds_lots_and_me(client, conn, acme):
    admin, member = bearer(make_token(acme["admin"])), bearer(make_token(acme["member"]))
    subject = f"member:{acme['member']}"
    r = client.put(f"/api/orgs/acme/spend-limits/{subject}", json={"credits": 4, "period": "day"}, headers=admin)
    assert r.status_code == 200 and r.json["credits"] == 4
    assert client.put(f"/api/orgs/acme/spend-limits/{subject}", json={"credits": 4}, headers=admin).status_code == 400
    assert client.put(f"/api/orgs/acme/spend-limits/{subject}", json={"credits": 4, "period": "day", "x": 1},
                      headers=admin).status_code == 400
    assert client.put(f"/api/orgs/acme/spend-limits/{subject}", json={"credits": 9, "period": "day"},
                      headers=member).status_code == 403
    ok = client.post("/credits/consume", json={"action": "fix", "count": 3, "org_id": "acme"}, headers=member)
    assert ok.status_code == 200
    refused = client.post("/credits/consume", json={"action": "fix", "count": 3, "org_id": "acme"}, headers=member)
    assert refused.status_code == 402 and refused.json["error"] == "spend_limit_reached"
    assert refused.json["limit"] == 4 and refused.json["used"] == 3 and refused.json["period"] == "day"
    assert refused.json["resets_at"] and refused.json["message"]
    assert len(events(conn, acme["org"], "spend_limit_reached")) == 1  # committed despite the 402
    listed = client.get("/api/orgs/acme/spend-limits", headers=member)
    assert listed.status_code == 200 and listed.json["data"][0]["used"] == 3
    me = client.get("/api/me", headers=member).json
    assert [m["spend_limit"]["credits"] for m in me["memberships"] if m["slug"] == "acme"] == [4]
    assert client.delete(f"/api/orgs/acme/spend-limits/{subject}", headers=admin).status_code == 200
    assert client.delete(f"/api/orgs/acme/spend-limits/{subject}", headers=admin).status_code == 404

    h = client.post("/credits/holds", json={"amount": 10, "reason": "fix", "ttl_seconds": 60, "org_id": "acme"},
                    headers=member)
    assert h.status_code == 201 and h.json["status"] == "active" and h.json["available"] == 87
    status = client.get("/billing/status?org_id=acme", headers=member).json
    assert status["balance"] == 97 and status["available"] == 87 and status["held"] == 10
    c = client.post(f"/credits/holds/{h.json['id']}/capture", json={"amount": 4}, headers=member)
    assert c.status_code == 200 and c.json["captured"] == 4 and c.json["balance"] == 93
    assert client.post(f"/credits/holds/{h.json['id']}/release", json={}, headers=member).status_code == 409
    assert client.post(f"/credits/holds/{uuid.uuid4()}/release", json={}, headers=member).status_code == 404
    assert client.post("/credits/holds/not-a-uuid/release", json={}, headers=member).status_code == 400
    assert client.post("/credits/holds", json={"amount": "10", "reason": "fix"}, headers=member).status_code == 400
    assert client.get("/credits/holds?org_id=acme&status=", headers=member).json["data"][0]["status"] == "captured"
    tx = client.get("/api/credits/transactions?org_id=acme", headers=bearer(make_token(acme["admin"]))).json
    assert {"hold", "fix"} <= {t["reason"] for t in tx["data"]}
    lots_r = client.get("/api/credits/lots?org_id=acme", headers=member)
    assert lots_r.status_code == 200 and lots_r.json["expiring_soon"] == 0 and lots_r.json["balance"] == 93


def test_http_jobs_needs_the_scheduler_token(db_url, conn, acme):
    from tests.conftest import TEST_JWT_SECRET
    from upshift_platform.app import Platform, create_wsgi_app
    from upshift_platform.settings import Settings

    plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, pool_max=2, jobs_token="s3cret-token"))
    try:
        c = create_wsgi_app(plat).test_client()
        assert c.post("/jobs/run", json={}).status_code == 401
        assert c.post("/jobs/run", json={}, headers=bearer("wrong")).status_code == 401
        assert c.post("/jobs/run", json={}, headers=bearer(make_token(acme["admin"]))).status_code == 401
        ok = c.post("/jobs/run", json={"max_accounts": 10}, headers=bearer("s3cret-token"))
        assert ok.status_code == 200 and ok.json["accounts_swept"] == 0
        assert c.post("/jobs/run", json={"max_accounts": 0}, headers=bearer("s3cret-token")).status_code == 400
    finally:
        plat.close()
    plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, pool_max=2))
    try:
        r = create_wsgi_app(plat).test_client().post("/jobs/run", json={}, headers=bearer("anything"))
        assert r.status_code == 503 and r.json["error"] == "jobs_not_configured"
    finally:
        plat.close()


def test_outsiders_cannot_touch_holds_or_lots(conn, acme, as_role):
    h = hold(conn, acme["member"], 5)
    with as_role("anon") as cur:
        for sql in ("select public.hold_credits(1, 'explain')", f"select public.release_hold('{h['id']}')",
                    "select public.list_credit_lots()", "select public.run_credit_jobs()",
                    "select * from public.credit_lots", "select * from public.spend_limits"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with cur.connection.transaction():
                    cur.execute(sql)
    _, detail = error_of(lambda: call(conn, acme["admin"], "select public.run_credit_jobs() as r"))
    assert detail.get("error") in ("backend_only", None)  # 42501: not granted
    _, detail = error_of(lambda: call(conn, acme["outsider"], "select public.list_credit_lots('acme') as r"))
    assert detail["error"] == "org_forbidden"
    # a revoked key cannot hold or settle
    conn.execute("select public.admin_revoke_api_key(%s)", (acme["key"]["id"],))
    state, _ = error_of(lambda: hold(conn, None, 1, claims=key_claims(acme["key"])))
    assert state == "PT403"


def _event(kind: str, obj: dict[str, Any]) -> str:
    return json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": kind, "created": int(time.time()),
                       "data": {"object": obj}})


def test_plan_credits_expire_with_their_period_and_packs_by_the_configured_lifetime(conn, acme):
    meta = {"account_kind": "org", "account_id": acme["org"], "tier": "team"}
    end = int(time.time()) + 30 * 86400
    invoice = {"id": "in_1", "subscription": "sub_1", "billing_reason": "subscription_cycle",
               "subscription_details": {"metadata": meta}, "lines": {"data": [{"period": {"end": end}}]}}
    out = conn.execute("select public.stripe_apply_event(%s, %s) as r",
                       (_event("invoice.paid", invoice), json.dumps({"plan_credits": {"team": 1000}}))).fetchone()["r"]
    assert out["outcome"] == "plan_credits_granted"
    plan = conn.execute("select source, amount, extract(epoch from expires_at)::bigint as e from public.credit_lots"
                        " where account_id = %s and source = 'plan'", (acme["org"],)).fetchone()
    assert plan == {"source": "plan", "amount": 1000, "e": end}

    def pack(session: str, config: dict[str, Any]) -> Any:
        obj = {"id": session, "mode": "payment", "payment_status": "paid", "payment_intent": f"pi_{session}",
               "amount_total": 500, "currency": "usd",
               "metadata": {"account_kind": "org", "account_id": acme["org"], "pack": "small", "credits": "100"}}
        conn.execute("select public.stripe_apply_event(%s, %s)",
                     (_event("checkout.session.completed", obj), json.dumps(config)))
        return conn.execute("select source, expires_at from public.credit_lots where payment_key = %s",
                            (f"pi_{session}",)).fetchone()

    assert pack("cs_a", {"pack_credits": {"small": 100}}) == {"source": "purchase", "expires_at": None}
    lived = pack("cs_b", {"pack_credits": {"small": 100}, "pack_lifetime_days": 30})
    assert lived["source"] == "purchase" and lived["expires_at"] is not None
    assert_invariants(conn)
