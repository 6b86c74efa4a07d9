"""Real PostgreSQL for every test.

With ``DATABASE_URL`` set, the run creates its own databases on that server (a template and
one clone per test) and drops them at the end, touching no other database. Without it, an
embedded server is started in ``.data/pg-test`` on a free port (and stopped afterwards).
Migrations run once into the template; each test gets ``CREATE DATABASE ... TEMPLATE``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import jwt
import psycopg
import pytest
from psycopg.rows import dict_row

from tests import stripe_fakes as sf
from upshift_platform import embedded
from upshift_platform.migrate import migrate
from upshift_platform.paths import project_root

if TYPE_CHECKING:
    from upshift_platform.settings import Settings

TEST_JWT_SECRET = "test-secret-for-hs256-tokens-only-in-tests-0123456789"
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _with_db(url: str, name: str) -> str:
    return urlparse(url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    data_dir = project_root() / ".data" / "pg-test"
    already = embedded.running_url(data_dir)
    srv = embedded.up(data_dir, embedded.free_port(), fast=True)
    try:
        yield srv.url
    finally:
        if already is None:
            srv.destroy()  # a throwaway cluster (fsync off): nothing in it is worth keeping


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    name = f"upshift_test_{RUN_ID}_tmpl"
    admin = psycopg.connect(pg_server_url, autocommit=True)
    admin.execute(f'create database "{name}"')
    migrate(_with_db(pg_server_url, name), log=lambda _m: None)
    try:
        yield name
    finally:
        rows = admin.execute(
            "select datname from pg_database where datname like %s", (f"upshift_test_{RUN_ID}_%",)
        ).fetchall()
        for (db,) in rows:
            admin.execute(f'drop database if exists "{db}" with (force)')
        admin.close()


_counter = iter(range(1, 1_000_000))


class _Dropper:
    """Drops each test's database once the test is over, in the background: a run of 1,000 tests would
    otherwise keep 1,000 copies of the schema on the server until it ends (a shared server's disk fills
    up when several runs go at once), and a drop waits for a checkpoint, which the tests need not wait for."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.names: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="drop-test-databases", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (name := self.names.get()) is not None:
            try:
                with psycopg.connect(self.server_url, autocommit=True) as admin:
                    admin.execute(f'drop database if exists "{name}" with (force)')
            except psycopg.Error:
                pass  # the session's end sweeps whatever is left

    def close(self) -> None:
        self.names.put(None)
        self.thread.join(60)


@pytest.fixture(scope="session")
def _dropper(pg_server_url: str, template_db: str) -> Iterator[_Dropper]:
    dropper = _Dropper(pg_server_url)
    yield dropper
    dropper.close()  # before template_db's sweep (this fixture depends on it, so it ends first)


@pytest.fixture
def db_url(pg_server_url: str, template_db: str, _dropper: _Dropper) -> Iterator[str]:
    name = f"upshift_test_{RUN_ID}_{next(_counter)}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        for attempt in range(50):
            try:
                admin.execute(f'create database "{name}" template "{template_db}"')
                break
            except psycopg.errors.ObjectInUse:  # template briefly busy
                time.sleep(0.05 * (attempt + 1))
    yield _with_db(pg_server_url, name)
    _dropper.names.put(name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A superuser connection (the table owner) to this test's database, autocommit."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        yield c


# --- identities ------------------------------------------------------------------------------


class World:
    """Creates users, orgs and members directly (as the owner), for arranging tests."""

    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self.conn = conn

    def user(self, email: str | None = None) -> str:
        email = email or f"user-{uuid.uuid4().hex[:8]}@example.test"
        row = self.conn.execute(
            "insert into auth.users (email) values (%s) returning id", (email,)
        ).fetchone()
        assert row is not None
        return str(row["id"])

    def org(self, slug: str | None = None, *, plan: str = "team", balance: int = 0,
            admin: str | None = None) -> str:
        slug = slug or f"org-{uuid.uuid4().hex[:8]}"
        row = self.conn.execute(
            "insert into public.orgs (slug, name, plan) values (%s, %s, %s) returning id",
            (slug, slug.title(), plan),
        ).fetchone()
        assert row is not None
        org_id = str(row["id"])
        if balance:
            self.set_org_balance(org_id, balance)
        if admin:
            self.member(org_id, admin, "admin")
        return org_id

    def set_org_balance(self, org_id: str, balance: int) -> None:
        """Give an org credits the way the platform does: a grant through the ledger."""
        self.conn.execute("select public.grant_credits(%s, 'admin_grant', %s, null, %s)",
                          (balance, org_id, f"test-{uuid.uuid4().hex}"))

    def key(self, user_id: str, *, kind: str = "personal", org: str | None = None,
            expires_at: str | None = None, name: str = "test key") -> dict[str, Any]:
        """An API key as the operator creates it; the result holds the one-time ``secret``."""
        row = self.conn.execute(
            "select public.admin_create_api_key(%s, %s, %s, %s, %s) as k",
            (user_id, name, kind, org, expires_at),
        ).fetchone()
        assert row is not None
        return dict(row["k"])

    def member(self, org_id: str, user_id: str, role: str = "member") -> None:
        self.conn.execute(
            "insert into public.org_members (org_id, user_id, role) values (%s, %s, %s)",
            (org_id, user_id, role),
        )

    def team(self, slug: str = "acme", *, balance: int, roles: dict[str, str] | None = None,
             outsider: bool = False) -> dict[str, str]:
        """An org on the Team plan with ``balance`` credits, its admin, and a member per ``roles`` entry
        (name -> role; default a ``member`` and a ``viewer``), each user ``<name>@<slug>.test``.

        The result holds the org's id under ``org`` and each user's id under its name (``admin`` too);
        with ``outsider``, also ``outsider`` and ``other``: another org (no credits) and its admin.
        """
        roles = {"member": "member", "viewer": "viewer"} if roles is None else roles
        admin = self.user(f"admin@{slug}.test")
        people = {name: self.user(f"{name}@{slug}.test") for name in roles}
        org = self.org(slug, plan="team", balance=balance, admin=admin)
        for name, role in roles.items():
            self.member(org, people[name], role)
        if outsider:
            people["outsider"] = self.user("out@other.test")
            people["other"] = self.org("other", admin=people["outsider"])
        return {"org": org, "admin": admin, **people}

    def crowd(self, slug: str, *, balance: int, members: int) -> tuple[str, list[str]]:
        """An org with an admin, ``balance`` credits and ``members`` more members: its id, and theirs."""
        org = self.org(slug, balance=balance, admin=self.user())
        users = [self.user() for _ in range(members)]
        for user in users:
            self.member(org, user, "member")
        return org, users


def age_audit_logs(conn: psycopg.Connection[Any], scope_id: str, days: int, *, until: Any = None) -> None:
    """Make a scope's audit rows (those created before ``until``, default all) ``days`` older, as the owner.

    The rows' hashes then no longer match (created_at is hashed), so only use this on rows that a
    retention purge is about to delete.
    """
    with conn.transaction():
        conn.execute("alter table public.audit_logs disable trigger audit_logs_no_update")
        conn.execute("update public.audit_logs set created_at = created_at - make_interval(days => %s)"
                     " where scope_id = %s and (%s::timestamptz is null or created_at < %s)",
                     (days, scope_id, until, until))
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")


@pytest.fixture
def world(conn: psycopg.Connection[dict[str, Any]]) -> World:
    return World(conn)


def claims_for(user_id: str | None, role: str = "authenticated", **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"role": role, **extra}
    if user_id:
        claims["sub"] = user_id
        claims["aud"] = "authenticated"
    return claims


@contextmanager
def acting_as(conn: psycopg.Connection[Any], role: str, claims: dict[str, Any] | None = None,
              *, commit: bool = False) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction as ``role`` with ``claims``, like a PostgREST request (rolled back unless ``commit``)."""
    with conn.transaction(force_rollback=not commit), conn.cursor() as cur:
        cur.execute(
            "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
            (role, json.dumps(claims or {"role": role})),
        )
        yield cur


@pytest.fixture
def as_role(conn: psycopg.Connection[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """``with as_role('authenticated', user_id) as cur: ...`` (``None`` user: no sub claim)."""

    def enter(role: str, user_id: str | None = None, **extra: Any):  # type: ignore[no-untyped-def]
        return acting_as(conn, role, claims_for(user_id, role, **extra))

    return enter


def run_together(db_url: str, clients: int, work: Callable[[int, psycopg.Connection[dict[str, Any]]], None]) -> None:
    """``work(i, conn)`` for each of ``clients`` threads, each on its own autocommit connection, all
    released at once (once every one is connected)."""
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
            barrier.wait(timeout=60)
            work(i, c)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


def functions_where(conn: psycopg.Connection[Any], condition: str) -> list[str]:
    """The functions in ``public`` and ``private`` (``pg_proc p``) for which the SQL ``condition`` holds."""
    rows = conn.execute(
        "select p.oid::regprocedure::text as fn from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        f" where n.nspname in ('public', 'private') and ({condition})").fetchall()
    return [r["fn"] for r in rows]


def cases(table: dict[str, dict[str, Any]]) -> list[Any]:
    """Test cases of two values, grouped by the first: ``{first: {case_id: second}}`` as
    ``pytest.param(first, second, id=case_id)``."""
    return [pytest.param(first, second, id=case_id) for first, group in table.items()
            for case_id, second in group.items()]


def by_id(table: dict[str, Any]) -> list[Any]:
    """Test cases of one value: ``{case_id: value}`` as ``pytest.param(value, id=case_id)``."""
    return [pytest.param(value, id=case_id) for case_id, value in table.items()]


# --- HTTP ------------------------------------------------------------------------------------


def make_token(user_id: str, *, secret: str = TEST_JWT_SECRET, ttl: int = 3600, **extra: Any) -> str:
    now = int(time.time())
    payload = {"sub": user_id, "role": "authenticated", "aud": "authenticated",
               "iat": now, "exp": now + ttl, **extra}
    return jwt.encode(payload, secret, algorithm="HS256")


@pytest.fixture
def settings(db_url: str):  # type: ignore[no-untyped-def]
    from upshift_platform.settings import Settings

    return Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, pool_max=4)


@pytest.fixture
def platform(settings):  # type: ignore[no-untyped-def]
    from upshift_platform.app import Platform

    plat = Platform(settings)
    yield plat
    plat.close()


@pytest.fixture
def client(platform):  # type: ignore[no-untyped-def]
    from upshift_platform.app import create_wsgi_app

    return create_wsgi_app(platform).test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def serve(db_url: str, *, workers: int, jwt_secret: str = "x" * 40, threads: int | None = None,
          env: dict[str, str] | None = None, stderr: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen[bytes], int]:
    """``upshift-platform serve`` (gunicorn) on a free port in its own process group, once it answers /health.

    Stop it (master and workers) with ``os.killpg(proc.pid, ...)``.
    """
    port = embedded.free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": jwt_secret, **(env or {})}
    cmd = [sys.executable, "-m", "upshift_platform.cli", "serve", "--port", str(port), "--workers", str(workers)]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("server did not start")


# --- Stripe ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin() -> Iterator[sf.StripeStandIn]:
    """A local stand-in for Stripe's API (``tests/stripe_fakes.py``), one per test module."""
    server = sf.StripeStandIn()
    yield server
    server.close()


def stripe_settings(db_url: str, standin: sf.StripeStandIn, **overrides: Any) -> Settings:
    """Settings with Stripe configured (test keys, webhook secret, prices) against ``standin``; ``overrides`` win."""
    from upshift_platform.settings import Settings, StripeSettings

    cfg = StripeSettings(secret_key=sf.SECRET_KEY, webhook_secret=sf.WEBHOOK_SECRET, prices=dict(sf.PRICES),
                         api_base=standin.url)
    base = {"database_url": db_url, "jwt_secret": TEST_JWT_SECRET, "pool_max": 4,
            "public_base_url": "https://upshift.example", "stripe": cfg}
    return Settings(**{**base, **overrides})
