"""An outsider attacks with timing: real concurrent connections (threads), each a PostgREST-like transaction.

Spending twice, replaying an idempotency key from many connections at once, forking the audit chain,
and keeping an admin's power by acting while the admin role is being taken away.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import acting_as
from tests.test_outsider_rpc import assert_chains_verify, assert_ledger_ok, claims

THREADS = 24


def run_concurrently(db_url: str, jobs: list[tuple[dict[str, Any], str, tuple[Any, ...]]]) -> list[Any]:
    """Each job (claims, sql, params) in its own connection and thread, released together; results or errors."""
    results: list[Any] = [None] * len(jobs)
    gate = threading.Barrier(len(jobs))

    def work(i: int, c: dict[str, Any], sql: str, params: tuple[Any, ...]) -> None:
        try:
            with psycopg.connect(db_url, row_factory=dict_row) as conn:
                conn.execute("select 1")
                gate.wait(timeout=30)
                with acting_as(conn, "authenticated", c, commit=True) as cur:
                    results[i] = cur.execute(sql, params).fetchone()["r"]
        except psycopg.Error as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def errors(results: list[Any]) -> list[str]:
    return [r.diag.sqlstate for r in results if isinstance(r, psycopg.Error)]


@pytest.fixture
def acme(world):
    acme = world.team(balance=10, roles={"m1": "member", "m2": "member"})
    ci = world.key(acme["admin"], kind="service", org=acme["org"])
    return {**acme, "ci": ci,
            "ci_claims": claims(None, upshift={"key_id": ci["id"], "kind": "service", "org_id": acme["org"]})}


def balance(conn, org: str) -> int:
    return conn.execute("select balance from public.credit_accounts where id = %s", (org,)).fetchone()["balance"]


# --- spending --------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["members_and_ci", "one_member"])
def test_many_concurrent_spends_never_spend_more_than_the_pool(db_url, conn, acme, who):
    actors = [claims(acme["m1"]), claims(acme["m2"]), acme["ci_claims"]] if who == "members_and_ci" \
        else [claims(acme["m1"])]
    jobs = [(actors[i % len(actors)], "select public.debit_credits(1, 'explain', 'acme') as r", ())
            for i in range(THREADS)]
    results = run_concurrently(db_url, jobs)
    ok = [r for r in results if isinstance(r, dict)]
    assert len(ok) == 10 and set(errors(results)) == {"PT402"}
    assert sorted(r["balance"] for r in ok) == list(range(10))  # each credit spent exactly once
    assert balance(conn, acme["org"]) == 0
    assert_ledger_ok(conn)


def test_one_idempotency_key_from_many_connections_charges_once(db_url, conn, acme):
    jobs = [(claims(acme["m1"]), "select public.debit_credits(3, 'fix', 'acme', 'retry-storm') as r", ())
            for _ in range(THREADS)]
    results = run_concurrently(db_url, jobs)
    assert errors(results) == []
    assert len({r["transaction_id"] for r in results}) == 1
    assert sum(1 for r in results if not r["replayed"]) == 1
    assert balance(conn, acme["org"]) == 7
    assert_ledger_ok(conn)


def test_one_idempotency_key_from_two_actors_at_once_charges_once(db_url, conn, acme):
    jobs = [(claims(acme["m1"] if i % 2 else acme["m2"]),
             "select public.debit_credits(1, 'explain', 'acme', 'shared-key') as r", ()) for i in range(THREADS)]
    results = run_concurrently(db_url, jobs)
    assert set(errors(results)) <= {"PT409"}
    winners = {r["transaction_id"] for r in results if isinstance(r, dict)}
    assert len(winners) == 1
    assert balance(conn, acme["org"]) == 9
    assert_ledger_ok(conn)


def test_one_idempotency_key_with_different_amounts_at_once_charges_once(db_url, conn, acme):
    """A racing client hopes two different bodies with one key both land before the conflict check."""
    jobs = [(claims(acme["m1"]), "select public.debit_credits(%s, 'explain', 'acme', 'same-key') as r", (1 + i % 3,))
            for i in range(THREADS)]
    results = run_concurrently(db_url, jobs)
    assert set(errors(results)) <= {"PT409"}
    charged = {r["amount"] for r in results if isinstance(r, dict)}
    assert len(charged) == 1
    assert balance(conn, acme["org"]) == 10 + charged.pop()
    assert_ledger_ok(conn)


def test_personal_and_org_spends_interleaved_keep_every_ledger(db_url, conn, acme):
    jobs = []
    for i in range(THREADS):
        org = "'acme'" if i % 2 else "null"
        jobs.append((claims(acme["m1"] if i % 4 < 2 else acme["m2"]),
                     f"select public.debit_credits(1, 'explain', {org}, 'k-' || %s) as r", (str(i),)))
    results = run_concurrently(db_url, jobs)
    assert set(errors(results)) <= {"PT402"}
    assert balance(conn, acme["org"]) >= 0
    assert_ledger_ok(conn)


# --- the audit chain -------------------------------------------------------------------------------


def test_concurrent_appends_cannot_fork_the_chain(db_url, conn, acme):
    ev = json.dumps([{"event_type": "deploy", "resource_type": "app"}] * 5)
    actors = [claims(acme["m1"]), claims(acme["m2"]), acme["ci_claims"], claims(acme["admin"])]
    jobs = [(actors[i % 4], "select public.record_audit_events(%s::jsonb, 'acme') as r", (ev,)) for i in range(THREADS)]
    jobs += [(claims(acme["m1"]), "select public.debit_credits(1, 'explain', 'acme') as r", ()) for _ in range(8)]
    results = run_concurrently(db_url, jobs)
    assert set(errors(results)) <= {"PT402"}
    seqs = [r["seq"] for r in conn.execute("select seq from public.audit_logs where scope_id = %s order by seq",
                                           (acme["org"],)).fetchall()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert_chains_verify(conn)
    assert_ledger_ok(conn)


def test_one_audit_idempotency_key_at_once_records_once(db_url, conn, acme):
    ev = json.dumps([{"event_type": "deploy", "resource_type": "app"}] * 3)
    jobs = [(acme["ci_claims"], "select public.record_audit_events(%s::jsonb, null, 'ci-run-9') as r", (ev,))
            for _ in range(THREADS)]
    results = run_concurrently(db_url, jobs)
    assert errors(results) == []
    assert sum(1 for r in results if not r["replayed"]) == 1
    n = conn.execute("select count(*) as n from public.audit_logs where event_type = 'deploy'").fetchone()["n"]
    assert n == 3
    assert_chains_verify(conn)


# --- invites ---------------------------------------------------------------------------------------


def test_one_invite_accepted_from_many_connections_at_once_admits_once(db_url, conn, world, acme):
    new = world.user("new@acme.test")
    with acting_as(conn, "authenticated", claims(acme["admin"]), commit=True) as cur:
        token = cur.execute("select public.create_invite('acme', 'new@acme.test', 'member') as r"
                            ).fetchone()["r"]["token"]
    results = run_concurrently(db_url, [(claims(new), "select public.accept_invite(%s) as r", (token,))] * 8)
    assert sum(1 for r in results if isinstance(r, dict)) == 1
    assert set(errors(results)) <= {"PT409"}
    n = conn.execute("select count(*) as n from public.org_members where user_id = %s", (new,)).fetchone()["n"]
    assert n == 1


def test_accept_and_revoke_of_one_invite_at_once_never_both_succeed(db_url, conn, world, acme):
    new = world.user("new@acme.test")
    with acting_as(conn, "authenticated", claims(acme["admin"]), commit=True) as cur:
        inv = cur.execute("select public.create_invite('acme', 'new@acme.test', 'admin') as r").fetchone()["r"]
    jobs = [(claims(new), "select public.accept_invite(%s) as r", (inv["token"],)),
            (claims(acme["admin"]), "select public.revoke_invite('acme', %s) as r", (inv["id"],))]
    results = run_concurrently(db_url, jobs)
    assert sum(1 for r in results if isinstance(r, dict)) == 1
    row = conn.execute("select accepted_at, revoked_at from public.org_invites where id = %s", (inv["id"],)).fetchone()
    member = conn.execute("select 1 from public.org_members where user_id = %s", (new,)).fetchone()
    assert (row["accepted_at"] is not None) == (member is not None) != (row["revoked_at"] is not None)


# --- acting while the admin role is taken away ------------------------------------------------------


def _while_losing_admin(db_url: str, conn, world, acme, create_sql: str, take_away_sql: str,
                        ) -> tuple[dict[str, Any], str]:
    """admin2 creates something as an admin while admin1 takes the role away.

    To make the interleaving deterministic, a third session holds a row lock on admin2's auth.users row
    (Supabase Auth updates that row on every sign-in and token refresh; here it only widens a window that
    exists anyway): admin2's call passes its admin check, then waits on the foreign-key check of its insert
    while the demotion or removal commits; then the lock goes away.
    """
    admin2 = world.user("admin2@acme.test")
    world.member(acme["org"], admin2, "admin")
    blocker = psycopg.connect(db_url)
    blocker.execute("select 1 from auth.users where id = %s for update", (admin2,))
    out: dict[str, Any] = {}

    def create() -> None:
        try:
            with psycopg.connect(db_url, row_factory=dict_row) as c, \
                    acting_as(c, "authenticated", claims(admin2), commit=True) as cur:
                out["created"] = cur.execute(create_sql).fetchone()["r"]
        except psycopg.Error as exc:
            out["created"] = exc

    t = threading.Thread(target=create)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until admin2's call is blocked on the lock
        waiting = conn.execute("select count(*) as n from pg_stat_activity where wait_event_type = 'Lock'"
                               " and datname = current_database()").fetchone()["n"]
        if waiting:
            break
        time.sleep(0.02)
    def take_away() -> None:
        with psycopg.connect(db_url, row_factory=dict_row) as c, \
                acting_as(c, "authenticated", claims(acme["admin"]), commit=True) as cur:
            cur.execute("set local lock_timeout = '20s'")  # never hang the suite, whatever the lock order
            out["taken_away"] = cur.execute(take_away_sql, (admin2,)).fetchone()

    # The demotion may have to wait for admin2's call (both take the org's lock): let it run, give it time
    # to commit if it can, then release admin2's call.
    t2 = threading.Thread(target=take_away)
    t2.start()
    t2.join(timeout=1.0)
    blocker.rollback()
    blocker.close()
    t.join(timeout=30)
    t2.join(timeout=30)
    assert "taken_away" in out, "the demotion or removal did not go through"
    return out, admin2


@pytest.mark.parametrize("take_away", [
    pytest.param("select public.set_member_role('acme', %s, 'member')", id="demoted_to_member"),
    pytest.param("select public.set_member_role('acme', %s, 'viewer')", id="demoted_to_viewer"),
    pytest.param("select public.remove_member('acme', %s)", id="removed"),
])
def test_a_service_key_created_while_losing_admin_does_not_survive(db_url, conn, world, acme, client, take_away):
    out, _admin2 = _while_losing_admin(db_url, conn, world, acme,
                                       "select public.create_api_key('late ci', 'service', 'acme') as r", take_away)
    created = out["created"]
    if isinstance(created, psycopg.Error):
        return  # refused: fine
    before = balance(conn, acme["org"])
    resp = client.post("/credits/consume", json={"action": "explain", "count": 1},
                       headers={"Authorization": f"Bearer {created['secret']}"})
    assert resp.status_code == 401, resp.get_json()  # the key must be revoked: no more spending of acme's pool
    assert balance(conn, acme["org"]) == before
    assert_ledger_ok(conn)


def test_a_spend_racing_a_key_revocation_is_all_or_nothing(db_url, conn, acme):
    jobs: list[tuple[dict[str, Any], str, tuple[Any, ...]]] = [
        (acme["ci_claims"], "select public.debit_credits(1, 'explain') as r", ()) for _ in range(8)]
    jobs.append((claims(acme["admin"]), "select public.revoke_api_key(%s) as r", (acme["ci"]["id"],)))
    results = run_concurrently(db_url, jobs)
    assert set(errors(results)) <= {"PT403", "PT402"}
    revoked_at = conn.execute("select revoked_at from public.api_keys where id = %s", (acme["ci"]["id"],)
                              ).fetchone()["revoked_at"]
    late = conn.execute("select count(*) as n from public.credit_transactions where service_key_id = %s"
                        " and created_at > %s", (acme["ci"]["id"], revoked_at)).fetchone()["n"]
    assert late == 0
    spent = conn.execute("select count(*) as n from public.credit_transactions where service_key_id = %s",
                         (acme["ci"]["id"],)).fetchone()["n"]
    assert spent == sum(1 for r in results[:-1] if isinstance(r, dict))
    assert_ledger_ok(conn)

