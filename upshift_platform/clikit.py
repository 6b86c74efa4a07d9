"""What every operator command shares: the database to talk to, one transaction as service_role,
and how results are printed (tables on stdout, ``--json``, one-line errors via ``CliError``).

``cli`` (the parser and the db/serve/run commands), ``operator`` and ``demo`` all import this;
none of them imports another, so there are no import cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import psycopg

from . import embedded
from .db import act_as, connect_kwargs
from .migrate import migrate

SERVICE = {"role": "service_role"}


class CliError(Exception):
    """A one-line reason to exit non-zero."""


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def database_url(args: argparse.Namespace | None = None, *, start: bool = True) -> str:
    """``DATABASE_URL`` if set, else the embedded server (started if ``start``)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    data_dir = getattr(args, "data_dir", None)
    running = embedded.running_url(data_dir)
    if running:
        return running
    if not start:
        raise CliError("no DATABASE_URL and the embedded database is not running (`upshift-platform db up`)")
    srv = embedded.up(data_dir, getattr(args, "db_port", None))
    migrate(srv.url, log=info)
    return srv.url


def is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1", ""} or host.startswith("/")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def emit(args: argparse.Namespace, data: Any, rows: Sequence[dict[str, Any]] | None = None,
         columns: Sequence[str] = ()) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, default=str, indent=2))
    elif rows is not None:
        print_table(rows, columns)
    else:
        for key, value in (data.items() if isinstance(data, dict) else []):
            print(f"{key}: {value}")


@contextmanager
def service_tx(url: str) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
    """One transaction as ``service_role``: how every operator command reaches the database."""
    with psycopg.connect(url, **connect_kwargs()) as conn, conn.transaction(), conn.cursor() as cur:
        act_as(cur, "service_role", SERVICE)
        yield cur
