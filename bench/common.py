"""Shared benchmark plumbing: a migrated scratch database and the machine description."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from upshift_platform import embedded
from upshift_platform.migrate import migrate
from upshift_platform.paths import project_root


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextmanager
def bench_server() -> Iterator[str]:
    """``DATABASE_URL``'s server, or an embedded one in .data/pg-bench (default durability),
    stopped afterwards if this started it."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    data_dir = project_root() / ".data" / "pg-bench"
    already = embedded.running_url(data_dir)
    srv = embedded.up(data_dir, embedded.free_port())
    try:
        yield srv.url
    finally:
        if already is None:
            srv.stop()


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new migrated database on the bench server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with bench_server() as base:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'create database "{name}"')
        try:
            url = urlparse(base)._replace(path=f"/{name}").geturl()
            migrate(url, log=lambda _m: None)
            yield url
        finally:
            with psycopg.connect(base, autocommit=True) as admin:
                admin.execute(f'drop database if exists "{name}" with (force)')


def machine(url: str) -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(url) as c:
        row = c.execute("select current_setting('server_version'), current_setting('fsync'),"
                        " current_setting('synchronous_commit')").fetchone()
    assert row is not None
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"PostgreSQL {row[0]} (fsync={row[1]}, synchronous_commit={row[2]})")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
