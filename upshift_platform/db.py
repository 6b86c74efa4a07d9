"""Database access: one pooled transaction per request, run the way PostgREST runs one, in one round trip.

``Database.transaction(...)`` lends a pooled connection and yields a ``RequestTx``: the request's
transaction acting as the caller (transaction-local ``role``, ``request.jwt.claims``,
``request.headers`` and a statement timeout), sent lazily. Nothing goes to the server until the
handler's first statement, and then the setup travels with it in the same message (client-side
bound, simple query protocol): for a request authenticated by an API key, the key lookup and the
switch to the key's claims too (``public.api_key_claims``). A statement sent as the request's
*last* goes with its COMMIT, so ``POST /credits/consume`` is one round trip and holds the pool's row
lock only for as long as the server needs: the statements form one implicit transaction, which the
server commits at the end of the message or rolls back entirely at the first error.

Connections are pooler-safe: no server-side prepared statements (Supavisor transaction mode), no
session state.

While the database cannot be reached, requests fail fast: a ``Monitor`` thread per process probes
the database on its own connection (every second while it answers, every quarter second while it
does not); while it is down, ``transaction`` answers 503 ``database_unavailable`` at once instead of
waiting for the pool, and ``/health`` reads the monitor's state without asking the database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import ApiError

API_ROLES = ("anon", "authenticated", "service_role")
Row = dict[str, Any]
Params = Mapping[str, Any] | Sequence[Any]
CONNECT_TIMEOUT_S = 2  # libpq's minimum: a refused connection fails at once, a silent network after this
RETRY_AFTER_S = 1
IDLE_CHECK_S = 5.0  # a pooled connection idle longer than this is checked before it is lent
log = logging.getLogger("upshift.db")

_ACT_AS = ("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
           " set_config('request.headers', %s, true),"
           " case when %s::text is not null then set_config('statement_timeout', %s, true) end")
# As service_role (set by the statement before): the key's claims, then the switch to them. The target
# list is evaluated in order, so the lookup runs before the role changes; an inactive key raises PT401.
_KEY_CLAIMS = ("select set_config('request.jwt.claims', public.api_key_claims(%s)::text, true) as claims,"
               " set_config('role', 'authenticated', true)")


def unavailable(reason: str = "") -> ApiError:
    """503 ``database_unavailable`` with ``Retry-After`` (the upshift CLI then falls back to its local credits)."""
    detail = f" ({reason})" if reason else ""
    return ApiError(503, "database_unavailable", f"The database is unreachable{detail}; try again shortly.",
                    retry_after=RETRY_AFTER_S)


def _act_as_params(role: str, claims: dict[str, Any] | None, headers: dict[str, str] | None,
                   statement_timeout: str | None) -> tuple[Any, ...]:
    if role not in API_ROLES:
        raise ValueError(f"unknown API role {role!r}")
    return (role, json.dumps(claims or {"role": role}), json.dumps(headers or {}), statement_timeout,
            statement_timeout)


def act_as(cur: psycopg.Cursor[Any], role: str, claims: dict[str, Any] | None,
           headers: dict[str, str] | None = None, statement_timeout: str | None = None) -> None:
    """Transaction-local ``role``, ``request.jwt.claims``, ``request.headers`` (what PostgREST sets)."""
    cur.execute(_ACT_AS, _act_as_params(role, claims, headers, statement_timeout))


def connect_kwargs() -> dict[str, Any]:
    return {"prepare_threshold": None, "row_factory": dict_row}


def call_sql(function: str, args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``select public.<function>(name => value, ...) as result`` and its parameters.

    ``function`` is always a literal from our code, never client input.
    """
    named = ", ".join(f"{name} => %({name})s" for name in args)
    params = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in args.items()}
    return f"select public.{function}({named}) as result", params


def call(cur: psycopg.Cursor[Any], function: str, /, **args: Any) -> Any:
    """``select public.<function>(name => value, ...)`` and return its single value."""
    sql, params = call_sql(function, args)
    row = cur.execute(sql, params).fetchone()
    return None if row is None else row["result"]


class Monitor:
    """Whether the database answers, known without asking it on a request's path.

    A daemon thread probes on its own connection: ``select 1`` every second while the database
    answers, every quarter second while it does not. A request that loses its connection wakes it
    (``suspect``) so that an outage is seen within milliseconds. Going from down to up calls
    ``on_recover`` (the pool drops the connections it held to the old server).
    """

    UP_INTERVAL_S = 1.0
    DOWN_INTERVAL_S = 0.25

    def __init__(self, url: str, on_recover: Any = None) -> None:
        self.url = url
        self.state = "unknown"  # "up" | "down" | "unknown" (not probed yet)
        self.reason = ""
        self.changed_at = time.monotonic()
        self._on_recover = on_recover
        self._wake = threading.Event()
        self._probed = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        thread = self._thread
        if (thread is not None and thread.is_alive()) or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also: first use after a fork
                self._thread = threading.Thread(target=self._run, name="upshift-db-monitor", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def suspect(self) -> None:
        """A request lost its connection or could not get one: probe now."""
        self._wake.set()

    def wait_probed(self, timeout: float) -> str:
        """The state, waiting up to ``timeout`` seconds for the first probe when there has been none."""
        self.start()
        if self.state == "unknown":
            self._probed.wait(timeout)
        return self.state

    def _set(self, state: str, reason: str = "") -> None:
        previous = self.state
        self.reason = reason
        if state != previous:
            self.state = state
            self.changed_at = time.monotonic()
            log.warning("database %s%s", state, f": {reason}" if reason else "")
            if previous == "down" and state == "up" and self._on_recover is not None:
                try:
                    self._on_recover()
                except Exception:
                    log.exception("recovering the pool failed")

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            self._wake.clear()
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.url, autocommit=True, prepare_threshold=None,
                                           connect_timeout=CONNECT_TIMEOUT_S)
                conn.execute("select 1")
                self._set("up")
            except Exception as exc:  # refused, reset, timed out, shutting down: all mean "not answering"
                if conn is not None:
                    conn.close()
                conn = None
                self._set("down", type(exc).__name__)
            self._probed.set()
            self._wake.wait(self.UP_INTERVAL_S if self.state == "up" else self.DOWN_INTERVAL_S)
        if conn is not None:
            conn.close()


class RequestTx:
    """A request's one transaction as the caller, sent lazily: its setup travels with its first statement.

    ``run(sql, params)`` sends what is pending (``begin`` and the setup, the first time) with the
    statement and answers its rows; ``run(..., last=True)`` sends the statement with the COMMIT (or,
    as the first statement, as one implicit transaction), after which the transaction is over. At
    the end of the ``with`` block, an open transaction is committed (or rolled back on an exception),
    and an API key that no statement has checked yet is checked on its own.
    """

    def __init__(self, database: Database, conn: psycopg.Connection[Row], setup: list[tuple[str, Params]],
                 claims_at: int | None) -> None:
        self._database = database
        self._conn = conn
        self._cur = psycopg.ClientCursor(conn, row_factory=dict_row)
        self._setup = [self._cur.mogrify(sql, params) for sql, params in setup]
        self._claims_at = claims_at  # which setup statement answers the API key's claims
        self._state = "new"  # new | open | done
        self.claims: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        return self._state == "done"

    def run(self, sql: str, params: Params | None = None, *, last: bool = False) -> list[Row]:
        if self._state == "done":
            raise RuntimeError("this request's transaction has already been committed")
        first = self._state == "new"
        statements = []
        if first:
            if not last:
                statements.append("begin")
            statements += self._setup
        statements.append(self._cur.mogrify(sql, params) if params is not None else sql)
        if last and not first:
            statements.append("commit")
        self._state = "done" if last else "open"
        results = self._send(statements)
        if first:
            self._read_claims(results[1 if not last else 0:])
        return results[len(statements) - (2 if last and not first else 1)] or []

    def settle(self) -> None:
        """The block ended normally: commit what is open; check a key nothing has checked yet."""
        if self._state == "open":
            self._state = "done"
            self._send(["commit"])
        elif self._state == "new":
            self._state = "done"
            if self._claims_at is not None:
                self._read_claims(self._send(list(self._setup)))

    def abandon(self) -> None:
        """The block raised: roll back whatever is open (a failed implicit transaction has ended already)."""
        self._state = "done"
        conn = self._conn
        if not conn.closed and not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                pass  # the pool discards a connection it cannot reset

    def ensure_claims(self) -> dict[str, Any] | None:
        """The API key's claims, opening the transaction (one round trip) if nothing has been sent yet."""
        if self._state == "new" and self._claims_at is not None:
            self._state = "open"
            self._read_claims(self._send(["begin", *self._setup])[1:])
        return self.claims

    def _read_claims(self, setup_results: list[list[Row] | None]) -> None:
        if self._claims_at is not None:
            rows = setup_results[self._claims_at]
            if rows:
                self.claims = json.loads(rows[0]["claims"])

    def _send(self, statements: list[str]) -> list[list[Row] | None]:
        """One message of ``statements``; the rows of each (None for a command), in order."""
        try:
            self._cur.execute("; ".join(statements))
        except psycopg.OperationalError as exc:
            if self._conn.broken or self._conn.closed:
                self._state = "done"
                self._database.monitor.suspect()
                raise unavailable("connection lost") from exc
            raise
        results: list[list[Row] | None] = []
        while True:
            results.append(self._cur.fetchall() if self._cur.description is not None else None)
            if not self._cur.nextset():
                return results


class Database:
    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10,
                 statement_timeout_ms: int = 5000, pool_timeout_s: float = 5.0) -> None:
        self.url = url
        self.statement_timeout = f"{int(statement_timeout_ms)}ms"
        self.pool_timeout_s = pool_timeout_s
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={**connect_kwargs(), "autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            open=False,
            check=_check_if_idle,
            reset=_mark_idle,
            name="upshift",
            timeout=pool_timeout_s,
        )
        self.monitor = Monitor(url, on_recover=self._recovered)
        self._opened = False
        self._open_lock = threading.Lock()

    def open(self) -> None:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self.pool.open(wait=False)
                    self._opened = True
        self.monitor.start()

    def close(self) -> None:
        self.monitor.stop()
        if self._opened:
            self.pool.close()
            self._opened = False

    def _recovered(self) -> None:
        if self._opened:
            self.pool.drain()  # every connection it held belongs to a server that went away

    def health(self, wait: float = 0.08) -> str:
        """``up``, ``down`` or ``unknown``, from the monitor (waits up to ``wait`` s for its first probe)."""
        self.open()
        return self.monitor.wait_probed(wait)

    def require_available(self) -> None:
        """503 at once while the monitor says the database is down."""
        self.open()
        if self.monitor.state == "down":
            raise unavailable(self.monitor.reason)

    @contextmanager
    def transaction(self, role: str, claims: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                    *, api_key_hash: str | None = None) -> Iterator[RequestTx]:
        """The request's one transaction as ``role`` with ``claims`` (``RequestTx``: sent lazily, one round trip).

        With ``api_key_hash`` it starts as ``service_role``, looks the key up and continues with the
        key's claims (``RequestTx.claims``); an unknown, revoked or expired key is a 401 from the database.
        """
        setup: list[tuple[str, Params]] = [(_ACT_AS, _act_as_params(role, claims, headers, self.statement_timeout))]
        claims_at = None
        if api_key_hash is not None:
            setup.append((_KEY_CLAIMS, (api_key_hash,)))
            claims_at = 1
        self.require_available()
        with self.pool_connection() as conn:
            tx = RequestTx(self, conn, setup, claims_at)
            try:
                yield tx
            except BaseException:
                tx.abandon()
                raise
            tx.settle()

    @contextmanager
    def request(self, role: str, claims: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                ) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """One transaction as ``role`` with ``claims`` as ``request.jwt.claims``, on a plain cursor.

        ``headers`` (lower-case names) become ``request.headers``, as PostgREST sets them: the audit
        log reads ``user-agent`` and ``x-forwarded-for`` (the client address we resolved) from there.
        """
        params = _act_as_params(role, claims, headers, self.statement_timeout)
        with self.pool_connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(_ACT_AS, params)
            yield cur

    @contextmanager
    def pool_connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection, waiting at most ``pool_timeout_s`` for one, and not at all once the monitor
        says the database is down (a waiter re-checks every quarter second)."""
        self.open()
        deadline = time.monotonic() + self.pool_timeout_s
        while True:
            if self.monitor.state == "down":
                raise unavailable(self.monitor.reason)
            try:
                conn = self.pool.getconn(timeout=max(0.01, min(0.25, deadline - time.monotonic())))
                break
            except PoolTimeout:
                if time.monotonic() >= deadline:
                    self.monitor.suspect()
                    raise unavailable(f"no connection within {self.pool_timeout_s:g} s") from None
        try:
            yield cast("psycopg.Connection[dict[str, Any]]", conn)  # row_factory=dict_row, set in connect_kwargs
        finally:
            if conn.broken or conn.closed:
                self.monitor.suspect()
            self.pool.putconn(conn)

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


def _mark_idle(conn: psycopg.Connection[Any]) -> None:
    setattr(conn, "_upshift_idle_since", time.monotonic())  # noqa: B010 (psycopg connections take attributes)


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """Before lending a connection that sat idle a while, make sure the server still has it (one round trip)."""
    idle_since = getattr(conn, "_upshift_idle_since", None)
    if idle_since is not None and time.monotonic() - idle_since > IDLE_CHECK_S:
        ConnectionPool.check_connection(conn)
