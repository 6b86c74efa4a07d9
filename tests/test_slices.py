"""Sliced pools: a hot org's balance spread over several rows, and everything that must still hold.

No overdraft (the balance is the sum of the slices, never negative), refusal only when the whole pool
cannot pay, replays exactly once, rebalancing ledger-neutral and audited, the ledger invariant and the
audit chain intact, and a member's removal still winning against a spend in flight.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import acting_as, claims_for, run_together
from tests.test_reliability import chains_verify, invariant


def slices(conn, org) -> list[int]:
    return [r["balance"] for r in conn.execute(
        "select balance from public.credit_slices where account_id = %s order by slice", (org,))]


def balance(conn, org) -> int:
    return conn.execute("select private.account_balance(%s) as b", (org,)).fetchone()["b"]


def spend(cur, amount: int, key: str | None = None) -> dict[str, Any]:
    return cur.execute("select public.debit_credits(%s, 'explain', 'hot', %s) as r", (amount, key)).fetchone()["r"]


def set_slices(conn, n: int) -> dict[str, Any]:
    return conn.execute("select public.admin_set_slices('hot', %s) as r", (n,)).fetchone()["r"]


def test_slicing_is_ledger_neutral_and_audited(conn, world):
    org, _ = world.crowd("hot", balance=103, members=1)
    ledger = conn.execute("select count(*) as n from public.credit_transactions").fetchone()["n"]
    assert set_slices(conn, 8) == {"org_id": org, "slices": 8, "balance": 103}
    assert slices(conn, org) == [13, 13, 13, 13, 13, 13, 13, 12]
    assert conn.execute("select balance, slices from public.credit_accounts where id = %s", (org,)).fetchone() == {
        "balance": 0, "slices": 8}
    assert conn.execute("select count(*) as n from public.credit_transactions").fetchone()["n"] == ledger
    event = conn.execute("select metadata from public.audit_logs where org_id = %s and event_type ="
                         " 'credit_pool_rebalanced'", (org,)).fetchone()["metadata"]
    assert event == {"slices_before": 1, "slices": 8, "balance": 103, "cause": "operator"}
    assert set_slices(conn, 1)["balance"] == 103 and slices(conn, org) == []
    assert conn.execute("select balance from public.credit_accounts where id = %s", (org,)).fetchone()["balance"] == 103
    invariant(conn)
    chains_verify(conn)


def test_a_64_way_race_on_a_sliced_pool_never_overdraws_and_replays_once(db_url, conn, world):
    org, users = world.crowd("hot", balance=150, members=8)
    set_slices(conn, 8)
    outcomes: list[tuple[str, str | None, Any]] = []
    lock = threading.Lock()

    def work(i: int, c: psycopg.Connection[dict[str, Any]]) -> None:
        user = users[i % len(users)]
        for n in range(6):
            key = f"{user}:{n % 4}"  # the 8 clients of one user share keys: replays race their originals
            try:
                with acting_as(c, "authenticated", claims_for(user), commit=True) as cur:
                    r = spend(cur, 1, key)
                result: tuple[str, str | None, Any] = ("ok", key, r)
            except psycopg.Error as exc:
                result = (exc.diag.sqlstate or "?", key, None)
            with lock:
                outcomes.append(result)

    run_together(db_url, 64, work)
    assert {o[0] for o in outcomes} <= {"ok", "PT402"}, outcomes
    originals = {o[1]: o[2] for o in outcomes if o[0] == "ok" and not o[2]["replayed"]}
    for state, key, r in outcomes:
        if state == "ok" and r["replayed"]:
            assert r["transaction_id"] == originals[key]["transaction_id"]  # the first attempt's result
    spent = len(originals)
    assert spent == len({f"{u}:{n}" for u in users for n in range(4)}) <= 150
    assert balance(conn, org) == 150 - spent >= 0
    assert all(b >= 0 for b in slices(conn, org))
    debits = conn.execute("select count(*) as n from public.credit_transactions where account_id = %s and amount < 0",
                          (org,)).fetchone()["n"]
    assert debits == spent
    invariant(conn)
    chains_verify(conn)
    events = conn.execute("select count(*) as n from public.audit_logs where org_id = %s and event_type = 'credit_debit'",
                          (org,)).fetchone()["n"]
    assert events == spent  # exactly one event per committed debit, sealed into the chain


def test_64_clients_drain_a_sliced_pool_to_exactly_zero(db_url, conn, world):
    org, users = world.crowd("hot", balance=100, members=16)
    set_slices(conn, 16)
    results: list[str] = []
    lock = threading.Lock()

    def work(i: int, c: psycopg.Connection[dict[str, Any]]) -> None:
        for _ in range(3):
            try:
                with acting_as(c, "authenticated", claims_for(users[i % len(users)]), commit=True) as cur:
                    spend(cur, 1)
                state = "ok"
            except psycopg.Error as exc:
                state = exc.diag.sqlstate or "?"
            with lock:
                results.append(state)

    run_together(db_url, 64, work)
    assert results.count("ok") == 100 and set(results) <= {"ok", "PT402"}
    assert balance(conn, org) == 0
    invariant(conn)
    chains_verify(conn)


def test_refused_only_when_the_whole_pool_cannot_pay(conn, world, as_role):
    org, users = world.crowd("hot", balance=8, members=1)
    set_slices(conn, 8)  # one credit in each slice: no slice can pay 5 alone
    with as_role("authenticated", users[0]) as cur:
        assert spend(cur, 5)["balance"] == 3
    with acting_as(conn, "authenticated", claims_for(users[0]), commit=True) as cur:
        spend(cur, 5)
    assert balance(conn, org) == 3 and sum(slices(conn, org)) == 3
    causes = [r["metadata"]["cause"] for r in conn.execute(
        "select metadata from public.audit_logs where org_id = %s and event_type = 'credit_pool_rebalanced'"
        " order by seq", (org,))]
    assert causes == ["operator", "shortage"]
    with pytest.raises(psycopg.Error) as exc, as_role("authenticated", users[0]) as cur:
        spend(cur, 4)
    assert exc.value.diag.sqlstate == "PT402"
    assert json.loads(exc.value.diag.message_detail)["balance"] == 3
    invariant(conn)


def test_grants_and_take_backs_keep_the_pool_whole(conn, world):
    org, _ = world.crowd("hot", balance=10, members=1)
    set_slices(conn, 4)
    conn.execute("select public.grant_credits(90, 'admin_grant', 'hot', null, 'top-up')")
    assert balance(conn, org) == 100 and len(slices(conn, org)) == 4
    taken = conn.execute("select private.apply_credit_change(%s, -120, 'refund', 'clawback', true, '{}'::jsonb,"
                         " p_partial => true, p_audit => false) as r", (org,)).fetchone()["r"]
    assert taken["amount"] == -100 and balance(conn, org) == 0  # takes what is there, never below zero
    invariant(conn)


def test_contention_grows_the_pool(db_url, conn, world):
    org, users = world.crowd("hot", balance=100, members=1)
    set_slices(conn, 2)
    blocker = psycopg.connect(db_url)  # every slice busy: a spend can only wait for the whole pool
    blocker.execute("select 1 from public.credit_slices where account_id = %s for update", (org,))
    out: dict[str, Any] = {}

    def spender() -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c, \
                acting_as(c, "authenticated", claims_for(users[0]), commit=True) as cur:
            out["r"] = spend(cur, 1)

    t = threading.Thread(target=spender)
    t.start()
    time.sleep(0.5)
    blocker.rollback()
    blocker.close()
    t.join(10)
    assert out["r"]["balance"] == 99
    assert conn.execute("select slices from public.credit_accounts where id = %s", (org,)).fetchone()["slices"] == 4
    cause = conn.execute("select metadata ->> 'cause' as c from public.audit_logs where org_id = %s"
                         " and event_type = 'credit_pool_rebalanced' order by seq desc limit 1", (org,)).fetchone()["c"]
    assert cause == "contention"
    invariant(conn)


def test_a_member_removed_during_a_spend_on_a_sliced_pool_cannot_spend_after(db_url, conn, world):
    admin, member = world.user(), world.user()
    org = world.org("hot", balance=50, admin=admin)
    world.member(org, member)
    set_slices(conn, 4)
    remover = psycopg.connect(db_url, row_factory=dict_row)
    remover.execute("select set_config('role', 'authenticated', false), set_config('request.jwt.claims', %s, false)",
                    (json.dumps(claims_for(admin)),))
    remover.execute("select public.remove_member('hot', %s)", (member,))  # holds the whole pool until commit
    out: dict[str, Any] = {}

    def spender() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c, \
                    acting_as(c, "authenticated", claims_for(member), commit=True) as cur:
                out["r"] = spend(cur, 1)
        except psycopg.Error as exc:
            out["error"] = exc.diag.sqlstate

    t = threading.Thread(target=spender)
    t.start()
    time.sleep(0.5)
    remover.commit()
    remover.close()
    t.join(10)
    assert out == {"error": "PT403"}
    assert balance(conn, org) == 50


def test_the_fast_and_the_full_path_write_the_same_rows(conn, world):
    """debit_credits answers its common case in private.spend_fast and everything else in apply_credit_change:
    a spend that each of them pays leaves the same ledger row, the same audit event and the same answer."""
    org, users = world.crowd("hot", balance=8, members=1)
    set_slices(conn, 8)  # one credit per slice
    answers = []
    with acting_as(conn, "authenticated", claims_for(users[0]), commit=True) as cur:
        answers.append(spend(cur, 1, "fast"))  # a slice can pay: the fast path
    with acting_as(conn, "authenticated", claims_for(users[0]), commit=True) as cur:
        answers.append(spend(cur, 5, "full"))  # no slice can: the whole pool, through the full path
    conn.execute("select public.seal_audit_logs()")
    rows = conn.execute(
        "select t.id, t.account_id::text, t.actor_user_id::text, t.service_key_id, t.amount, t.balance_after, t.reason,"
        " t.idempotency_key, t.system_key, t.metadata, l.scope_id::text, l.org_id::text, l.user_id::text, l.actor_kind,"
        " l.service_key_id as event_key, l.event_type, l.resource_type, l.metadata as event"
        " from public.credit_transactions t join public.audit_logs l on l.resource_id = t.id::text"
        " where t.account_id = %s and t.amount < 0 order by t.created_at, t.amount desc", (org,)).fetchall()
    assert [r["idempotency_key"] for r in rows] == ["fast", "full"]
    shape = [{k: v for k, v in r.items() if k not in ("id", "amount", "balance_after", "idempotency_key", "event")}
             for r in rows]
    assert shape[0] == shape[1] == {
        "account_id": org, "actor_user_id": users[0], "service_key_id": None, "reason": "explain", "system_key": None,
        "metadata": {}, "scope_id": org, "org_id": org, "user_id": users[0], "actor_kind": "user", "event_key": None,
        "event_type": "credit_debit", "resource_type": "credit_transaction"}
    assert [r["event"] for r in rows] == [
        {"amount": 1, "reason": "explain", "source": "org", "balance_after": 7, "idempotency_key": "fast"},
        {"amount": 5, "reason": "explain", "source": "org", "balance_after": 2, "idempotency_key": "full"}]
    assert [{k: v for k, v in a.items() if k != "transaction_id"} for a in answers] == [
        {"source": "org", "org_id": org, "org_slug": "hot", "user_id": None, "amount": -1, "balance": 7,
         "reason": "explain", "replayed": False},
        {"source": "org", "org_id": org, "org_slug": "hot", "user_id": None, "amount": -5, "balance": 2,
         "reason": "explain", "replayed": False}]
    invariant(conn)
    chains_verify(conn)
