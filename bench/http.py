"""POST /credits/consume through the HTTP layer as served in production.

Starts ``upshift-platform serve`` (gunicorn, several workers) against a scratch database, then
drives it from 1, 8 and 32 client threads with keep-alive connections for ``--seconds`` each,
every request carrying an org-bound API key the way the upshift CLI does. Prints requests per
second and p50/p99 latency. The load generator runs on the same machine (and cores) as the
server and the database: the figures are for the whole stack on one box.

    python -m bench.http [--seconds 5] [--clients 1,8,32] [--workers 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg

from bench.common import machine, percentile, progress, scratch_database
from upshift_platform.embedded import free_port

BODY = json.dumps({"action": "explain", "count": 1})


def setup(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as c:
        user = c.execute("insert into auth.users (email) values ('http-bench@example.test') returning id").fetchone()[0]
        org = c.execute("select public.admin_create_org('Bench', 'bench', 'team', %s) ->> 'id'", (user,)).fetchone()[0]
        c.execute("select public.grant_credits(100000000, 'admin_grant', %s, null, 'bench')", (org,))
        key = c.execute("select public.admin_create_api_key(%s, 'bench', 'personal', %s) ->> 'secret'",
                        (user, org)).fetchone()[0]
    return str(key)


def start_server(url: str, workers: int) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": "bench-secret-" + "x" * 32,
           "UPSHIFT_DB_POOL_MAX": "16"}
    proc = subprocess.Popen([sys.executable, "-m", "upshift_platform.cli", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("server did not start")


def load(port: int, key: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "User-Agent": "node"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                conn.request("POST", "/credits/consume", body=BODY, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except OSError:
                errors[i] += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for lst in latencies for x in lst]
    return {"clients": clients, "rps": len(flat) / elapsed, "p50_ms": percentile(flat, 50) * 1000,
            "p99_ms": percentile(flat, 99) * 1000, "errors": sum(errors)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_http") as url:
        return _run(args, url)


def _run(args: argparse.Namespace, url: str) -> list[dict[str, float]]:
    key = setup(url)
    proc, port = start_server(url, args.workers)
    results = []
    try:
        load(port, key, 4, 1.0)  # warm-up: pools, plans
        for clients in (int(c) for c in args.clients.split(",")):
            progress(f"POST /credits/consume, {clients} client(s): {args.seconds:g} s")
            results.append(load(port, key, clients, args.seconds))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    if args.json:
        print(json.dumps({"machine": machine(url), "workers": args.workers, "results": results}, indent=2))
    else:
        print(f"POST /credits/consume via gunicorn ({args.workers} workers x 4 threads), {args.seconds:g} s each")
        print(f"machine: {machine(url)}")
        print(f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for r in results:
            print(f"{r['clients']:>7} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7}")
    return results


if __name__ == "__main__":
    main()
