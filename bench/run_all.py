"""Every benchmark, one after the other, then one summary table: what ``upshift-platform bench`` runs."""

from __future__ import annotations

import argparse
from typing import Any

from bench import audit, debit, http
from bench.common import progress


def summary(machine: str, results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    for r in results.get("debit", []):
        rows.append((f"tx/s (pgbench), {r['workload']}", str(r["clients"]), f"{r['tps']:.0f}",
                     f"{r['raw']:.0f}", f"{r['ratio']:.2f}"))
    for r in (results.get("http") or {}).get("summary", []):
        rows.append(("POST /credits/consume req/s (p99 ms) vs the upstream server", str(r["clients"]),
                     f"{r['rps']:.0f} ({r['p99_ms']:.1f})", f"peer {r['peer_rps']:.0f} ({r['peer_p99_ms']:.1f})",
                     f"{r['ratio']:.2f}"))
        rows.append(("  CPU ms per request: ours + postgres / peer", str(r["clients"]),
                     f"{r['server_cpu_ms']:.2f} + {r['pg_cpu_ms']:.2f}", f"peer {r['peer_cpu_ms']:.2f}", ""))
    a = results.get("audit")
    if a:
        for q in a["queries"]:
            rows.append((f"audit query p50 / p99 ms, {q['query']}", "1", f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f}", "", ""))
        rows.append(("audit ingest events/s, 1 per transaction", "1", f"{a['ingest']['single_events_per_s']:.0f}", "", ""))
        rows.append(("audit ingest events/s, 100 per transaction", "1",
                     f"{a['ingest']['batched_100_events_per_s']:.0f}", "", ""))
    head = ("measurement", "clients", "value", "reference", "ratio")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [f"upshift platform benchmarks; {machine}", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run them, print the summary table, and return the figures (``upshift-platform bench --json``)."""
    parser = argparse.ArgumentParser(description="Run every benchmark and print one summary table.")
    parser.add_argument("--quick", action="store_true", help="short runs and 100,000 audit events (a smoke test)")
    parser.add_argument("--only", default="debit,http,audit", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    seconds = ["--seconds", "1" if args.quick else "5"]
    rounds = ["--rounds", "1" if args.quick else "3"]
    results: dict[str, Any] = {}
    machine = ""
    if "debit" in only:
        progress("== debit_credits vs raw SQL ==")
        results["debit"] = debit.main([*seconds, *rounds])
        print()
    if "http" in only:
        progress("== POST /credits/consume over HTTP ==")
        results["http"] = http.main([*seconds, "--rounds", "1" if args.quick else "2"])
        print()
    if "audit" in only:
        progress("== audit log ==")
        results["audit"] = audit.main([*seconds, *(["--events", "100000", "--runs", "50"] if args.quick else [])])
        machine = results["audit"]["machine"]
        print()
    if not machine:
        from bench.common import bench_server
        from bench.common import machine as describe

        with bench_server() as url:
            machine = describe(url)
    print(summary(machine, results))
    return {"machine": machine, **results}


if __name__ == "__main__":
    main()
