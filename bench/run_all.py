"""Every benchmark, one after the other: what ``upshift-platform bench`` runs."""

from __future__ import annotations

import argparse

from bench import audit, debit, http
from bench.common import progress


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark and print their tables.")
    parser.add_argument("--quick", action="store_true", help="short runs and 100,000 audit events (a smoke test)")
    parser.add_argument("--only", default="debit,http,audit", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    seconds = ["--seconds", "1" if args.quick else "5"]
    if "debit" in only:
        progress("== debit_credits vs raw SQL ==")
        debit.main(seconds)
        print()
    if "http" in only:
        progress("== POST /credits/consume over HTTP ==")
        http.main(seconds)
        print()
    if "audit" in only:
        progress("== audit log ==")
        audit.main([*seconds, *(["--events", "100000", "--runs", "50"] if args.quick else [])])


if __name__ == "__main__":
    main()
