"""``upshift-platform db lint``: every plpgsql function through plpgsql_check, on a scratch database.

plpgsql_check (Debian: ``postgresql-15-plpgsql-check``) compiles each function as the server would
run it and reports what only shows at run time otherwise: unknown columns, wrong types, dead
code, a function that can end without RETURN, shadowed variables. The migrations go into a
scratch database on the given server, the extension is created there, and any error or warning
fails the check. ``make lint`` and ``.ci/run`` run it against the machine's PostgreSQL.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlparse

import psycopg

from .clikit import CliError, info
from .migrate import migrate

CHECK_SQL = """
select p.oid::regprocedure::text as function, r.level, r.message, r.lineno, r.hint
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
cross join lateral plpgsql_check_function_tb(
  p.oid,
  coalesce((select t.tgrelid from pg_trigger t where t.tgfoid = p.oid limit 1), 0),
  extra_warnings => true, security_warnings => true, performance_warnings => false) r
where n.nspname in ('public', 'private')
  and p.prolang = (select l.oid from pg_language l where l.lanname = 'plpgsql')
order by 1, r.lineno
"""


def check(server_url: str) -> list[dict[str, object]]:
    """Migrate a scratch database on ``server_url``, run plpgsql_check on every function, drop it."""
    name = f"upshift_lint_{uuid.uuid4().hex[:8]}"
    url = urlparse(server_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(server_url, autocommit=True) as admin:
        available = admin.execute(
            "select 1 from pg_available_extensions where name = 'plpgsql_check'").fetchone()
        if available is None:
            raise CliError("plpgsql_check is not installed on that server "
                           "(Debian: apt-get install postgresql-<version>-plpgsql-check)")
        admin.execute(f'create database "{name}"')
    try:
        migrate(url, log=lambda _m: None)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create extension plpgsql_check")
            cur = conn.execute(CHECK_SQL)
            columns = [c.name for c in cur.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


def run(server_url: str) -> None:
    findings = check(server_url)
    for f in findings:
        info(f"{f['function']}:{f['lineno']}: {f['level']}: {f['message']}" + (f" ({f['hint']})" if f["hint"] else ""))
    if findings:
        raise CliError(f"plpgsql_check: {len(findings)} finding(s)")
    info("plpgsql_check: every function is clean")
