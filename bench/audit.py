"""Audit log at scale: query latency at 1,000,000 events and ingest throughput.

Seeds 1,000,000 events over 100 orgs (three event types, spread over 300 days; the measured org is
a large customer with 10% of them, the other 99 share the rest) with one bulk INSERT (their hashes are placeholders: chain verification is not what this measures),
then, as an org admin under RLS exactly like GET /api/audit-logs does:

* first page (100 rows) and a page 10,000 rows deep (keyset cursor), unfiltered and filtered by
  event_type, each run ``--runs`` times: p50 and p99 at the database;
* ingest through ``record_audit_events``: one event per transaction, and 100 per transaction.

    python -m bench.audit [--runs 200] [--events 1000000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg
from psycopg.rows import dict_row

from bench.common import machine, percentile, progress, scratch_database

SELECT = ("select l.id, l.seq, l.org_id, l.scope_id, l.actor_kind, l.user_id, l.service_key_id, l.event_type,"
          " l.resource_type, l.resource_id, l.metadata, host(l.ip) as ip, l.user_agent, l.client_timestamp,"
          " l.created_at from public.audit_logs l")
EVENT = {"event_type": "upgrade", "resource_type": "package", "resource_id": "is-number",
         "metadata": {"from_version": "6.0.0", "to_version": "7.0.0", "outcome": "success"}}


def seed(url: str, total: int, n_orgs: int = 100) -> tuple[str, str]:
    per_org = (total - total // 10) // (n_orgs - 1)
    big = total - per_org * (n_orgs - 1)  # the measured org, ~10%: deep pages exist for every filter
    with psycopg.connect(url, autocommit=True) as c:
        admin = c.execute("insert into auth.users (email) values ('audit-bench@example.test') returning id").fetchone()[0]
        orgs = [c.execute("select public.admin_create_org(%s, %s, 'team', %s) ->> 'id'",
                          (f"Org {i}", f"org-{i}", admin)).fetchone()[0] for i in range(n_orgs)]
        progress(f"seeding {big + per_org * (n_orgs - 1):,} events over {n_orgs} orgs ({big:,} in the measured one)")
        t = time.perf_counter()
        for org_ids, n in ((orgs[:1], big), (orgs[1:], per_org)):
            c.execute(
                "insert into public.audit_logs (scope_id, seq, org_id, actor_kind, user_id, event_type, resource_type,"
                " resource_id, metadata, ip, user_agent, created_at, prev_hash, hash)"
                " select o.id, 1000 + g, o.id, 'user', %(admin)s,"
                "  (array['upgrade', 'fix', 'scan_upload'])[1 + g %% 3], 'package', 'pkg-' || (g %% 500),"
                "  jsonb_build_object('from_version', '1.0.0', 'to_version', '2.0.0', 'outcome', 'success'),"
                "  '10.0.0.1', 'node', now() - interval '300 days' + (g * interval '300 days' / %(per)s),"
                "  '\\x00', '\\x00'"
                " from unnest(%(orgs)s::uuid[]) o(id), generate_series(1, %(per)s) g",
                {"admin": admin, "orgs": org_ids, "per": n})
        progress(f"seeded in {time.perf_counter() - t:.0f} s; analyzing")
        c.execute("vacuum analyze public.audit_logs")
    return str(admin), str(orgs[0])


def timed_queries(url: str, admin: str, org: str, runs: int) -> list[dict[str, object]]:
    claims = json.dumps({"sub": admin, "role": "authenticated", "aud": "authenticated"})
    out = []
    with psycopg.connect(url, row_factory=dict_row, prepare_threshold=None) as c:
        def page(where: str, params: dict[str, object]) -> list[dict[str, object]]:
            with c.transaction():
                c.execute("select set_config('role', 'authenticated', true),"
                          " set_config('request.jwt.claims', %s, true)", (claims,))
                return c.execute(f"{SELECT} where l.scope_id = %(scope)s {where}"
                                 " order by l.created_at desc, l.id desc limit %(limit)s", params).fetchall()

        for label, filt in (("unfiltered", ""), ("event_type=fix", "and l.event_type = any(%(types)s)")):
            base = {"scope": org, "types": ["fix"]}
            # The cursor of row 10,000 of this filter (shallower when --events leaves an org fewer rows).
            deep = min(10000, len(page(filt, {**base, "limit": 10100})) - 100)
            cursor = page(filt, {**base, "limit": deep})[-1]
            for depth, where, params in (
                ("first page", filt, {**base, "limit": 100}),
                (f"{deep:,} deep", f"{filt} and (l.created_at, l.id) < (%(ts)s, %(id)s)",
                 {**base, "limit": 100, "ts": cursor["created_at"], "id": cursor["id"]}),
            ):
                times = []
                for _ in range(runs):
                    t = time.perf_counter()
                    rows = page(where, params)
                    times.append(time.perf_counter() - t)
                assert len(rows) == 100
                out.append({"query": f"{depth}, {label}", "p50_ms": percentile(times, 50) * 1000,
                            "p99_ms": percentile(times, 99) * 1000})
    return out


def ingest(url: str, admin: str, org: str, batch: int, seconds: float) -> float:
    claims = json.dumps({"sub": admin, "role": "authenticated", "aud": "authenticated"})
    events = json.dumps([EVENT] * batch)
    n = 0
    with psycopg.connect(url, prepare_threshold=None) as c:
        stop = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < stop:
            with c.transaction():
                c.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true),"
                          " set_config('request.headers', '{\"user-agent\": \"node\"}', true)", (claims,))
                c.execute("select public.record_audit_events(%s, %s)", (events, org))
            n += batch
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_audit") as url:
        return _run(args, url)


def _run(args: argparse.Namespace, url: str) -> dict[str, object]:
    admin, org = seed(url, args.events)
    progress(f"queries: {args.runs} runs each")
    queries = timed_queries(url, admin, org, args.runs)
    progress(f"ingest: {args.seconds:g} s single, {args.seconds:g} s batched")
    single = ingest(url, admin, org, 1, args.seconds)
    batched = ingest(url, admin, org, 100, args.seconds)
    result = {"machine": machine(url), "events": args.events, "queries": queries,
              "ingest": {"single_events_per_s": single, "batched_100_events_per_s": batched}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"audit log at {args.events:,} events (100 orgs); queries on the largest org's log "
              f"({args.events // 10:,} events) as its admin, under RLS")
        print(f"machine: {result['machine']}")
        print(f"{'query':<32} {'p50 ms':>8} {'p99 ms':>8}")
        for q in queries:
            print(f"{q['query']:<32} {q['p50_ms']:>8.2f} {q['p99_ms']:>8.2f}")
        print(f"ingest, 1 event per transaction:    {single:>8.0f} events/s")
        print(f"ingest, 100 events per transaction: {batched:>8.0f} events/s")
    return result


if __name__ == "__main__":
    main()
