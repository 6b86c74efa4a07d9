"""GET /api/orgs/{org}/usage at the database: public.org_usage over a 1,000,000-row ledger.

Seeds one org's ledger (``credit_transactions``) with ``--rows`` rows (default 1,000,000) spread
evenly over ``--days`` days (default 365) up to now, with one INSERT ... SELECT generate_series:
20 members and 5 CI service keys spending 1-3 credits (one row in 100 is a grant), then VACUUM
ANALYZE (what autovacuum does to an insert-only table). Then, acting as the org's admin (and as
one member) exactly as the HTTP handler does (``set_config(role, claims)`` in a transaction),
calls ``public.org_usage(org, now() - 30 days, now(), 'day,actor')`` ``--runs`` times and prints:

* the wall time of the call at the client (p50, p99), on one connection to a local server;
* ``EXPLAIN ANALYZE`` of the call, and the plan of the aggregate inside it (auto_explain with
  ``log_nested_statements``, sent to this client as NOTICEs; needs a superuser connection).

    python -m bench.usage [--rows 1000000] [--days 365] [--runs 200]

``--days 30`` puts every row inside the measured range (the worst case: a 1,000,000-spend month).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import psycopg

from bench.common import machine, percentile, progress, scratch_database

CALL = "select public.org_usage(%(org)s, now() - interval '30 days', now(), 'day,actor') as u"


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
        progress(f"seeding {rows:,} ledger rows over {days} days into one org")
        t = time.perf_counter()
        # Row g: a grant every 100th row, else a spend of 1-3 credits; every 5th spend is a CI key's, the rest
        # are the 20 members'. Times evenly spaced from `days` ago up to now.
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


def _as(c: psycopg.Connection[Any], user: str) -> None:
    claims = json.dumps({"sub": user, "role": "authenticated", "aud": "authenticated"})
    c.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
              (claims,))


def timed_calls(url: str, org: str, user: str, runs: int) -> dict[str, Any]:
    times: list[float] = []
    with psycopg.connect(url) as c:
        for _ in range(runs):
            with c.transaction():
                _as(c, user)
                t = time.perf_counter()
                row = c.execute(CALL, {"org": org}).fetchone()
                times.append(time.perf_counter() - t)
    assert row is not None
    usage = row[0]
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "groups": len(usage["data"]), "total_spent": usage["total_spent"], "scope": usage["scope"]}


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_usage") as url:
        seeded = seed(url, args.rows, args.days)
        progress(f"{args.runs} calls as the admin, {args.runs} as a member")
        admin = timed_calls(url, seeded["org"], seeded["admin"], args.runs)
        member = timed_calls(url, seeded["org"], seeded["member"], args.runs)
        outer, inner = explain(url, seeded["org"], seeded["admin"])
        result = {"machine": machine(url), "rows": args.rows, "days": args.days, "in_range": seeded["in_range"],
                  "admin": admin, "member": member, "explain": outer, "inner_plan": inner}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"org_usage over a {args.rows:,}-row ledger ({args.days} days; {seeded['in_range']:,} spends in the "
          "last 30 days), 30 days grouped by day and actor")
    print(f"machine: {result['machine']}")
    print(f"{'caller':<8} {'p50 ms':>8} {'p99 ms':>8} {'groups':>7} {'spent':>9}")
    for who in ("admin", "member"):
        r = result[who]
        print(f"{who:<8} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['groups']:>7} {r['total_spent']:>9}")
    print("\nEXPLAIN (ANALYZE, BUFFERS) of the call, as the admin:")
    print(outer)
    print("\nthe aggregate inside it (auto_explain):")
    print(inner)
    return result


if __name__ == "__main__":
    main()
