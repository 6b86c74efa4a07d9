"""What every operator command shares: the database to talk to, one transaction as service_role,
and how results are printed (tables on stdout, ``--json``, one-line errors via ``CliError``).

``cli`` (the parser and the db/serve/run commands), ``operator`` and ``demo`` all import this;
none of them imports another, so there are no import cycles.

Values print the same way everywhere: ``--json`` uses the API's one encoding (``encoding``: RFC 3339
times, UUIDs as strings), and a table cell is that value as text: empty for null, ``true`` /
``false``, times as in JSON, objects as compact JSON. No Python repr ever reaches the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

import psycopg

from . import embedded
from .db import act_as, connect_kwargs
from .encoding import dumps, timestamp
from .migrate import migrate

SERVICE = {"role": "service_role"}
# How long a command waits for a server that is starting up or replaying its WAL after a crash.
RECOVERY_WAIT_S = float(os.environ.get("UPSHIFT_DB_WAIT_S") or 120)
# What PostgreSQL answers (SQLSTATE 57P03, cannot_connect_now) while it cannot take connections yet.
NOT_READY = ("the database system is starting up", "the database system is in recovery mode",
             "the database system is not yet accepting connections",
             "the database system is not accepting connections", "the database system is shutting down")


class CliError(Exception):
    """A one-line reason to exit non-zero."""


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- which database --------------------------------------------------------------------------


def database_url(args: argparse.Namespace | None = None, *, start: bool = True, create: bool = False) -> str:
    """``DATABASE_URL`` if set, else the embedded server.

    A stopped embedded server is started when ``start`` (after a crash that means waiting for the old
    server's processes and letting PostgreSQL recover, see ``embedded.up``), and migrated. Only
    ``create`` (``db up``, ``run``) may create a new cluster: a mistyped ``--data-dir`` is an error.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    data_dir = getattr(args, "data_dir", None)
    srv = embedded.server(data_dir, getattr(args, "db_port", None))
    where = data_dir or embedded.default_data_dir()
    if not srv.exists() and not create:
        raise CliError(f"no database cluster in {where} (mistyped --data-dir or UPSHIFT_DATA_DIR? "
                       "`upshift-platform db up` creates one there)")
    running = srv.running_port()
    if running is not None:
        srv.port = running
        return srv.url
    if not start:
        stale = srv.stale_pid()
        raise CliError(f"no DATABASE_URL and the embedded database in {where} is not running"
                       + (f" (it was not shut down cleanly: pid {stale} is gone)" if stale else "")
                       + "; `upshift-platform db up` starts it")
    srv = embedded.up(data_dir, getattr(args, "db_port", None))
    migrate(srv.url, log=info)
    return srv.url


def _not_ready(exc: psycopg.Error) -> str | None:
    text = str(exc)
    return next((reason for reason in NOT_READY if reason in text), None)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """``psycopg.connect``, waiting (and saying so) while the server is starting up or recovering.

    A server replaying its WAL after a crash refuses connections with 57P03 for a while; that is
    not "connection refused" and not an error to give up on at once.
    """
    deadline: float | None = None
    while True:
        try:
            return psycopg.connect(url, **kwargs)
        except psycopg.OperationalError as exc:
            reason = _not_ready(exc)
            if reason is None:
                raise
            where = f"{urlparse(url).hostname}:{urlparse(url).port or 5432}"
            if deadline is None:
                deadline = time.monotonic() + RECOVERY_WAIT_S
                info(f"PostgreSQL at {where} is not ready yet ({reason}: it is starting up or recovering "
                     f"from a crash); waiting up to {RECOVERY_WAIT_S:.0f} s")
            if time.monotonic() > deadline:
                raise CliError(f"PostgreSQL at {where} is still not ready after {RECOVERY_WAIT_S:.0f} s "
                               f"({reason}); try again later") from None
            time.sleep(0.25)


def is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1", ""} or host.startswith("/")


# --- output ----------------------------------------------------------------------------------


def cell(value: Any) -> str:
    """A value as table text: '' for null, true/false, times and objects as in JSON, never a repr."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return dumps(value)
    if isinstance(value, UUID | int | str):
        return str(value)
    if isinstance(value, Decimal | float):
        return dumps(value)
    return dumps(value)  # a type encoding does not know is a TypeError there, not a repr here


def to_json(data: Any) -> str:
    """The API's encoding (``encoding.dumps``), indented for a person."""
    return json.dumps(json.loads(dumps(data)), indent=2)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def emit(args: argparse.Namespace, data: Any, rows: Sequence[dict[str, Any]] | None = None,
         columns: Sequence[str] = ()) -> None:
    """``--json``: ``data`` as one JSON document; else ``rows`` as a table, or ``data`` as ``key: value`` lines."""
    if getattr(args, "json", False):
        print(to_json(data))
    elif rows is not None:
        print_table(rows, columns)
    elif isinstance(data, dict):
        for key, value in data.items():
            print(f"{key}: {cell(value)}")
    elif data is not None:
        print(cell(data))


def sql_error_code(exc: psycopg.Error) -> str | None:
    """The stable code an RPC raised (``private.err``'s JSON detail ``error``), if any."""
    detail = exc.diag.message_detail if exc.diag else None
    try:
        parsed = json.loads(detail) if detail else None
    except ValueError:
        return None
    return parsed.get("error") if isinstance(parsed, dict) else None


@contextmanager
def service_tx(url: str) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
    """One transaction as ``service_role``: how every operator command reaches the database."""
    with connect(url, **connect_kwargs()) as conn, conn.transaction(), conn.cursor() as cur:
        act_as(cur, "service_role", SERVICE)
        yield cur
