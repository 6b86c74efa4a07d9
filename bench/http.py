"""POST /credits/consume over HTTP: us against the upstream upshift server, same machine, same run.

Starts the peer (``../shared/peers/upshift-server.mjs``, the node server our users run today,
balances in a JSON file) and ``upshift-platform serve`` (gunicorn, one worker per core) on a
migrated scratch database, then drives both with ``wrk`` and the peers' ``consume.lua``
(``{"action": "explain", "count": 1}`` with a bearer key, as the upshift CLI sends it), alternating
ours and theirs for each client count and round. Ours is the real thing: a member's org-bound API
key, one hot org, durable commits, every debit audited.

For each run it prints requests per second, p50/p99 latency and CPU time per request: the server's
processes (gunicorn master and workers; node for the peer), PostgreSQL's backends serving our
server, and wrk itself, from /proc. The load generator, both servers and the database share the
machine's cores.

    python -m bench.http [--seconds 10] [--clients 8,32] [--rounds 2] [--workers N] [--threads N]
    python -m bench.http --resource [--minutes 10]   # memory of our server under load, sampled

Ports 18400-18499 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench.common import machine, progress, scratch_database
from upshift_platform.paths import project_root

PORTS = range(18400, 18500)
TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PEER_KEY = "peer-key"


def peers_dir() -> Path:
    return Path(os.environ.get("UPSHIFT_PEERS_DIR") or project_root().parent / "shared" / "peers")


def free_port(taken: set[int]) -> int:
    import socket

    for port in PORTS:
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port in 18400-18499")


def setup(url: str) -> str:
    """One hot org with 100,000,000 credits and a member's personal API key bound to it (the CLI's case)."""
    with psycopg.connect(url, autocommit=True) as c:
        admin = c.execute("insert into auth.users (email) values ('http-bench-admin@example.test') returning id"
                          ).fetchone()[0]
        user = c.execute("insert into auth.users (email) values ('http-bench@example.test') returning id").fetchone()[0]
        org = c.execute("select public.admin_create_org('Bench', 'bench', 'team', %s) ->> 'id'", (admin,)).fetchone()[0]
        c.execute("select public.admin_add_member('bench', %s, 'member')", (user,))
        c.execute("select public.grant_credits(100000000, 'admin_grant', %s, null, 'bench')", (org,))
        key = c.execute("select public.admin_create_api_key(%s, 'bench', 'personal', %s) ->> 'secret'",
                        (user, org)).fetchone()[0]
    return str(key)


def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], what: str, headers: dict[str, str] | None = None,
               data: bytes | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer on port {port}")


@contextmanager
def our_server(url: str, port: int, workers: int | None, threads: int | None) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": "bench-secret-" + "x" * 32}
    cmd = [sys.executable, "-m", "upshift_platform.cli", "serve", "--port", str(port)]
    cmd += ["--workers", str(workers)] if workers else []
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_http(port, "/health", proc, "upshift-platform serve")
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def peer_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    script = peers_dir() / "upshift-server.mjs"
    node = shutil.which("node")
    if not script.exists() or node is None:
        raise RuntimeError(f"the peer needs node and {script}")
    home = Path(tempfile.mkdtemp(prefix="wt-http-peer-"))
    (home / ".upshift").mkdir()
    (home / ".upshift" / "credits-store.json").write_text(json.dumps(
        {PEER_KEY: {"balance": 100_000_000, "updatedAt": "2026-01-01T00:00:00Z", "tier": "team",
                    "bonusMultiplier": 1}}))
    env = {**os.environ, "HOME": str(home), "UPSHIFT_API_KEYS": PEER_KEY, "UPSHIFT_SERVER_PORT": str(port),
           "STRIPE_SECRET_KEY": "sk_test_peer"}
    proc = subprocess.Popen([node, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_http(port, "/credits/consume", proc, "the peer", data=b'{"action":"explain","count":1}',
                   headers={"Authorization": f"Bearer {PEER_KEY}", "Content-Type": "application/json"})
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


# --- /proc accounting -------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int(_stat(int(d.name))[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        todo += kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError):
            continue
    return total / TICKS


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
        except (OSError, IndexError):
            continue
    return total / 1024


def backends(url: str) -> list[int]:
    """The PostgreSQL backends connected to this benchmark's database (our server's pools)."""
    with psycopg.connect(url) as c:
        return [r[0] for r in c.execute("select pid from pg_stat_activity where datname = current_database()"
                                        " and pid <> pg_backend_pid()")]


# --- wrk -------------------------------------------------------------------------------------

_RESULT = re.compile(r"RESULT rps=(\d+) p50=([\d.]+)ms p99=([\d.]+)ms non2xx=(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk(port: int, token: str, clients: int, seconds: float, server_pids: list[int],
        pg_pids: list[int]) -> dict[str, Any]:
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    script = peers_dir() / "consume.lua"
    before = (cpu_seconds(server_pids), cpu_seconds(pg_pids))
    t0 = time.monotonic()
    out = subprocess.run([exe, "-t2", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/credits/consume"], env={**os.environ, "TOKEN": token},
                         capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - t0
    after = (cpu_seconds(server_pids), cpu_seconds(pg_pids))
    m = _RESULT.search(out.stdout)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out.stdout}\n{out.stderr}")
    rps, p50, p99, non2xx = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    errors = sum(int(x) for x in _SOCKET_ERRORS.search(out.stdout).groups()) if "Socket errors" in out.stdout else 0
    n = max(1.0, rps * seconds)
    return {"clients": clients, "rps": rps, "p50_ms": p50, "p99_ms": p99, "non2xx": non2xx, "errors": errors,
            "server_cpu_ms": (after[0] - before[0]) / n * 1000, "pg_cpu_ms": (after[1] - before[1]) / n * 1000,
            "cores_busy": (after[0] - before[0] + after[1] - before[1]) / elapsed}


def _wrk_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- the comparison --------------------------------------------------------------------------


def compare(url: str, args: argparse.Namespace) -> dict[str, Any]:
    key = setup(url)
    taken: set[int] = set()
    ours_port, peer_port = free_port(taken), free_port(taken)
    results: list[dict[str, Any]] = []
    with our_server(url, ours_port, args.workers, args.threads) as ours, peer_server(peer_port) as peer:
        ours_pids = tree(ours.pid)
        peer_pids = tree(peer.pid)
        pg = backends(url)
        progress("warming up both servers (3 s each)")
        wrk(ours_port, key, 8, 3, ours_pids, pg)
        wrk(peer_port, PEER_KEY, 8, 3, peer_pids, [])
        pg = backends(url)  # the pools have grown to what the load needs
        for clients in (int(c) for c in args.clients.split(",")):
            for r in range(args.rounds):
                for name, port, token, pids, pgp in (("upshift", ours_port, key, ours_pids, pg),
                                                     ("peer", peer_port, PEER_KEY, peer_pids, [])):
                    progress(f"{name}, {clients} clients, round {r + 1}: {args.seconds:g} s")
                    w0 = _wrk_cpu()
                    res = wrk(port, token, clients, args.seconds, pids, pgp)
                    res["wrk_cpu_ms"] = (_wrk_cpu() - w0) / max(1.0, res["rps"] * args.seconds) * 1000
                    results.append({"server": name, "round": r + 1, **res})
    with psycopg.connect(url) as c:
        mismatches = c.execute("select count(*) from public.ledger_mismatches()").fetchone()[0]
    return {"results": results, "summary": summarize(results), "ledger_mismatches": mismatches}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for clients in sorted({r["clients"] for r in results}):
        def mean(server: str, field: str, c: int = clients) -> float:
            xs = [r[field] for r in results if r["server"] == server and r["clients"] == c]
            return sum(xs) / len(xs)

        out.append({
            "clients": clients,
            "rps": mean("upshift", "rps"), "peer_rps": mean("peer", "rps"),
            "ratio": mean("upshift", "rps") / mean("peer", "rps"),
            "p99_ms": mean("upshift", "p99_ms"), "peer_p99_ms": mean("peer", "p99_ms"),
            "p50_ms": mean("upshift", "p50_ms"), "peer_p50_ms": mean("peer", "p50_ms"),
            "server_cpu_ms": mean("upshift", "server_cpu_ms"), "peer_cpu_ms": mean("peer", "server_cpu_ms"),
            "pg_cpu_ms": mean("upshift", "pg_cpu_ms"),
        })
    return out


def print_compare(report: dict[str, Any], args: argparse.Namespace, where: str) -> None:
    print(f"POST /credits/consume: upshift-platform serve vs the upstream upshift server (node), wrk -t2, "
          f"{args.seconds:g} s per run, alternating, {args.rounds} round(s)")
    print(f"machine: {where}")
    print(f"{'server':<8} {'clients':>7} {'round':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non2xx':>6} "
          f"{'server CPU ms/req':>17} {'postgres CPU ms/req':>19} {'wrk CPU ms/req':>14} {'cores busy':>10}")
    for r in report["results"]:
        print(f"{r['server']:<8} {r['clients']:>7} {r['round']:>5} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} "
              f"{r['p99_ms']:>7.2f} {r['non2xx'] + r['errors']:>6} {r['server_cpu_ms']:>17.3f} "
              f"{r['pg_cpu_ms'] if r['server'] == 'upshift' else float('nan'):>19.3f} {r['wrk_cpu_ms']:>14.3f} "
              f"{r['cores_busy']:>10.2f}")
    print()
    print(f"{'clients':>7} {'upshift req/s':>13} {'peer req/s':>10} {'ratio':>6} {'p99 ms':>7} {'peer p99 ms':>11} "
          f"{'CPU ms/req: ours':>16} {'+ postgres':>10} {'peer':>6}")
    for s in report["summary"]:
        print(f"{s['clients']:>7} {s['rps']:>13.0f} {s['peer_rps']:>10.0f} {s['ratio']:>6.2f} {s['p99_ms']:>7.2f} "
              f"{s['peer_p99_ms']:>11.2f} {s['server_cpu_ms']:>16.3f} {s['pg_cpu_ms']:>10.3f} "
              f"{s['peer_cpu_ms']:>6.3f}")
    print(f"ledger invariant: {'holds' if report['ledger_mismatches'] == 0 else 'BROKEN'}")


# --- resource mode ---------------------------------------------------------------------------


def resource(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Memory (RSS of every server process) under constant load, sampled every ``--sample`` seconds."""
    key = setup(url)
    port = free_port(set())
    samples: list[tuple[float, float, float]] = []  # (minute, MB, req/s of the segment)
    with our_server(url, port, args.workers, args.threads) as ours:
        pids = tree(ours.pid)
        pg = backends(url)
        wrk(port, key, 32, 5, pids, pg)  # warm-up
        started = time.monotonic()
        end = started + args.minutes * 60
        samples.append((0.0, rss_mb(tree(ours.pid)), 0.0))
        while time.monotonic() < end:
            seg = float(max(1, round(min(args.sample, end - time.monotonic()))))
            res = wrk(port, key, 32, seg, pids, pg)
            samples.append(((time.monotonic() - started) / 60, rss_mb(tree(ours.pid)), res["rps"]))
            progress(f"{samples[-1][0]:5.1f} min: {samples[-1][1]:.1f} MB, {res['rps']:.0f} req/s")
    mbs = [s[1] for s in samples]
    third = max(1, len(mbs) // 3)
    early, late = sum(mbs[:third]) / third, sum(mbs[-third:]) / third
    growth = late - early
    flat = growth <= max(5.0, 0.05 * early)
    return {"samples": samples, "early_mb": early, "late_mb": late, "growth_mb": growth, "flat": flat}


def print_resource(report: dict[str, Any], args: argparse.Namespace, where: str) -> None:
    print(f"memory of upshift-platform serve (RSS of master + workers) under wrk -c32 for {args.minutes:g} min")
    print(f"machine: {where}")
    print(f"{'minute':>6} {'RSS MB':>7} {'req/s':>6}")
    for minute, mb, rps in report["samples"]:
        print(f"{minute:>6.1f} {mb:>7.1f} {rps:>6.0f}")
    verdict = "flat" if report["flat"] else "NOT flat"
    print(f"first third {report['early_mb']:.1f} MB, last third {report['late_mb']:.1f} MB: "
          f"{report['growth_mb']:+.1f} MB: {verdict}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: serve's, one per core)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: serve's)")
    parser.add_argument("--resource", action="store_true", help="memory under load over --minutes instead")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=30.0, help="resource mode: seconds between samples")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with scratch_database("upshift_bench_http") as url:
        where = machine(url)
        report = resource(url, args) if args.resource else compare(url, args)
    report["machine"] = where
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.resource:
        print_resource(report, args, where)
    else:
        print_compare(report, args, where)
    return report


if __name__ == "__main__":
    main()
