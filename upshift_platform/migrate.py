"""Apply ``supabase/migrations/*.sql`` in order, recording them as the Supabase CLI does.

Applied versions go into ``supabase_migrations.schema_migrations(version)``, the table that
``supabase db push`` reads and writes, so this runner and the Supabase CLI agree on what is
applied. Each migration runs in its own transaction together with its bookkeeping row; an
advisory lock keeps two runners from applying the same file twice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import tuple_row

from .paths import compat_sql, migrations_dir

_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 7_301_202_611  # arbitrary, fixed: "upshift migrations"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def discover(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named <14 digits>_<verb_noun>.sql")
        found.append(Migration(m.group(1), m.group(2), path))
    return found


PRIVILEGE_PROFILES = ("legacy", "2026")


def privilege_profile(explicit: str | None = None) -> str:
    """Which Supabase default privileges the compat bootstrap reproduces (``UPSHIFT_SUPABASE_PRIVILEGES``).

    ``legacy``: projects created before 2026-05-30, where every new table, function and sequence in
    ``public`` is granted to anon, authenticated and service_role (the default: the most permissive).
    ``2026``: newer projects, with no automatic table grants.
    """
    profile = explicit or os.environ.get("UPSHIFT_SUPABASE_PRIVILEGES") or "legacy"
    if profile not in PRIVILEGE_PROFILES:
        raise MigrationError(f"UPSHIFT_SUPABASE_PRIVILEGES is one of {', '.join(PRIVILEGE_PROFILES)}, not {profile!r}")
    return profile


def _bootstrap(conn: psycopg.Connection, profile: str) -> bool:
    """Apply the Supabase compat SQL on a plain PostgreSQL (no auth.users yet)."""
    has_auth = conn.execute("select to_regclass('auth.users') is not null").fetchone()
    if has_auth and has_auth[0]:
        return False
    with conn.transaction():
        conn.execute("select set_config('upshift.compat_privileges', %s, true)", (profile,))
        conn.execute(compat_sql().read_text())
    return True


def applied_versions(conn: psycopg.Connection) -> set[str]:
    with conn.cursor(row_factory=tuple_row) as cur:
        exists = cur.execute(
            "select to_regclass('supabase_migrations.schema_migrations') is not null"
        ).fetchone()
        if not exists or not exists[0]:
            return set()
        return {r[0] for r in cur.execute("select version from supabase_migrations.schema_migrations")}


def migrate(url: str, directory: Path | None = None, *, log=print,  # type: ignore[no-untyped-def]
            privileges: str | None = None) -> list[Migration]:
    """Apply pending migrations to the database at ``url``; returns what was applied.

    On a plain PostgreSQL the compat bootstrap runs first, reproducing the Supabase default
    privileges of ``privileges`` (see ``privilege_profile``).
    """
    profile = privilege_profile(privileges)
    pending_out: list[Migration] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            if _bootstrap(conn, profile):
                log(f"applied Supabase compatibility bootstrap (sql/supabase_compat.sql, {profile} privileges)")
            conn.execute("create schema if not exists supabase_migrations")
            conn.execute(
                "create table if not exists supabase_migrations.schema_migrations ("
                " version text primary key, statements text[], name text)"
            )
            done = applied_versions(conn)
            for mig in discover(directory):
                if mig.version in done:
                    continue
                sql = mig.path.read_text()
                try:
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute(
                            "insert into supabase_migrations.schema_migrations"
                            " (version, statements, name) values (%s, %s, %s)",
                            (mig.version, [sql], mig.name),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"{mig.path.name}: {exc}") from exc
                log(f"applied {mig.path.name}")
                pending_out.append(mig)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return pending_out
