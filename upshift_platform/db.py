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
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

API_ROLES = ("anon", "authenticated", "service_role")


def act_as(cur: psycopg.Cursor[Any], role: str, claims: dict[str, Any] | None,
           headers: dict[str, str] | None = None, statement_timeout: str | None = None) -> None:
    """Transaction-local ``role``, ``request.jwt.claims``, ``request.headers`` (what PostgREST sets)."""
    if role not in API_ROLES:
        raise ValueError(f"unknown API role {role!r}")
    cur.execute(
        "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
        " set_config('request.headers', %s, true),"
        " case when %s::text is not null then set_config('statement_timeout', %s, true) end",
        (role, json.dumps(claims or {"role": role}), json.dumps(headers or {}), statement_timeout, statement_timeout),
    )


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
    def request(self, role: str, claims: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                ) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """One transaction as ``role`` with ``claims`` as ``request.jwt.claims``.

        ``headers`` (lower-case names) become ``request.headers``, as PostgREST sets them: the audit
        log reads ``user-agent`` and ``x-forwarded-for`` (the client address we resolved) from there.
        """
        with self.pool_connection() as conn, conn.transaction(), conn.cursor() as cur:
            act_as(cur, role, claims, headers, self.statement_timeout)
            yield cur

    @contextmanager
    def pool_connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        self.open()
        with self.pool.connection(timeout=10) as conn:
            yield cast("psycopg.Connection[dict[str, Any]]", conn)  # row_factory=dict_row, set in connect_kwargs

    def stream(self, role: str, claims: dict[str, Any], headers: dict[str, str] | None, sql: str,
               params: dict[str, Any], batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Rows of ``sql`` through a server-side cursor, ``batch`` at a time: constant memory."""
        with self.pool_connection() as conn, conn.transaction():
            with conn.cursor() as cur:
                act_as(cur, role, claims, headers, self.statement_timeout)
            with conn.cursor(name="upshift_stream") as named:
                named.itersize = batch
                named.execute(sql, params)
                yield from named

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
