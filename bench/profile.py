"""Where the time goes: evidence for what limits each benchmark figure.

1. debit_credits on one hot org at 32 clients: samples pg_stat_activity every 5 ms and counts
   what the busy backends wait on (row locks, WAL flush, CPU, ...), and the share of server time
   each plpgsql function takes (track_functions).
2. POST /credits/consume over HTTP at 32 clients: CPU seconds used by the load generator,
   the gunicorn workers and the PostgreSQL backends per request (from /proc).

    python -m bench.profile [--seconds 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import threading
import time
from pathlib import Path

import psycopg

from bench import debit, http
from bench.common import machine, progress, scratch_database

TICKS = os.sysconf("SC_CLK_TCK")


def wait_profile(url: str, seconds: float) -> tuple[collections.Counter[str], int, list[tuple[str, float]]]:
    users, orgs = debit.setup(url, 32)
    counts: collections.Counter[str] = collections.Counter()
    samples = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal samples
        with psycopg.connect(url, autocommit=True) as c:
            while not stop.is_set():
                for (kind, event) in c.execute(
                        "select coalesce(wait_event_type, 'CPU'), coalesce(wait_event, 'running') from pg_stat_activity"
                        " where datname = current_database() and state = 'active' and pid <> pg_backend_pid()"
                        " and backend_type = 'client backend'"):
                    counts[f"{kind}:{event}"] += 1
                samples += 1
                time.sleep(0.005)

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("select pg_stat_reset()")
    os.environ["PGOPTIONS"] = "-c track_functions=all"
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        debit.run(url, "rpc", 32, users, orgs, True, seconds)
    finally:
        stop.set()
        sampler.join()
        del os.environ["PGOPTIONS"]
    with psycopg.connect(url) as c:
        funcs = [(f"{r[0]}", float(r[1])) for r in c.execute(
            "select schemaname || '.' || funcname, self_time / nullif(calls, 0) * 1000"  # ms -> us
            " from pg_stat_user_functions where calls > 0 order by self_time desc limit 6")]
    return counts, samples, funcs


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError):
            continue
    return total / TICKS


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def postgres_pids(url: str) -> list[int]:
    with psycopg.connect(url) as c:
        row = c.execute("select pid from pg_stat_activity where pid = pg_backend_pid()").fetchone()
        backend = row[0] if row else 0
    try:
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return []
    return descendants(postmaster)


def http_profile(url: str, seconds: float) -> dict[str, float]:
    """POST /credits/consume at 32 clients (wrk): CPU per request of our server, PostgreSQL and wrk."""
    import resource

    key = http.setup(url)
    port = http.free_port(set())
    with http.our_server(url, port, None, None) as proc:
        pids = http.tree(proc.pid)
        http.wrk(port, key, 8, 3, pids, http.backends(url))
        pg = postgres_pids(url)
        before_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = http.wrk(port, key, 32, seconds, pids, pg)
        after_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = result["rps"] * seconds
    wrk_s = (after_wrk.ru_utime + after_wrk.ru_stime) - (before_wrk.ru_utime + before_wrk.ru_stime)
    return {"rps": result["rps"], "client_ms": wrk_s / n * 1000, "gunicorn_ms": result["server_cpu_ms"],
            "postgres_ms": result["pg_cpu_ms"], "cpu_busy": result["cores_busy"] + wrk_s / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_profile") as url:
        print(f"machine: {machine(url)}")
        progress("debit_credits, hot org, 32 clients: sampling wait events")
        counts, samples, funcs = wait_profile(url, args.seconds)
    total = sum(counts.values())
    print(f"\ndebit_credits, one hot org, 32 clients: what active backends were doing ({samples} samples)")
    for name, n in counts.most_common(8):
        print(f"  {name:<32} {n / total:6.1%}")
    print("  server time per call, top plpgsql functions (self time):")
    for name, ms in funcs:
        print(f"    {name:<30} {ms:9.0f} us")
    with scratch_database("upshift_bench_profile_http") as url2:
        progress("POST /credits/consume, 32 clients: CPU accounting")
        h = http_profile(url2, args.seconds)
    print(f"\nPOST /credits/consume, 32 clients: {h['rps']:.0f} req/s; CPU per request:")
    print(f"  load generator (wrk)             {h['client_ms']:.2f} ms")
    print(f"  gunicorn workers (our Python)    {h['gunicorn_ms']:.2f} ms")
    print(f"  PostgreSQL (every process)       {h['postgres_ms']:.2f} ms")
    print(f"  cores busy on average            {h['cpu_busy']:.2f} of {os.cpu_count()}")


if __name__ == "__main__":
    main()
