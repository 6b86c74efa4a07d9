"""debit_credits throughput against a raw-SQL baseline, in the same process and run.

Workloads: one hot org (every client spends the same pool: row-lock bound) and 1,000 orgs
(clients spread out). For each, 1, 8 and 32 client threads, each with its own connection,
run for ``--seconds``:

* rpc      — what production does: one transaction with ``set_config(role, claims)`` then
             ``select public.debit_credits(1, 'explain', <org>)`` (membership check, ledger row);
* baseline — one transaction with one conditional UPDATE of the balance and one INSERT of a
             ledger row, as the table owner, nothing else.

Prints transactions per second and the ratio rpc / baseline.

    python bench/debit.py [--seconds 5] [--clients 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psycopg

from bench.common import machine, progress, scratch_database

N_ORGS = 1000
BIG = 100_000_000  # grant_credits' maximum; far more than a run spends


def setup(url: str, clients: int) -> tuple[list[str], list[str]]:
    with psycopg.connect(url, autocommit=True) as c:
        users = [str(r[0]) for r in c.execute(
            "insert into auth.users (email) select 'bench' || g || '@example.test' from generate_series(1, %s) g"
            " returning id", (clients,))]
        orgs = [str(r[0]) for r in c.execute(
            "insert into public.orgs (slug, name, plan)"
            " select 'bench-' || g, 'Bench ' || g, 'team' from generate_series(1, %s) g returning id", (N_ORGS,))]
        c.execute("insert into public.org_members (org_id, user_id, role)"
                  " select o, u, 'member' from unnest(%s::uuid[]) o, unnest(%s::uuid[]) u", (orgs, users))
        c.execute("select public.grant_credits(%s, 'admin_grant', o::text, null, 'bench-' || o)"
                  " from unnest(%s::uuid[]) o", (BIG, orgs))
        c.execute("vacuum analyze")
    return users, orgs


def rpc_tx(cur: psycopg.Cursor, claims: str, org: str) -> None:
    cur.execute("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true),"
                " set_config('statement_timeout', '5000ms', true)", (claims,))
    cur.execute("select public.debit_credits(1, 'explain', %s)", (org,))


def baseline_tx(cur: psycopg.Cursor, user: str, org: str) -> None:
    cur.execute("update public.credit_accounts set balance = balance - 1"
                " where id = %s and balance >= 1 returning balance", (org,))
    balance = cur.fetchone()[0]  # type: ignore[index]
    cur.execute("insert into public.credit_transactions (account_id, actor_user_id, amount, balance_after, reason)"
                " values (%s, %s, -1, %s, 'explain')", (org, user, balance))


def run(url: str, mode: str, clients: int, users: list[str], orgs: list[str], hot: bool, seconds: float) -> float:
    counts = [0] * clients
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        user = users[i]
        claims = json.dumps({"sub": user, "role": "authenticated", "aud": "authenticated"})
        try:
            with psycopg.connect(url, prepare_threshold=None) as conn:
                barrier.wait()
                n = 0
                k = i
                while not stop.is_set():
                    org = orgs[0] if hot else orgs[k % len(orgs)]
                    k += clients
                    with conn.transaction(), conn.cursor() as cur:
                        if mode == "rpc":
                            rpc_tx(cur, claims, org)
                        else:
                            baseline_tx(cur, user, org)
                    n += 1
                counts[i] = n
        except BaseException as exc:  # surface worker failures
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_debit") as url:
        return _run(args, url)


def _run(args: argparse.Namespace, url: str) -> list[dict]:
    client_counts = [int(c) for c in args.clients.split(",")]
    progress(f"seeding {N_ORGS} orgs and {max(client_counts)} users")
    users, orgs = setup(url, max(client_counts))
    results = []
    for hot in (True, False):
        for clients in client_counts:
            row = {"workload": "hot org" if hot else f"{N_ORGS} orgs", "clients": clients}
            # Alternate the order so neither mode always runs on a warmer cache.
            for mode in (("baseline", "rpc") if clients % 2 else ("rpc", "baseline")):
                progress(f"{row['workload']}, {clients} client(s), {mode}: {args.seconds:g} s")
                row[mode] = run(url, mode, clients, users, orgs, hot, args.seconds)
            row["ratio"] = row["rpc"] / row["baseline"]
            results.append(row)
    with psycopg.connect(url) as c:
        bad = c.execute("select count(*) from public.ledger_mismatches()").fetchone()
    if args.json:
        print(json.dumps({"machine": machine(url), "results": results}, indent=2))
    else:
        print(f"debit_credits vs raw SQL (conditional UPDATE + INSERT), {args.seconds:g} s each")
        print(f"machine: {machine(url)}")
        print(f"{'workload':<11} {'clients':>7} {'rpc tx/s':>10} {'baseline tx/s':>14} {'ratio':>6}")
        for r in results:
            print(f"{r['workload']:<11} {r['clients']:>7} {r['rpc']:>10.0f} {r['baseline']:>14.0f} {r['ratio']:>6.2f}")
        print("ledger invariant: " + ("BROKEN" if bad and bad[0] else "holds"))
    return results


if __name__ == "__main__":
    main()
