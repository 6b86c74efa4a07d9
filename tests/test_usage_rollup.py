"""The usage rollup (public.usage_rollup, private.usage_hours/usage_days) and org_usage reading it: exact.

org_usage must answer what a direct aggregate over the ledger answers, for any ledger, any range, any caller,
wherever the rollup's closed_through (W) stands: hypothesis draws ledgers, cuts and ranges. Then the edges
drawn by hand (UTC day and hour boundaries, `from`/`to` with time zones), the access rule on rolled-up rows,
writes that land below W (backdated inserts, updates, deletes, truncate), and transactions that commit late:
one that began before a time was closed, with or without having written yet, is waited for, never missed.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from tests.conftest import claims_for

Row = tuple[str | None, str | None, str | None, int, int]  # day, user, key, spent, spends


@pytest.fixture
def acme(world):
    """acme (Team) with an admin, a member, a viewer, a CI key; and another org with its admin."""
    team = world.team(balance=0, outsider=True)
    team["ci"] = world.key(team["admin"], kind="service", org=team["org"], name="CI")["id"]
    return team


def set_role(cur: psycopg.Cursor[Any], role: str, claims: dict[str, Any] | None = None) -> None:
    cur.execute("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                (role, json.dumps(claims or {"role": role})))


def rollup(cur: psycopg.Cursor[Any], *, up_to: datetime | None = None, wait_ms: int = 200) -> dict[str, Any]:
    """Run the job as the backend, inside the caller's transaction; back to the owner afterwards."""
    set_role(cur, "service_role")
    row = cur.execute("select public.usage_rollup(%s, %s) as r", (wait_ms, up_to)).fetchone()
    cur.execute("reset role")
    assert row is not None
    result = dict(row["r"])
    result["closed_through"] = datetime.fromisoformat(result["closed_through"]) \
        if result["closed_through"] != "-infinity" else datetime.min.replace(tzinfo=UTC)
    return result


def closed_through(cur: psycopg.Cursor[Any]) -> datetime:
    row = cur.execute("select closed_through as w from private.usage_state").fetchone()
    assert row is not None
    return row["w"]  # type: ignore[no-any-return]


def caller_claims(team: dict[str, Any], who: str) -> dict[str, Any]:
    if who == "ci":
        return {"role": "authenticated", "upshift": {"key_id": team["ci"], "org_id": team["org"]}}
    return claims_for(team[who])


def usage(cur: psycopg.Cursor[Any], team: dict[str, Any], who: str, since: datetime, until: datetime,
          group_by: str = "day,actor") -> dict[str, Any]:
    set_role(cur, "authenticated", caller_claims(team, who))
    row = cur.execute("select public.org_usage('acme', %s, %s, %s) as u", (since, until, group_by)).fetchone()
    cur.execute("reset role")
    assert row is not None
    return dict(row["u"])


def direct(cur: psycopg.Cursor[Any], team: dict[str, Any], who: str, since: datetime, until: datetime) -> set[Row]:
    """The same question asked of the ledger itself, as its owner, with the rule written out again."""
    rows = cur.execute(
        "select (created_at at time zone 'UTC')::date::text as day, actor_user_id::text as u,"
        " service_key_id::text as k, -sum(amount) as spent, count(*) as spends"
        " from public.credit_transactions"
        " where account_id = %(org)s and amount < 0 and created_at >= %(since)s and created_at < %(until)s"
        "   and (%(who)s in ('admin', 'viewer') or (%(who)s = 'ci' and actor_user_id is null and service_key_id = %(ci)s)"
        "        or (%(who)s not in ('admin', 'viewer', 'ci') and actor_user_id = %(uid)s))"
        " group by 1, 2, 3",
        {"org": team["org"], "since": since, "until": until, "who": who, "ci": team["ci"],
         "uid": team.get(who) if who != "ci" else None}).fetchall()
    return {(r["day"], r["u"], r["k"], int(r["spent"]), int(r["spends"])) for r in rows}


def refused(cur: psycopg.Cursor[Any], sql: str, params: Any = None) -> tuple[str | None, str]:
    """(sqlstate, error code) of a statement that must fail, in a savepoint."""
    with pytest.raises(psycopg.Error) as err:
        with cur.connection.transaction():
            cur.execute(sql, params)
    return err.value.diag.sqlstate, json.loads(err.value.diag.message_detail or "{}").get("error", "")


def answered(body: dict[str, Any]) -> set[Row]:
    return {(r.get("day"), r.get("user_id"), r.get("service_key_id"), r["spent"], r["spends"]) for r in body["data"]}


def insert(cur: psycopg.Cursor[Any], team: dict[str, Any], rows: list[tuple[str, int, datetime]]) -> None:
    """Ledger rows (actor, amount, created_at) as the owner: what a migration or the superuser could write."""
    for actor, amount, at in rows:
        user = team[actor] if actor in ("admin", "member") else None
        key = team["ci"] if actor == "ci" else None
        cur.execute("insert into public.credit_transactions (account_id, actor_user_id, service_key_id, amount,"
                    " balance_after, reason, created_at) values (%s, %s, %s, %s, 0, 'explain', %s)",
                    (team["org"], user, key, amount, at))


def assert_exact(cur: psycopg.Cursor[Any], team: dict[str, Any], since: datetime, until: datetime,
                 callers: tuple[str, ...] = ("admin", "viewer", "member", "ci")) -> None:
    for who in callers:
        body = usage(cur, team, who, since, until)
        assert answered(body) == direct(cur, team, who, since, until), (who, since, until, closed_through(cur))
        assert body["total_spent"] == sum(r[3] for r in direct(cur, team, who, since, until))


# --- exactness over random ledgers ------------------------------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)
BASE = NOW - timedelta(days=3)
offsets = st.integers(min_value=0, max_value=3 * 86400 - 60)  # seconds after BASE
ledger_rows = st.lists(st.tuples(st.sampled_from(["admin", "member", "ci", "system"]),
                                 st.integers(min_value=-7, max_value=5).filter(lambda a: a != 0),
                                 offsets), max_size=40)
# Range ends: any second, or exactly on an hour or a day boundary, or a time zone's midnight (+05:30).
ends = st.one_of(
    offsets.map(lambda s: BASE + timedelta(seconds=s)),
    st.integers(min_value=-2, max_value=76).map(lambda h: BASE.replace(minute=0, second=0) + timedelta(hours=h)),
    st.integers(min_value=-1, max_value=4).map(lambda d: BASE.replace(hour=0, minute=0, second=0) + timedelta(days=d)),
    st.integers(min_value=-1, max_value=4).map(
        lambda d: BASE.replace(hour=0, minute=0, second=0) + timedelta(days=d, hours=-5, minutes=-30)),
    st.just(NOW + timedelta(hours=1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=ledger_rows, after=ledger_rows, cut=offsets, ranges=st.lists(st.tuples(ends, ends), min_size=1, max_size=4),
       edits=st.lists(st.tuples(st.sampled_from(["delete", "move", "amount"]), offsets), max_size=3))
def test_org_usage_equals_a_direct_aggregate(db_url, acme, before, after, cut, ranges, edits):
    """Any ledger, folded up to any point, then written to below and above that point: every caller's answer for
    every range equals the direct aggregate over the ledger."""
    w = BASE + timedelta(seconds=cut)
    with psycopg.connect(db_url, row_factory=dict_row) as c, c.cursor() as cur:  # one transaction, rolled back
        insert(cur, acme, [(a, n, BASE + timedelta(seconds=s)) for a, n, s in before])
        result = rollup(cur, up_to=w)
        assert result["closed_through"] == w and closed_through(cur) == w
        insert(cur, acme, [(a, n, BASE + timedelta(seconds=s)) for a, n, s in after])  # below and above W
        for what, s in edits:  # rows changed under the rollup: moved across hours and W, re-priced, deleted
            at = BASE + timedelta(seconds=s)
            if what == "delete":
                cur.execute("delete from public.credit_transactions where id = (select id from"
                            " public.credit_transactions where account_id = %s and amount < 0 order by created_at limit 1)",
                            (acme["org"],))  # a spend: a grant is its credit lot's, which keeps it
            elif what == "move":
                cur.execute("update public.credit_transactions set created_at = %s where id = (select id from"
                            " public.credit_transactions where account_id = %s order by created_at desc limit 1)",
                            (at, acme["org"]))
            else:
                cur.execute("update public.credit_transactions set amount = -9 where id = (select id from"
                            " public.credit_transactions where account_id = %s and amount < 0 order by id limit 1)",
                            (acme["org"],))
        for a, b in ranges:
            since, until = min(a, b), max(a, b)
            if since == until:
                continue
            assert_exact(cur, acme, since, until)
        c.rollback()


def test_rollup_buckets_equal_the_ledger(conn, acme):
    """After the job, each hour and day bucket holds exactly the ledger's sums for it."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        insert(cur, acme, [("member", -2, BASE + timedelta(hours=h, minutes=17 * h % 60)) for h in range(60)]
               + [("ci", -3, BASE + timedelta(hours=5)), ("system", -1, BASE + timedelta(hours=30)),
                  ("admin", 5, BASE + timedelta(hours=6))])  # a grant is not a spend
        rollup(cur)
        hours = cur.execute(
            "select hour, actor_user_id, service_key_id, spent, spends from private.usage_hours"
            " except select date_trunc('hour', created_at, 'UTC'), actor_user_id, service_key_id, -sum(amount), count(*)"
            " from public.credit_transactions where amount < 0 group by 1, 2, 3").fetchall()
        days = cur.execute(
            "select day, actor_user_id, service_key_id, spent, spends from private.usage_days"
            " except select date_trunc('day', created_at, 'UTC'), actor_user_id, service_key_id, -sum(amount), count(*)"
            " from public.credit_transactions where amount < 0 group by 1, 2, 3").fetchall()
        assert hours == [] and days == []
        assert cur.execute("select count(*) as n from private.usage_days").fetchone()["n"] > 0


# --- edges ------------------------------------------------------------------------------------------

def test_day_and_hour_boundaries_in_utc_and_other_time_zones(conn, acme):
    """Spends a microsecond either side of UTC midnight and of an hour land in their own UTC day; ranges given with
    other offsets (+05:30, -08:00) cut at the instant they name, both from the rollup and from the ledger."""
    midnight = (NOW - timedelta(days=2)).replace(hour=0, minute=0, second=0)
    tick = timedelta(microseconds=1)
    rows = [("member", -1, midnight - tick), ("member", -2, midnight), ("ci", -4, midnight + timedelta(hours=1) - tick),
            ("ci", -8, midnight + timedelta(hours=1)), ("admin", -16, midnight + timedelta(hours=5, minutes=30))]
    india = datetime(midnight.year, midnight.month, midnight.day, 5, 30,
                     tzinfo=datetime.fromisoformat("2026-01-01T00:00:00+05:30").tzinfo)  # = UTC midnight
    pacific = datetime.fromisoformat(f"{(midnight - timedelta(days=1)).date()}T16:00:00-08:00")  # = UTC midnight
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        insert(cur, acme, rows)
        for folded in (False, True):
            if folded:
                rollup(cur)
                assert closed_through(cur) > midnight + timedelta(days=1)
            body = usage(cur, acme, "admin", midnight - timedelta(days=1), midnight + timedelta(days=1), "day")
            assert [(r["day"], r["spent"]) for r in body["data"]] == [
                (str((midnight - tick).date()), 1), (str(midnight.date()), 30)]
            for since in (india, pacific, midnight):  # the same instant, three ways
                assert usage(cur, acme, "admin", since, since + timedelta(hours=1), "")["total_spent"] == 6
                assert usage(cur, acme, "admin", since - tick, since + timedelta(hours=1), "")["total_spent"] == 7
                assert usage(cur, acme, "admin", since, since + timedelta(hours=1) + tick, "")["total_spent"] == 14
            # half-open: `to` at the spend's instant leaves it out, a microsecond later takes it in
            at = midnight + timedelta(hours=5, minutes=30)
            assert usage(cur, acme, "admin", midnight, at, "")["total_spent"] == 14
            assert usage(cur, acme, "admin", midnight, at + tick, "")["total_spent"] == 30
            assert_exact(cur, acme, india - timedelta(minutes=7), pacific + timedelta(hours=3, seconds=1))


def test_the_rule_holds_on_rolled_up_rows(conn, acme):
    """Admins and viewers see every actor's buckets; a member their own, the CI key its own; another org's admin and
    a stranger are refused, before and after the job."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        insert(cur, acme, [("member", -1, BASE + timedelta(hours=1)), ("admin", -2, BASE + timedelta(hours=2)),
                           ("ci", -3, BASE + timedelta(hours=3)), ("system", -4, BASE + timedelta(hours=4))])
        for _ in range(2):
            totals = {who: usage(cur, acme, who, BASE, NOW, "")["total_spent"]
                      for who in ("admin", "viewer", "member", "ci")}
            assert totals == {"admin": 10, "viewer": 10, "member": 1, "ci": 3}
            for stranger in (acme["outsider"], str(uuid.uuid4())):
                set_role(cur, "authenticated", claims_for(stranger))
                assert refused(cur, "select public.org_usage('acme')") == ("PT403", "org_forbidden")
                cur.execute("reset role")
            rollup(cur)


def test_the_job_is_for_the_backend_only(conn, acme):
    for role, claims in (("anon", None), ("authenticated", claims_for(acme["admin"]))):
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            set_role(cur, role, claims)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute("select public.usage_rollup()")


@pytest.mark.parametrize("wait_ms", [-1, 10001, None])
def test_the_job_checks_its_arguments(conn, wait_ms):
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        set_role(cur, "service_role")
        assert refused(cur, "select public.usage_rollup(%s)", (wait_ms,)) == ("PT400", "invalid_wait_ms")


def test_the_job_refuses_a_snapshot_that_would_hide_late_commits(db_url):
    with psycopg.connect(db_url) as c:
        cur = c.cursor()
        cur.execute("set transaction isolation level repeatable read")
        set_role(cur, "service_role")
        assert refused(cur, "select public.usage_rollup()") == ("PT400", "read_committed_only")


# --- writes that land below W -----------------------------------------------------------------------

def test_backdated_writes_updates_deletes_and_truncate_below_w(conn, acme):
    old = NOW - timedelta(days=1)
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        insert(cur, acme, [("member", -5, old)])
        rollup(cur)
        insert(cur, acme, [("member", -7, old + timedelta(minutes=1)), ("ci", -1, old - timedelta(days=1))])
        assert_exact(cur, acme, old - timedelta(days=2), NOW)
        cur.execute("update public.credit_transactions set created_at = created_at - interval '3 hours',"
                    " actor_user_id = %s where amount = -7", (acme["admin"],))
        assert_exact(cur, acme, old - timedelta(days=2), NOW)
        cur.execute("delete from public.credit_transactions where amount = -5")
        assert_exact(cur, acme, old - timedelta(days=2), NOW)
        cur.execute("select count(*) as n from private.usage_hours where spends = 0")
        assert cur.fetchone()["n"] == 0  # an emptied bucket is gone
        cur.execute("truncate public.credit_transactions cascade")
        assert cur.execute("select count(*) as n from private.usage_days").fetchone()["n"] == 0
        assert usage(cur, acme, "admin", old - timedelta(days=2), NOW, "")["total_spent"] == 0


def test_a_spend_calls_no_trigger_function(conn, acme):
    """The ledger's usage triggers stay off the spend path: a spend's row has created_at = now(), so the insert
    trigger's WHEN is false and no function runs; a backdated row does run it."""
    conn.execute("select public.grant_credits(10, 'admin_grant', 'acme', null, 'g1')")

    def calls(cur: psycopg.Cursor[Any]) -> int:
        row = cur.execute("select coalesce(sum(calls), 0) as n from pg_stat_xact_user_functions"
                          " where schemaname = 'private' and funcname = 'usage_ledger_changed'").fetchone()
        return int(row["n"])

    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        cur.execute("set local track_functions = 'all'")
        spend_as(cur, acme["member"])
        spend_as(cur, acme["admin"])
        assert calls(cur) == 0
        insert(cur, acme, [("member", -1, NOW - timedelta(days=1))])
        assert calls(cur) == 1


# --- late commits -----------------------------------------------------------------------------------

def job(db_url: str, **kw: Any) -> dict[str, Any]:
    with psycopg.connect(db_url, row_factory=dict_row) as c, c.cursor() as cur:
        result = rollup(cur, **kw)
        c.commit()
        return result


def spend_as(cur: psycopg.Cursor[Any], user: str) -> None:
    set_role(cur, "authenticated", claims_for(user))
    cur.execute("select public.debit_credits(1, 'explain', 'acme')")
    cur.execute("reset role")


def total(db_url: str, team: dict[str, Any], since: datetime) -> tuple[int, int]:
    """(org_usage's total, the ledger's) in one snapshot (REPEATABLE READ: spends keep committing meanwhile)."""
    with psycopg.connect(db_url, row_factory=dict_row) as c, c.cursor() as cur:
        c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        got = usage(cur, team, "admin", since, datetime.now(UTC) + timedelta(minutes=1), "")["total_spent"]
        row = cur.execute("select coalesce(-sum(amount), 0) as n from public.credit_transactions"
                          " where account_id = %s and amount < 0 and created_at >= %s", (team["org"], since)).fetchone()
        return got, int(row["n"])


@pytest.mark.parametrize("written", [True, False], ids=["wrote_before_the_job", "no_xid_yet"])
def test_a_transaction_that_began_before_a_time_closed_is_waited_for(db_url, conn, acme, written):
    """A spend whose transaction began before the job's candidate time and commits after it (having written, or
    not even having an xid yet when the job looked): W stays before its start until it ends, and its row counts."""
    conn.execute("select public.grant_credits(100, 'admin_grant', 'acme', null, 'g1')")
    since = datetime.now(UTC) - timedelta(hours=1)
    late = psycopg.connect(db_url, row_factory=dict_row)
    try:
        cur = late.cursor()
        started = cur.execute("select now() as t").fetchone()["t"]  # the transaction began: created_at will be this
        if written:
            spend_as(cur, acme["member"])
        time.sleep(6)  # past the job's margin: a time after `started` is a candidate now
        first = job(db_url, wait_ms=50)
        assert first["closed_through"] < started  # it waited for us, and gave up within wait_ms
        assert total(db_url, acme, since)[0] == total(db_url, acme, since)[1]
        if not written:
            spend_as(cur, acme["member"])  # the row's created_at is the transaction's start, long before now
        late.commit()
        second = job(db_url)
        assert second["closed_through"] > started  # now closed past it ...
        got, ledger = total(db_url, acme, since)
        assert got == ledger == 1  # ... and the late row is in the rollup, counted once
        assert conn.execute("select sum(spends) as n from private.usage_hours").fetchone()["n"] == 1
    finally:
        late.close()


def test_a_prepared_transaction_is_waited_for(db_url, conn, acme):
    """A prepared (two-phase) transaction has no backend and no virtual transaction id: it is waited for by xid."""
    if int(conn.execute("show max_prepared_transactions").fetchone()["max_prepared_transactions"]) == 0:
        pytest.skip("max_prepared_transactions = 0 on this server (Supabase's default too)")
    conn.execute("select public.grant_credits(100, 'admin_grant', 'acme', null, 'g1')")
    since = datetime.now(UTC) - timedelta(hours=1)
    gid = f"usage-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, row_factory=dict_row) as late:
        cur = late.cursor()
        started = cur.execute("select now() as t").fetchone()["t"]
        spend_as(cur, acme["member"])
        cur.execute(f"prepare transaction '{gid}'")
    try:
        time.sleep(6)
        assert job(db_url, wait_ms=50)["closed_through"] < started
    finally:
        conn.execute(f"commit prepared '{gid}'")
    assert job(db_url)["closed_through"] > started
    assert total(db_url, acme, since) == (1, 1)


def test_concurrent_jobs_skip_rather_than_wait(db_url, acme):
    """One run at a time: a second one started meanwhile returns skipped at once."""
    holder = psycopg.connect(db_url, row_factory=dict_row)
    try:
        hcur = holder.cursor()
        hcur.execute("select 1 from private.usage_state for update")
        t = time.perf_counter()
        assert job(db_url)["skipped"] is True
        assert time.perf_counter() - t < 2
    finally:
        holder.close()
    assert job(db_url)["skipped"] is False


def test_spends_during_runs_are_counted_once(db_url, conn, acme):
    """Spends committed while the job runs over and over: the answer equals the ledger at every step and at the
    end, with everything folded."""
    # Enough that the spender never runs dry however fast the machine: it spends until told to stop.
    conn.execute("select public.grant_credits(10000000, 'admin_grant', 'acme', null, 'g1')")
    since = datetime.now(UTC) - timedelta(hours=1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def spender() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                cur = c.cursor()
                while not stop.is_set():
                    with c.transaction():
                        spend_as(cur, acme["member"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=spender)
    thread.start()
    try:
        for _ in range(8):
            job(db_url, wait_ms=100)
            got, ledger = total(db_url, acme, since)
            assert got == ledger
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert not errors
    time.sleep(5.2)
    job(db_url)
    got, ledger = total(db_url, acme, since)
    assert got == ledger > 0
    folded = conn.execute("select coalesce(sum(spent), 0) as n from private.usage_days").fetchone()["n"]
    assert folded == ledger  # all of it from the rollup now


def test_a_revoked_key_sees_nothing(conn, acme):
    """The CI key's own rows are in the rollup; once it is revoked it is refused, like any stranger."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        insert(cur, acme, [("ci", -3, BASE + timedelta(hours=3))])
        rollup(cur)
        assert usage(cur, acme, "ci", BASE, NOW, "")["total_spent"] == 3
        cur.execute("update public.api_keys set revoked_at = now() where id = %s", (acme["ci"],))
        set_role(cur, "authenticated", caller_claims(acme, "ci"))
        state, _ = refused(cur, "select public.org_usage('acme')")
        assert state == "PT403"
        cur.execute("reset role")


def test_up_to_cannot_move_w_past_what_is_proved(conn):
    """up_to only holds W back: a time in the future still closes no later than the job's own proof."""
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        result = rollup(cur, up_to=datetime.now(UTC) + timedelta(days=365))
        assert result["closed_through"] < datetime.now(UTC) - timedelta(seconds=4)


def test_a_backdated_write_in_flight_makes_the_job_skip(db_url, acme):
    """A transaction writing below W holds the state row FOR SHARE until it ends: the job skips rather than move W
    past a row it cannot see yet; once the writer commits, the row is counted exactly once."""
    with psycopg.connect(db_url, row_factory=dict_row) as c, c.cursor() as cur:
        rollup(cur)
        c.commit()
    writer = psycopg.connect(db_url, row_factory=dict_row)
    try:
        wcur = writer.cursor()
        insert(wcur, acme, [("member", -4, datetime.now(UTC) - timedelta(seconds=30)),
                            ("member", -2, datetime.now(UTC) - timedelta(days=1))])  # both before W
        assert job(db_url)["skipped"] is True
        writer.commit()
    finally:
        writer.close()
    time.sleep(5.5)
    assert job(db_url)["skipped"] is False
    since = datetime.now(UTC) - timedelta(days=2)
    assert total(db_url, acme, since) == (6, 6)
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        assert c.execute("select sum(spends) as n from private.usage_days").fetchone()["n"] == 2
