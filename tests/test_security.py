"""An attacker's attempts, replayed against a database prepared as Supabase prepares one.

The suite's databases get Supabase's default privileges from ``sql/supabase_compat.sql`` before the
migrations run (``legacy`` profile unless ``UPSHIFT_SUPABASE_PRIVILEGES`` says otherwise), so every
function in ``public`` starts out executable by anon and authenticated, exactly as on a hosted
project. Each test here is one finding of the security review (docs/security.md lists them); each
failed against the code before the fix.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests import stripe_fakes as sf
from tests.conftest import acting_as

FORGED_EVENT = sf.checkout_completed("cs_forged", "user", "00000000-0000-0000-0000-000000000000",
                                     credits=5_000_000, payment_intent="pi_forged")
CONFIG = {"pack_credits": {"small": 100}, "plan_credits": {"pro": 100, "team": 1000}, "price_tiers": {}}


@pytest.fixture
def victim(world, conn):
    """Org ``victim`` (Team) with an admin, 500 credits and some audit history; plus an outsider."""
    admin = world.user("admin@victim.test")
    org = world.org("victim", plan="pro", balance=500, admin=admin)
    outsider = world.user("mallory@evil.test")
    return {"org": org, "admin": admin, "outsider": outsider}


def snapshot(conn) -> dict[str, Any]:
    one = conn.execute
    return {
        "orgs": one("select o.id, o.plan, a.balance as credit_balance from public.orgs o join public.credit_accounts a on a.id = o.id order by o.id").fetchall(),
        "members": one("select org_id, user_id, role from public.org_members order by 1, 2").fetchall(),
        "profiles": one("select p.id, p.plan, a.balance as credit_balance from public.profiles p join public.credit_accounts a on a.id = p.id order by p.id").fetchall(),
        "ledger": one("select count(*) as n from public.credit_transactions").fetchone()["n"],
        "audit": one("select count(*) as n from public.audit_logs").fetchone()["n"],
        "stripe": one("select count(*) as n from public.stripe_events").fetchone()["n"],
    }


# --- 1. backend-only functions are not callable by signed-in users --------------------------------

ATTACKS = {
    "grant_credits_to_self": "select public.grant_credits(1000000, 'admin_grant', null, %(me)s, 'free-money')",
    "add_self_as_admin": "select public.admin_add_member('victim', %(me)s, 'admin')",
    "remove_the_admin": "select public.admin_remove_member('victim', %(admin)s)",
    "set_org_plan": "select public.admin_set_org_plan('victim', 'team')",
    "empty_the_audit_log": "select public.purge_audit_logs(now() + interval '100 years')",
    "forged_stripe_event": "select public.stripe_apply_event(%(event)s::jsonb, %(config)s::jsonb)",
    "create_org_for_someone": "select public.admin_create_org('Evil', 'evil', 'team', %(me)s)",
    "mint_a_key_for_the_admin": "select public.admin_create_api_key(%(admin)s, 'x', 'personal')",
    "look_up_a_key_hash": "select public.authenticate_api_key(repeat('a', 64))",
    "set_retention": "select public.admin_set_audit_retention('victim', 1)",
    "read_all_balances": "select * from public.ledger_mismatches()",
    "steal_stripe_customer": "select public.set_stripe_customer('org', %(org)s, 'cus_evil')",
}


def _params(victim, me):
    event = dict(FORGED_EVENT)
    event["data"] = {"object": {**FORGED_EVENT["data"]["object"],
                                "metadata": {**FORGED_EVENT["data"]["object"]["metadata"], "account_id": me}}}
    return {"me": me, "admin": victim["admin"], "org": victim["org"], "event": json.dumps(event),
            "config": json.dumps(CONFIG)}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("role", ["authenticated", "anon"])
def test_backend_only_rpcs_refuse_api_roles(conn, victim, attack, role):
    before = snapshot(conn)
    me = victim["outsider"] if role == "authenticated" else None
    claims = {"role": role, **({"sub": me, "aud": "authenticated"} if me else {})}
    with pytest.raises(psycopg.errors.InsufficientPrivilege), acting_as(conn, role, claims, commit=True) as cur:
        cur.execute(ATTACKS[attack], _params(victim, me or victim["outsider"]))
    assert snapshot(conn) == before


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_backend_only_rpcs_check_the_role_inside_too(conn, victim, attack):
    """Defence in depth: even with EXECUTE granted by mistake, the function refuses an API user."""
    fn = ATTACKS[attack].split("public.", 1)[1].split("(", 1)[0]
    sigs = [r["s"] for r in conn.execute(
        "select p.oid::regprocedure::text as s from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'public' and p.proname = %s", (fn,))]
    assert sigs, fn
    for sig in sigs:
        conn.execute(f"grant execute on function {sig} to authenticated")
    before = snapshot(conn)
    me = victim["outsider"]
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": me}, commit=True) as cur:
        cur.execute(ATTACKS[attack], _params(victim, me))
    assert exc.value.diag.sqlstate == "PT403"
    assert json.loads(exc.value.diag.message_detail)["error"] == "backend_only"
    assert snapshot(conn) == before


def test_backend_only_rpcs_still_work_for_service_role(conn, victim):
    with acting_as(conn, "service_role", {"role": "service_role"}, commit=True) as cur:
        cur.execute("select public.admin_set_org_plan('victim', 'team')")
    assert conn.execute("select plan from public.orgs where id = %s", (victim["org"],)).fetchone()["plan"] == "team"


def test_authenticated_cannot_rename_an_org_behind_the_audit_log(conn, victim):
    """Renames go through update_org, which records org_updated; a direct UPDATE is refused."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": victim["admin"]}) as cur:
        cur.execute("update public.orgs set name = 'Renamed', slug = 'renamed' where id = %s", (victim["org"],))
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": victim["admin"]}) as cur:
        cur.execute("update public.profiles set default_org_id = null where id = %s", (victim["admin"],))
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": victim["admin"]}, commit=True) as cur:
        cur.execute("select public.update_org('victim', 'Renamed')")
    assert conn.execute("select count(*) as n from public.audit_logs where event_type = 'org_updated'"
                        " and org_id = %s", (victim["org"],)).fetchone()["n"] == 1


# --- 2. a buyer cannot block the clawback of a disputed purchase ----------------------------------


def _apply(conn, event):
    with acting_as(conn, "service_role", {"role": "service_role"}, commit=True) as cur:
        return cur.execute("select public.stripe_apply_event(%s::jsonb, %s::jsonb) as r",
                           (json.dumps(event), json.dumps(CONFIG))).fetchone()["r"]


@pytest.mark.parametrize("key", ["reversal:pi_buy:0->100", "cs_buy", "signup:{me}", "opening:{me}", "in_buy"])
def test_client_keys_cannot_collide_with_system_keys(conn, world, key):
    buyer = world.user("buyer@x.test")
    key = key.format(me=buyer)
    _apply(conn, sf.checkout_completed("cs_buy", "user", buyer, credits=100, payment_intent="pi_buy"))
    assert conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (buyer,)).fetchone()[
        "credit_balance"] == 110  # 10 signup credits + 100 bought
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": buyer}, commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', null, %s)", (key,))
    result = _apply(conn, sf.dispute("charge.dispute.created", "dp_buy", "pi_buy"))
    assert result["outcome"] == "dispute_applied"
    balance = conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (buyer,)).fetchone()
    assert balance["credit_balance"] == 9  # the 100 disputed credits are taken back
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []


def test_idempotency_conflict_does_not_reveal_another_users_transaction(conn, world):
    admin, a, b = world.user(), world.user(), world.user()
    org = world.org(balance=10, admin=admin)
    world.member(org, a)
    world.member(org, b)
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": a}, commit=True) as cur:
        mine = cur.execute("select public.debit_credits(1, 'explain', %s, 'shared-key') as r", (org,)).fetchone()["r"]
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": b}) as cur:
        cur.execute("select public.debit_credits(1, 'explain', %s, 'shared-key')", (org,))
    assert exc.value.diag.sqlstate == "PT409"
    assert mine["transaction_id"] not in (exc.value.diag.message_detail or "")
    assert mine["transaction_id"] not in (exc.value.diag.message_primary or "")
    # The same caller reusing their own key with other arguments still learns which transaction it was.
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": a}) as cur:
        cur.execute("select public.debit_credits(2, 'explain', %s, 'shared-key')", (org,))
    assert json.loads(exc.value.diag.message_detail)["transaction_id"] == mine["transaction_id"]


# --- 3. races and stale rights --------------------------------------------------------------------


def _session(db_url, user):
    c = psycopg.connect(db_url, row_factory=dict_row)
    c.execute("select set_config('role', 'authenticated', false),"
              " set_config('request.jwt.claims', %s, false)", (json.dumps({"role": "authenticated", "sub": user}),))
    c.commit()
    return c


def _blocked(conn, pid, timeout=5.0) -> bool:
    """Is backend ``pid`` waiting on a lock?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("select wait_event_type from pg_stat_activity where pid = %s", (pid,)).fetchone()
        if row and row["wait_event_type"] == "Lock":
            return True
        time.sleep(0.02)
    return False


def _race(db_url, conn, first_user, first_sql, second_user, second_sql, params):
    """``first`` runs and holds its transaction; ``second`` starts and must wait; ``first`` commits."""
    t1, t2 = _session(db_url, first_user), _session(db_url, second_user)
    outcome: dict[str, Any] = {}

    def second():
        try:
            outcome["result"] = t2.execute(second_sql, params).fetchone()
            t2.commit()
        except psycopg.Error as exc:
            t2.rollback()
            outcome["error"] = exc

    try:
        first = t1.execute(first_sql, params).fetchone()
        thread = threading.Thread(target=second)
        thread.start()
        assert _blocked(conn, t2.info.backend_pid), "the second transaction should wait for the first"
        t1.commit()
        thread.join(10)
        return first, outcome
    finally:
        t1.close()
        t2.close()


@pytest.mark.parametrize(("first_sql", "second_sql"), [
    pytest.param("select public.set_member_role('acme', %(b)s, 'member')",
                 "select public.set_member_role('acme', %(a)s, 'member')", id="demote_each_other"),
    pytest.param("select public.remove_member('acme', %(b)s)",
                 "select public.remove_member('acme', %(a)s)", id="remove_each_other"),
    pytest.param("select public.set_member_role('acme', %(b)s, 'viewer')",
                 "select public.remove_member('acme', %(a)s)", id="demote_vs_remove"),
])
def test_two_admins_cannot_leave_the_org_without_an_admin(db_url, conn, world, first_sql, second_sql):
    a, b = world.user(), world.user()
    org = world.org("acme", admin=a)
    world.member(org, b, "admin")
    _first, outcome = _race(db_url, conn, a, first_sql, b, second_sql, {"a": a, "b": b})
    assert "error" in outcome, "B acted on rights A had just taken away"
    assert outcome["error"].diag.sqlstate in ("PT403", "PT404")
    admins = conn.execute("select user_id from public.org_members where org_id = %s and role = 'admin'",
                          (org,)).fetchall()
    assert [r["user_id"] for r in admins] == [uuid.UUID(a)]


@pytest.mark.parametrize("change", [
    pytest.param("select public.remove_member('acme', %(m)s)", id="removed"),
    pytest.param("select public.set_member_role('acme', %(m)s, 'viewer')", id="demoted_to_viewer"),
])
def test_a_member_removed_during_a_spend_cannot_spend_after(db_url, conn, world, change):
    admin, member = world.user(), world.user()
    org = world.org("acme", balance=50, admin=admin)
    world.member(org, member)
    _first, outcome = _race(db_url, conn, admin, change, member,
                            "select public.debit_credits(1, 'explain', 'acme') as r", {"m": member})
    assert "error" in outcome, f"spent after losing the right: {outcome.get('result')}"
    assert outcome["error"].diag.sqlstate == "PT403"
    assert conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (org,)).fetchone()[
        "credit_balance"] == 50


def _spend_in_background(session: psycopg.Connection[Any], sql: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``sql`` (a spend) in its own transaction on a thread; the outcome's ``result`` or ``error`` once joined."""
    outcome: dict[str, Any] = {}

    def spend() -> None:
        try:
            outcome["result"] = session.execute(sql).fetchone()
            session.commit()
        except psycopg.Error as exc:
            session.rollback()
            outcome["error"] = exc

    thread = threading.Thread(target=spend)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize(("change", "sliced"), [
    pytest.param("delete from public.org_members where user_id = %(m)s", False, id="row_deleted"),
    pytest.param("update public.org_members set role = 'viewer' where user_id = %(m)s", False, id="row_demoted"),
    pytest.param("delete from auth.users where id = %(m)s", False, id="user_deleted"),
    pytest.param("delete from public.org_members where user_id = %(m)s", True, id="row_deleted_sliced"),
])
def test_a_membership_changed_outside_our_rpcs_during_a_spend_still_wins(db_url, conn, world, change, sliced):
    """The dashboard (or a cascade from auth.users) changes membership rows without our RPCs' locks: a spend that read
    the old rights while the change was in flight must not complete with them."""
    admin, member = world.user(), world.user()
    org = world.org("acme", balance=50, admin=admin)
    world.member(org, member)
    if sliced:
        conn.execute("select public.admin_set_slices('acme', 4)")
    owner = psycopg.connect(db_url, row_factory=dict_row)
    spender = _session(db_url, member)
    try:
        owner.execute(change, {"m": member})
        if sliced:  # a slice is not the row the change bumps: hold the slices as a removal through our RPCs would
            owner.execute("select 1 from public.credit_slices where account_id = %s for update", (org,))
        thread, outcome = _spend_in_background(spender, "select public.debit_credits(1, 'explain', 'acme') as r")
        assert _blocked(conn, spender.info.backend_pid), "the spend should wait for the change"
        owner.commit()
        thread.join(10)
    finally:
        owner.close()
        spender.close()
    assert "error" in outcome, f"spent with rights taken away: {outcome.get('result')}"
    assert outcome["error"].diag.sqlstate == "PT403"
    assert conn.execute("select private.account_balance(%s) as b", (org,)).fetchone()["b"] == 50


def test_a_revoked_service_key_cannot_finish_a_spend(db_url, conn, world):
    admin = world.user()
    org = world.org("acme", balance=50, admin=admin)
    ci = world.key(admin, kind="service", org=org)
    t1 = _session(db_url, admin)
    t2 = psycopg.connect(db_url, row_factory=dict_row)
    t2.execute("select set_config('role', 'authenticated', false), set_config('request.jwt.claims', %s, false)",
               (json.dumps({"role": "authenticated", "upshift": {"key_id": ci["id"], "kind": "service",
                                                                  "org_id": org}}),))
    t2.commit()
    try:
        t1.execute("select public.revoke_api_key(%s)", (ci["id"],))
        thread, outcome = _spend_in_background(t2, "select public.debit_credits(1, 'explain') as r")
        assert _blocked(conn, t2.info.backend_pid)
        t1.commit()
        thread.join(10)
    finally:
        t1.close()
        t2.close()
    assert "error" in outcome and outcome["error"].diag.sqlstate == "PT403"


@pytest.mark.parametrize("how", ["remove", "demote"])
def test_removed_or_demoted_admin_loses_their_keys_and_invites(conn, world, how):
    a, b = world.user("a@acme.test"), world.user("b@acme.test")
    org = world.org("acme", balance=10, admin=a)
    world.member(org, b, "admin")
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": b}, commit=True) as cur:
        key = cur.execute("select public.create_api_key('b ci', 'service', 'acme') as r").fetchone()["r"]
        invite = cur.execute("select public.create_invite('acme', 'b2@acme.test', 'admin') as r").fetchone()["r"]
        personal = cur.execute("select public.create_api_key('b own', 'personal', 'acme') as r").fetchone()["r"]
    sql = ("select public.remove_member('acme', %s) as r" if how == "remove"
           else "select public.set_member_role('acme', %s, 'member') as r")
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": a}, commit=True) as cur:
        out = cur.execute(sql, (b,)).fetchone()["r"]
    assert [k["id"] for k in out["revoked_api_keys"]] == [key["id"]]
    assert [i["id"] for i in out["revoked_invites"]] == [invite["id"]]
    with acting_as(conn, "service_role", {"role": "service_role"}) as cur:
        status = cur.execute("select public.authenticate_api_key(encode(sha256(convert_to(%s, 'UTF8')), 'hex')) as r",
                             (key["secret"],)).fetchone()["r"]
        assert status["status"] == "revoked"
        own = cur.execute("select public.authenticate_api_key(encode(sha256(convert_to(%s, 'UTF8')), 'hex')) as r",
                          (personal["secret"],)).fetchone()["r"]
        assert own["status"] == "active"  # their own personal key stays theirs (it no longer reaches the org)
    second = world.user("b2@acme.test")
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": second}) as cur:
        cur.execute("select public.accept_invite(%s)", (invite["token"],))
    assert exc.value.diag.sqlstate == "PT409"
    events = conn.execute("select event_type, resource_id, metadata from public.audit_logs where org_id = %s"
                          " and event_type in ('api_key_revoked', 'invite_revoked') order by seq", (org,)).fetchall()
    assert [(e["event_type"], e["resource_id"]) for e in events] == [
        ("api_key_revoked", key["id"]), ("invite_revoked", invite["id"])]
    assert {e["metadata"]["via"] for e in events} == {"member_removed" if how == "remove" else "member_demoted"}


def test_an_invite_from_an_admin_who_lost_the_role_is_refused(conn, world):
    """Belt and braces: even an invite the revocation missed (written by hand) cannot be accepted."""
    a, b = world.user("a@acme.test"), world.user("b@acme.test")
    org = world.org("acme", admin=a)
    world.member(org, b, "admin")
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": b}, commit=True) as cur:
        invite = cur.execute("select public.create_invite('acme', 'c@acme.test', 'admin') as r").fetchone()["r"]
    conn.execute("update public.org_members set role = 'member' where user_id = %s", (b,))
    c = world.user("c@acme.test")
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": c}) as cur:
        cur.execute("select public.accept_invite(%s)", (invite["token"],))
    assert exc.value.diag.sqlstate == "PT409"


# --- 5. lower findings ----------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["credits_granted.manual", "credit_debit.x", "audit_purged.fake",
                                        "member_added.via_sso", "plan_changed.v2"])
def test_client_event_types_that_look_reserved_are_refused(conn, world, event_type):
    user = world.user()
    with pytest.raises(psycopg.Error) as exc, \
            acting_as(conn, "authenticated", {"role": "authenticated", "sub": user}) as cur:
        cur.execute("select public.record_audit_events(%s::jsonb)",
                    (json.dumps([{"event_type": event_type, "resource_type": "x"}]),))
    assert exc.value.diag.sqlstate == "PT400"
    assert json.loads(exc.value.diag.message_detail)["error"] == "reserved_event_type"


def test_purging_is_recorded_and_is_the_only_way_to_delete(conn, world):
    admin = world.user()
    org = world.org("acme", plan="pro", admin=admin)
    with acting_as(conn, "authenticated", {"role": "authenticated", "sub": admin}, commit=True) as cur:
        cur.execute("select public.record_audit_events(%s::jsonb, 'acme')",
                    (json.dumps([{"event_type": "deploy", "resource_type": "app"}] * 3),))
    conn.execute("select public.admin_set_audit_retention('acme', 1)")
    # Age the first events by hand (as the owner, triggers off), as if they were two days old.
    conn.execute("alter table public.audit_logs disable trigger audit_logs_no_update")
    conn.execute("update public.audit_logs set created_at = created_at - interval '2 days' where org_id = %s", (org,))
    conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")
    old = conn.execute("select count(*) as n from public.audit_logs where org_id = %s", (org,)).fetchone()["n"]
    # The retention switch is not a session setting anyone can flip: the owner is refused too.
    conn.execute("set upshift.audit_purge = 'on'")
    with pytest.raises(psycopg.Error):
        conn.execute("delete from public.audit_logs where org_id = %s", (org,))
    conn.execute("reset upshift.audit_purge")
    with acting_as(conn, "service_role", {"role": "service_role"}, commit=True) as cur:
        with pytest.raises(psycopg.Error) as exc:
            with cur.connection.transaction():
                cur.execute("select public.purge_audit_logs(now() + interval '1 day')")
        assert exc.value.diag.sqlstate == "PT400"  # never purge what is still inside its retention
        out = cur.execute("select public.purge_audit_logs() as r").fetchone()["r"]
    assert out["deleted"] == old
    rows = conn.execute("select seq, event_type, actor_kind, metadata from public.audit_logs where org_id = %s",
                        (org,)).fetchall()
    assert [r["event_type"] for r in rows] == ["audit_purged"]
    assert rows[0]["metadata"]["deleted"] == old and rows[0]["metadata"]["through_seq"] == old
    assert rows[0]["seq"] == old + 1
    verified = conn.execute("select public.admin_verify_audit_log('acme') as r").fetchone()["r"]
    assert verified["ok"] and verified["head_seq"] == old + 1
