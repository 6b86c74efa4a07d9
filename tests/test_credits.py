"""Credit pools: debit_credits / grant_credits rules, idempotency, concurrency, the ledger invariant."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import acting_as, claims_for, run_together


@pytest.fixture
def team(world):
    admin, member, viewer, outsider = (world.user(f"{n}@acme.test") for n in ("admin", "member", "viewer", "out"))
    org = world.org("acme", admin=admin, balance=100)
    world.member(org, member, "member")
    world.member(org, viewer, "viewer")
    other = world.org("other", admin=outsider, balance=50)
    return {"org": org, "other": other, "admin": admin, "member": member, "viewer": viewer, "outsider": outsider}


def debit(conn, user_id, amount, reason="explain", org=None, key=None, metadata=None, claims=None):
    with acting_as(conn, "authenticated", claims or claims_for(user_id), commit=True) as cur:
        return cur.execute("select public.debit_credits(%s, %s, %s, %s, %s) as r",
                           (amount, reason, org, key, json.dumps(metadata or {}))).fetchone()["r"]


def balances(conn, team):
    row = conn.execute(
        "select (select balance from public.credit_accounts where id = %(org)s) as org,"
        " (select balance from public.credit_accounts where id = %(other)s) as other,"
        " (select sum(balance) from public.credit_accounts where org_id is null) as personal,"
        " (select count(*) from public.credit_transactions) as ledger_rows", team).fetchone()
    return dict(row)


def assert_invariant(conn):
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []
    assert conn.execute("select * from public.lot_mismatches()").fetchall() == []  # lots = balance


def sqlstate(fn):
    with pytest.raises(psycopg.Error) as err:
        fn()
    return err.value.diag.sqlstate, json.loads(err.value.diag.message_detail or "{}")


def test_member_spends_org_pool(conn, team):
    r = debit(conn, team["member"], 3, "fix", "acme")
    assert r["source"] == "org" and r["balance"] == 97 and r["replayed"] is False
    assert r["org_slug"] == "acme" and r["amount"] == -3
    row = conn.execute("select * from public.credit_transactions where id = %s", (r["transaction_id"],)).fetchone()
    assert row["actor_user_id"] is not None and str(row["actor_user_id"]) == team["member"]
    assert row["balance_after"] == 97 and row["reason"] == "fix"
    assert_invariant(conn)


def test_no_org_spends_personal_balance(conn, team):
    r = debit(conn, team["viewer"], 4)
    assert r["source"] == "user" and r["balance"] == 6 and r["org_id"] is None
    assert_invariant(conn)


@pytest.mark.parametrize(
    ("who", "org", "code"),
    [
        pytest.param("viewer", "acme", "cannot_spend", id="viewer"),
        pytest.param("outsider", "acme", "org_forbidden", id="non_member"),
        pytest.param("member", "no-such-org", "org_forbidden", id="unknown_org"),
        pytest.param("member", "other", "org_forbidden", id="other_org"),
    ],
)
def test_not_allowed_to_spend_charges_nothing_anywhere(conn, team, who, org, code):
    before = balances(conn, team)
    state, detail = sqlstate(lambda: debit(conn, team[who], 1, org=org))
    assert state == "PT403" and detail["error"] == code
    assert balances(conn, team) == before


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param((0, "explain"), "invalid_amount", id="zero"),
        pytest.param((-5, "explain"), "invalid_amount", id="negative"),
        pytest.param((1_000_001, "explain"), "invalid_amount", id="too_large"),
        pytest.param((None, "explain"), "invalid_amount", id="null_amount"),
        pytest.param((1, ""), "invalid_reason", id="empty_reason"),
        pytest.param((1, None), "invalid_reason", id="null_reason"),
        pytest.param((1, "x" * 41), "invalid_reason", id="long_reason"),
        pytest.param((1, "Explain!"), "invalid_reason", id="bad_reason"),
        pytest.param((1, "explain", "acme", "k" * 201), "invalid_idempotency_key", id="long_key"),
        pytest.param((1, "explain", "acme", None, [1]), "invalid_metadata", id="metadata_array"),
        pytest.param((1, "explain", "acme", None, {"x": "y" * 5000}), "invalid_metadata", id="metadata_big"),
    ],
)
def test_bad_arguments_are_pt400_and_write_nothing(conn, team, args, code):
    before = balances(conn, team)
    amount, reason, *rest = args
    org = rest[0] if rest else "acme"
    key = rest[1] if len(rest) > 1 else None
    meta = rest[2] if len(rest) > 2 else {}
    state, detail = sqlstate(lambda: debit(conn, team["member"], amount, reason, org, key, meta))
    assert (state, detail["error"]) == ("PT400", code)
    assert balances(conn, team) == before


def test_insufficient_credits_is_pt402_with_balance_and_needed(conn, team):
    before = balances(conn, team)
    state, detail = sqlstate(lambda: debit(conn, team["member"], 101, org="acme"))
    assert state == "PT402"
    assert detail == {"error": "insufficient_credits", "balance": 100, "needed": 101, "source": "org",
                      "org_id": team["org"]}
    assert balances(conn, team) == before
    state, detail = sqlstate(lambda: debit(conn, team["member"], 11))
    assert state == "PT402" and detail["balance"] == 10 and detail["source"] == "user"


def test_idempotent_replay_and_conflict(conn, team):
    first = debit(conn, team["member"], 2, "audit", "acme", key="job-1")
    again = debit(conn, team["member"], 2, "audit", "acme", key="job-1")
    assert again["replayed"] is True
    assert {k: v for k, v in again.items() if k != "replayed"} == {k: v for k, v in first.items() if k != "replayed"}
    assert balances(conn, team)["org"] == 98
    for args in [(3, "audit"), (3, "fix")]:
        state, detail = sqlstate(lambda a=args: debit(conn, team["member"], a[0], a[1], "acme", key="job-1"))
        assert state == "PT409" and detail["error"] == "idempotency_conflict"
    # Another member using the same key is not a replay of someone else's charge.
    state, _ = sqlstate(lambda: debit(conn, team["admin"], 2, "audit", "acme", key="job-1"))
    assert state == "PT409"
    # The same key on another account is independent.
    assert debit(conn, team["member"], 2, "audit", None, key="job-1")["replayed"] is False
    assert balances(conn, team)["org"] == 98
    assert_invariant(conn)


def test_service_key_spends_its_org(conn, world, team):
    key = world.key(team["admin"], kind="service", org=team["org"])
    claims = {"role": "authenticated", "upshift": {"key_id": key["id"], "kind": "service", "org_id": team["org"]}}
    r = debit(conn, None, 5, claims=claims)
    assert r["source"] == "org" and r["balance"] == 95
    row = conn.execute("select actor_user_id as user_id, service_key_id from public.credit_transactions where id = %s",
                       (r["transaction_id"],)).fetchone()
    assert row["user_id"] is None and str(row["service_key_id"]) == key["id"]
    state, _ = sqlstate(lambda: debit(conn, None, 1, org="other", claims=claims))
    assert state == "PT403"
    conn.execute("update public.api_keys set revoked_at = now() where id = %s", (key["id"],))
    state, detail = sqlstate(lambda: debit(conn, None, 1, claims=claims))
    assert state == "PT403" and detail["error"] == "no_actor"


def test_grant_credits_is_service_role_only_and_idempotent(conn, team, as_role):
    with as_role("authenticated", team["admin"]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("select public.grant_credits(10, 'admin_grant', 'acme', null, 'k1')")
    with acting_as(conn, "service_role", commit=True) as cur:
        g1 = cur.execute("select public.grant_credits(10, 'purchase', 'acme', null, 'cs_1') as r").fetchone()["r"]
        g2 = cur.execute("select public.grant_credits(10, 'purchase', 'acme', null, 'cs_1') as r").fetchone()["r"]
        assert g1["balance"] == 110 and g2["replayed"] is True and g2["balance"] == 110
        with pytest.raises(psycopg.Error) as err:
            cur.execute("select public.grant_credits(10, 'purchase', 'acme', null, null)")
        assert err.value.diag.sqlstate == "PT400"


@pytest.mark.parametrize(("role", "expected"), [("admin", 2), ("viewer", 2), ("member", 1), ("outsider", 0)])
def test_ledger_rls(conn, team, as_role, role, expected):
    debit(conn, team["member"], 1, org="acme")
    with as_role("authenticated", team[role]) as cur:
        rows = cur.execute("select * from public.credit_transactions where account_id = %s", (team["org"],)).fetchall()
    # admin/viewer: the opening grant and the debit; member: their own debit only.
    assert len(rows) == expected


def test_personal_ledger_visible_only_to_owner(conn, team, as_role):
    with as_role("authenticated", team["admin"]) as cur:
        rows = cur.execute("select t.account_id as user_id from public.credit_transactions t"
                           " join public.credit_accounts a on a.id = t.account_id where a.org_id is null").fetchall()
    assert {str(r["user_id"]) for r in rows} == {team["admin"]}


def test_no_role_writes_the_ledger(team, as_role):
    for role in ("authenticated", "service_role"):
        with as_role(role, team["admin"] if role == "authenticated" else None) as cur, \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("insert into public.credit_transactions (account_id, amount, balance_after, reason)"
                        " values (%s, 5, 15, 'x')", (team["admin"],))


def test_concurrent_spenders_never_overdraw(db_url, conn, world):
    n_credits, attempts, clients = 40, 90, 32
    org, spenders = world.crowd("hot", balance=n_credits, members=8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int, c) -> None:
        for j in range(i, attempts, clients):
            try:
                debit(c, spenders[j % len(spenders)], 1, org="hot")
                result = "ok"
            except psycopg.Error as exc:
                result = exc.diag.sqlstate or "?"
            with lock:
                outcomes.append(result)

    run_together(db_url, clients, worker)
    assert len(outcomes) == attempts
    assert outcomes.count("ok") == n_credits
    assert set(outcomes) == {"ok", "PT402"}
    left = conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (org,)).fetchone()
    assert left["credit_balance"] == 0
    debits = conn.execute("select sum(amount) as s, count(*) as n from public.credit_transactions"
                          " where account_id = %s and amount < 0", (org,)).fetchone()
    assert debits["s"] == -n_credits and debits["n"] == n_credits
    assert_invariant(conn)


# --- property --------------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["debit", "grant", "replay"]),
        st.sampled_from(["acme", None]),
        st.integers(min_value=1, max_value=40),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_debits_grants_and_replays_keep_the_invariant(conn, team, ops):
    model = {"acme": conn.execute("select a.balance as credit_balance from public.credit_accounts a join public.orgs o on o.id = a.id where o.slug = 'acme'").fetchone()[
        "credit_balance"]}
    model[None] = conn.execute("select balance as credit_balance from public.credit_accounts where id = %s",
                               (team["member"],)).fetchone()["credit_balance"]
    done: list[tuple[str | None, int, str, dict]] = []
    for op, account, amount in ops:
        if op == "grant":
            with acting_as(conn, "service_role", commit=True) as cur:
                cur.execute("select public.grant_credits(%s, 'admin_grant', %s, %s, %s)",
                            (amount, account, None if account else team["member"], uuid.uuid4().hex))
            model[account] += amount
        elif op == "replay" and done:
            acc, amt, key, first = done[len(done) // 2]
            again = debit(conn, team["member"], amt, org=acc, key=key)
            assert again["replayed"] and again["transaction_id"] == first["transaction_id"]
            assert again["balance"] == first["balance"]
        else:
            key = uuid.uuid4().hex
            try:
                r = debit(conn, team["member"], amount, org=account, key=key)
            except psycopg.Error as exc:
                assert exc.diag.sqlstate == "PT402"
                assert model[account] < amount
                continue
            assert model[account] >= amount
            model[account] -= amount
            assert r["balance"] == model[account] >= 0
            done.append((account, amount, key, r))
    assert_invariant(conn)
    assert conn.execute("select count(*) as n from public.credit_accounts where balance < 0").fetchone()["n"] == 0
