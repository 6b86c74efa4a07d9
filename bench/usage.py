"""GET /api/orgs/{org}/usage at the database: public.org_usage over a 1,000,000-row ledger.

Two cases, each in its own scratch database holding one org's ledger of ``--rows`` rows (default
1,000,000), seeded with one INSERT ... SELECT generate_series (20 members and 5 CI service keys spending
1-3 credits; one row in 100 is a grant), then VACUUM ANALYZE (what autovacuum does to an insert-only table):

* **worst**: every row inside the measured 30 days (a 1,000,000-spend month, 33,000 a day);
* **spread**: the rows spread evenly over 365 days (about 81,000 in the window).

Then the usage job (``public.usage_rollup``) folds the ledger into the rollup, except the last ``--lag``
seconds (default 60: what the job has not reached yet is read live), and the call
``public.org_usage(org, now() - 30 days, now(), 'day,actor')`` runs ``--runs`` times as the org's admin and
as one member, exactly as the HTTP handler makes it (``set_config(role, claims)`` in a transaction).
Printed per case: p50 and p95 of the call's wall time on one connection to a local server (the database's
time plus one local round trip), the verdict (p95 against 50 ms), the server backend's CPU per call (read from
/proc when the server runs on this machine: the cost whatever else the machine is doing) beside the load
average, the job's catch-up and idle run times, and the
plan of the aggregate inside the call (auto_explain with ``log_nested_statements``, as NOTICEs; needs a
superuser connection).

    python -m bench.usage [--rows 1000000] [--runs 200] [--lag 60] [--case worst|spread|both] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import machine, percentile, progress, scratch_database

CALL = "select public.org_usage(%(org)s, now() - interval '30 days', now(), 'day,actor') as u"
BUDGET_MS = 50.0
CASES = {"worst": 30, "spread": 365}  # days the rows are spread over


def seed(url: str, rows: int, days: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as c:
        def one(sql: str, params: tuple[Any, ...] = ()) -> Any:
            row = c.execute(sql, params).fetchone()
            assert row is not None
            return row[0]

        admin = str(one("select public.admin_find_user('admin@usage.bench', true)"))
        org = str(one("select public.admin_create_org('Usage Bench', 'usage-bench', 'team', %s) ->> 'id'", (admin,)))
        members = [str(one("select public.admin_find_user(%s, true)", (f"m{i}@usage.bench",))) for i in range(20)]
        for m in members:
            c.execute("select public.admin_add_member(%s, %s, 'member')", (org, m))
        keys = [str(one("select public.admin_create_api_key(%s, %s, 'service', %s, null) ->> 'id'",
                        (admin, f"ci {i}", org))) for i in range(5)]
        # The rows are written with times in the past: the ledger's trigger would fold each into the rollup if it
        # lay before closed_through. In a new database nothing is closed yet (checked), so the seed skips the
        # triggers (replica mode: the foreign keys' too) and the job folds them all afterwards.
        assert one("select closed_through = '-infinity' from private.usage_state"), "a fresh database expected"
        progress(f"seeding {rows:,} ledger rows over {days} days into one org")
        t = time.perf_counter()
        # Row g: a grant every 100th row, else a spend of 1-3 credits; every 5th spend is a CI key's, the rest
        # are the 20 members'. Times evenly spaced from `days` ago up to now.
        with c.transaction():
            c.execute("set local session_replication_role = replica")
            c.execute(
                "insert into public.credit_transactions"
                " (account_id, actor_user_id, service_key_id, amount, balance_after, reason, created_at)"
                " select %(org)s,"
                "  case when g %% 100 = 0 or g %% 5 = 1 then null else (%(members)s::uuid[])[1 + g %% 20] end,"
                "  case when g %% 100 <> 0 and g %% 5 = 1 then (%(keys)s::uuid[])[1 + (g / 5) %% 5] end,"
                "  case when g %% 100 = 0 then 500 else -(1 + g %% 3) end, 1000,"
                "  case when g %% 100 = 0 then 'purchase' else (array['explain', 'fix', 'audit'])[1 + g %% 3] end,"
                "  now() - make_interval(days => %(days)s) + (g * make_interval(days => %(days)s) / %(rows)s)"
                " from generate_series(1, %(rows)s) g",
                {"org": org, "members": members, "keys": keys, "rows": rows, "days": days})
        progress(f"seeded in {time.perf_counter() - t:.1f} s; vacuum analyze")
        c.execute("vacuum analyze public.credit_transactions")
        in_range = one("select count(*) from public.credit_transactions where account_id = %s and amount < 0"
                       " and created_at >= now() - interval '30 days'", (org,))
    return {"org": org, "admin": admin, "member": members[0], "in_range": int(in_range)}


def rollup(url: str, lag: float) -> dict[str, Any]:
    """The usage job, as the backend runs it: a catch-up over the whole ledger (up to `lag` seconds ago), then
    an idle run (nothing new to fold: what every run costs when it has caught up)."""
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as c:
        for name, sql in (("catch_up", "select public.usage_rollup(up_to => now() - make_interval(secs => %s))"),
                          ("idle", "select public.usage_rollup(up_to => now() - make_interval(secs => %s))")):
            with c.transaction():
                c.execute("select set_config('role', 'service_role', true)")
                t = time.perf_counter()
                row = c.execute(sql, (lag,)).fetchone()
                out[f"{name}_ms"] = (time.perf_counter() - t) * 1000
            assert row is not None
            out[name] = row[0]
        c.execute("vacuum analyze private.usage_hours, private.usage_days")
        counts = c.execute("select (select count(*) from private.usage_hours), (select count(*) from private.usage_days),"
                           " (select count(*) from public.credit_transactions t, private.usage_state s"
                           "  where t.created_at >= s.closed_through and t.amount < 0)").fetchone()
    assert counts is not None
    out.update(hour_rows=counts[0], day_rows=counts[1], live_spends=counts[2])
    return out


def _as(c: psycopg.Connection[Any], user: str) -> None:
    claims = json.dumps({"sub": user, "role": "authenticated", "aud": "authenticated"})
    c.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
              (claims,))


def backend_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a server backend so far, when the server runs on this machine (/proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_calls(url: str, org: str, user: str, runs: int) -> dict[str, Any]:
    times: list[float] = []
    with psycopg.connect(url) as c:
        row = c.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        c.commit()
        cpu_before = backend_cpu_seconds(pid)
        load_before = os.getloadavg()[0]
        for _ in range(runs):
            with c.transaction():
                _as(c, user)
                t = time.perf_counter()
                row = c.execute(CALL, {"org": org}).fetchone()
                times.append(time.perf_counter() - t)
        cpu_after = backend_cpu_seconds(pid)
    assert row is not None
    usage = row[0]
    # The backend's CPU per call (set_config included): what the call costs whatever else the machine is doing.
    cpu_ms = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / runs * 1000
    return {"p50_ms": percentile(times, 50) * 1000, "p95_ms": percentile(times, 95) * 1000,
            "p99_ms": percentile(times, 99) * 1000, "groups": len(usage["data"]), "total_spent": usage["total_spent"],
            "scope": usage["scope"], "from": usage["from"], "to": usage["to"], "cpu_ms": cpu_ms,
            "load": (load_before + os.getloadavg()[0]) / 2}


def direct_total(url: str, org: str, since: str, until: str) -> int:
    """The last call's range summed straight from the ledger (as the owner): its answer must equal it."""
    with psycopg.connect(url) as c:
        row = c.execute("select coalesce(-sum(amount), 0) from public.credit_transactions"
                        " where account_id = %s and amount < 0 and created_at >= %s and created_at < %s",
                        (org, since, until)).fetchone()
    assert row is not None
    return int(row[0])


def explain(url: str, org: str, user: str) -> tuple[str, str]:
    """EXPLAIN ANALYZE of the call, and the plan of the statement inside it (auto_explain), as the admin."""
    notices: list[str] = []
    with psycopg.connect(url) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        try:
            for sql in ("load 'auto_explain'", "set auto_explain.log_min_duration = 0",
                        "set auto_explain.log_analyze = on", "set auto_explain.log_buffers = on",
                        "set auto_explain.log_nested_statements = on", "set auto_explain.log_level = notice"):
                c.execute(sql)
            c.commit()
        except psycopg.Error as exc:  # not a superuser, or no auto_explain: the outer plan only
            c.rollback()
            notices.append(f"(auto_explain unavailable: {exc.diag.message_primary})")
        with c.transaction():
            _as(c, user)
            c.execute(CALL, {"org": org}).fetchone()  # warm: plpgsql plans its statements on first use
            notices.clear()
            outer = "\n".join(r[0] for r in c.execute(f"explain (analyze, buffers) {CALL}", {"org": org}))
    inner = [n for n in notices if "credit_transactions" in n]
    return outer, (inner[-1] if inner else "\n".join(notices) or "(no nested plan reported)")


def run_case(name: str, rows: int, runs: int, lag: float) -> dict[str, Any]:
    days = CASES[name]
    with scratch_database("upshift_bench_usage") as url:
        seeded = seed(url, rows, days)
        progress(f"{name}: the usage job folds the ledger (all but the last {lag:g} s)")
        job = rollup(url, lag)
        progress(f"{name}: {runs} calls as the admin, {runs} as a member")
        admin = timed_calls(url, seeded["org"], seeded["admin"], runs)
        member = timed_calls(url, seeded["org"], seeded["member"], runs)
        expected = direct_total(url, seeded["org"], admin["from"], admin["to"])
        outer, inner = explain(url, seeded["org"], seeded["admin"])
        return {"case": name, "machine": machine(url), "rows": rows, "days": days, "in_range": seeded["in_range"],
                "job": job, "admin": admin, "member": member, "exact": admin["total_spent"] == expected,
                "expected_total": expected, "verdict": "pass" if admin["p95_ms"] < BUDGET_MS else "FAIL",
                "explain": outer, "inner_plan": inner}


def report(r: dict[str, Any]) -> None:
    job = r["job"]
    print(f"\n== {r['case']}: org_usage over a {r['rows']:,}-row ledger spread over {r['days']} days "
          f"({r['in_range']:,} spends in the last 30 days), 30 days grouped by day and actor")
    print(f"machine: {r['machine']}")
    print(f"usage job: catch-up {job['catch_up_ms']:.0f} ms (folded {job['catch_up']['folded']:,} spends), "
          f"idle run {job['idle_ms']:.1f} ms; rollup {job['day_rows']:,} day rows, {job['hour_rows']:,} hour rows; "
          f"{job['live_spends']:,} spends not yet folded (the last {r.get('lag', 60):g} s)")
    print(f"{'caller':<8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'CPU ms':>8} {'groups':>7} {'spent':>9}"
          f" {'load avg':>9}")
    for who in ("admin", "member"):
        x = r[who]
        cpu = "n/a" if x["cpu_ms"] is None else f"{x['cpu_ms']:.2f}"
        print(f"{who:<8} {x['p50_ms']:>8.2f} {x['p95_ms']:>8.2f} {x['p99_ms']:>8.2f} {cpu:>8} {x['groups']:>7} "
              f"{x['total_spent']:>9} {x['load']:>9.1f}")
    print("(ms: wall time of the call on a local connection; CPU ms: the server backend's CPU per call, from "
          "/proc; load avg: the machine's 1-minute load average meanwhile, on 2 cores)")
    print(f"exact: {'yes' if r['exact'] else 'NO'} (the ledger's own sum: {r['expected_total']})")
    print(f"verdict: {r['verdict']} (admin p95 {r['admin']['p95_ms']:.2f} ms against a budget of {BUDGET_MS:.0f} ms)")
    print("\nEXPLAIN (ANALYZE, BUFFERS) of the call, as the admin:")
    print(r["explain"])
    print("\nthe aggregate inside it (auto_explain):")
    print(r["inner_plan"])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--lag", type=float, default=60.0, help="seconds the job is behind (read live)")
    parser.add_argument("--case", choices=["worst", "spread", "both"], default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    for name in (["worst", "spread"] if args.case == "both" else [args.case]):
        result = run_case(name, args.rows, args.runs, args.lag)
        result["lag"] = args.lag
        results.append(result)
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    for r in results:
        report(r)
    print("\nsummary: " + "; ".join(f"{r['case']} p50 {r['admin']['p50_ms']:.1f} / p95 {r['admin']['p95_ms']:.1f} ms"
                                    f" {r['verdict']}" for r in results))
    return results


if __name__ == "__main__":
    main()
