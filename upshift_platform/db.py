"""Database access: one pooled transaction per request, run the way PostgREST runs one.

``Database.request(actor)`` opens a transaction on a pooled connection, sets the
transaction-local ``role`` and ``request.jwt.claims`` (and a statement timeout), and yields a
cursor. RLS, grants and ``auth.uid()`` then behave exactly as for a PostgREST client.
Connections are pooler-safe: no server-side prepared statements (Supavisor transaction
mode), no session state. Handlers never get a connection any other way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

API_ROLES = ("anon", "authenticated", "service_role")


def connect_kwargs() -> dict[str, Any]:
    return {"prepare_threshold": None, "row_factory": dict_row}


class Database:
    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10,
                 statement_timeout_ms: int = 5000) -> None:
        self.url = url
        self.statement_timeout = f"{int(statement_timeout_ms)}ms"
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs=connect_kwargs(),
            open=False,
            check=ConnectionPool.check_connection,
            name="upshift",
        )
        self._opened = False

    def open(self) -> None:
        if not self._opened:
            self.pool.open(wait=False)
            self._opened = True

    def close(self) -> None:
        if self._opened:
            self.pool.close()
            self._opened = False

    @contextmanager
    def request(self, role: str, claims: dict[str, Any] | None = None) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """One transaction as ``role`` with ``claims`` as ``request.jwt.claims``."""
        if role not in API_ROLES:
            raise ValueError(f"unknown API role {role!r}")
        self.open()
        with self.pool.connection(timeout=10) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
                " set_config('statement_timeout', %s, true)",
                (role, json.dumps(claims or {"role": role}), self.statement_timeout),
            )
            yield cur

    def ping(self) -> None:
        self.open()
        with self.pool.connection(timeout=3) as conn:
            conn.execute("select 1")


def call(cur: psycopg.Cursor[Any], function: str, /, **args: Any) -> Any:
    """``select public.<function>(name => value, ...)`` and return its single value.

    ``function`` is always a literal from our code, never client input.
    """
    named = ", ".join(f"{name} => %({name})s" for name in args)
    params = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in args.items()}
    row = cur.execute(f"select public.{function}({named}) as result", params).fetchone()
    return None if row is None else row["result"]
