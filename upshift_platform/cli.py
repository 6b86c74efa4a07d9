"""``upshift-platform``: the operator and developer command line.

Human output goes to stderr and tables to stdout; ``--json`` prints one JSON document.
Every failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg

from . import embedded
from .clikit import CliError, database_url, info, is_local
from .migrate import MigrationError, migrate
from .paths import project_root
from .settings import Settings, SettingsError
from .signing import new_seed_base64

JWT_SECRET_FILE = "jwt-secret"  # noqa: S105 (a file name in .data/, not a secret)
SIGNING_KEY_FILE = "audit-signing-key"


# --- db --------------------------------------------------------------------------------------


def cmd_db_up(args: argparse.Namespace) -> None:
    srv = embedded.up(args.data_dir, args.db_port)
    applied = migrate(srv.url, log=info)
    info(f"PostgreSQL {srv.binaries.version()} ({srv.binaries.source}) in {srv.data_dir}; "
         f"{len(applied)} migration(s) applied")
    print(srv.url)


def cmd_db_down(args: argparse.Namespace) -> None:
    info("stopped" if embedded.down(args.data_dir) else "not running")


def cmd_db_url(args: argparse.Namespace) -> None:
    print(database_url(args, start=False))


def cmd_db_migrate(args: argparse.Namespace) -> None:
    url = database_url(args)
    applied = migrate(url, log=info)
    info(f"{len(applied)} migration(s) applied" if applied else "nothing to apply")


def cmd_db_lint(args: argparse.Namespace) -> None:
    from .sqlcheck import run

    run(args.server or os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres")


def cmd_db_reset(args: argparse.Namespace) -> None:
    url = database_url(args)
    if not is_local(url) and not args.force_remote:
        raise CliError(f"refusing to reset a non-local database ({urlparse(url).hostname})")
    parsed = urlparse(url)
    dbname = (parsed.path or "/postgres").lstrip("/") or "postgres"
    admin = parsed._replace(path="/template1").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = %s and pid <> pg_backend_pid()", (dbname,)
        )
        conn.execute(f'drop database if exists "{dbname}"')
        conn.execute(f'create database "{dbname}"')
    applied = migrate(url, log=info)
    info(f"reset {dbname}: {len(applied)} migration(s) applied")
    print(url)


# --- serve -----------------------------------------------------------------------------------


def local_data_dir() -> Path:
    """``.data/`` in the checkout (beside the embedded database and the demo keys), created 0700."""
    path = project_root() / ".data"
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # whatever the umask
    return path


def _read_secret(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(0o600)
            info(f"{path} was readable by others (mode {mode:o}): now 0600")
        value = path.read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise CliError(f"{path} is empty (delete it and a new one is generated)")
    return value


def local_secret(name: str, generate: Callable[[], str]) -> tuple[str, Path, bool]:
    """The secret kept in ``.data/<name>`` (mode 0600), generated on first use: (value, path, created)."""
    path = local_data_dir() / name
    if path.exists():
        return _read_secret(path), path, False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(generate() + "\n")
        try:
            os.link(tmp, path)  # all or nothing, and never over a file another process just wrote
        except FileExistsError:
            return _read_secret(path), path, False
    finally:
        os.unlink(tmp)
    return _read_secret(path), path, True


def local_env(url: str) -> None:
    """``run`` (local development) only: a generated JWT secret and audit signing key, kept in .data/."""
    os.environ.setdefault("DATABASE_URL", url)
    if not os.environ.get("SUPABASE_JWT_SECRET") and not os.environ.get("SUPABASE_URL"):
        secret, path, created = local_secret(JWT_SECRET_FILE, lambda: secrets.token_urlsafe(48))
        os.environ["SUPABASE_JWT_SECRET"] = secret
        info(f"SUPABASE_JWT_SECRET not set: using the local development secret in {path}"
             f"{' (generated now)' if created else ''}")
    if not os.environ.get("UPSHIFT_AUDIT_SIGNING_KEY"):
        key, path, created = local_secret(SIGNING_KEY_FILE, new_seed_base64)
        os.environ["UPSHIFT_AUDIT_SIGNING_KEY"] = key
        info(f"UPSHIFT_AUDIT_SIGNING_KEY not set: using the local development key in {path}"
             f"{' (generated now)' if created else ''}")


def check_settings() -> Settings:
    """Read the settings as the workers will, so that a bad value stops the command at once."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise CliError(str(exc)) from None


def start_usage_rollup(url: str, every: float) -> None:
    """The usage rollup job in a background thread of this (the gunicorn master) process; 0 turns it off."""
    from .usage_job import start_background

    if every > 0:
        start_background(url, every)
        info(f"usage rollup every {every:g} s (--usage-rollup-every)")
    else:
        info("usage rollup off: GET /api/orgs/{org}/usage reads the whole range from the ledger "
             "(run `upshift-platform usage rollup --every 5`)")


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    if not os.environ.get("SUPABASE_JWT_SECRET") and not os.environ.get("SUPABASE_URL"):
        raise CliError("serve needs SUPABASE_JWT_SECRET or SUPABASE_URL to verify access tokens "
                       "(for local development, `upshift-platform run` generates a secret)")
    os.environ.setdefault("DATABASE_URL", database_url(args))
    if check_settings().audit_signing_key is None:
        info("UPSHIFT_AUDIT_SIGNING_KEY not set: audit checkpoints answer 503 signing_not_configured")
    start_usage_rollup(os.environ["DATABASE_URL"], args.usage_rollup_every)
    serve(args.host, args.port, workers=args.workers)


def cmd_run(args: argparse.Namespace) -> None:
    """``make run``: embedded database, migrations, demo data, every function on one port."""
    from .demo import demo_data, paste_block
    from .server import serve

    url = database_url(args)
    endpoint = f"http://{args.host}:{args.port}"
    os.environ.setdefault("UPSHIFT_PUBLIC_BASE_URL", endpoint)
    local_env(url)
    check_settings()
    info("loading the demo data (idempotent)")
    data = demo_data(url, endpoint)
    print(paste_block(data), flush=True)
    start_usage_rollup(url, args.usage_rollup_every)
    serve(args.host, args.port, workers=args.workers)


def cmd_bench(args: argparse.Namespace) -> None:
    import sys as _sys

    root = str(project_root())
    if root not in _sys.path:
        _sys.path.insert(0, root)
    try:
        from bench import run_all
    except ImportError as exc:
        raise CliError(f"the bench/ scripts are not in {root} (run from a checkout)") from exc
    if not os.environ.get("DATABASE_URL"):
        info("no DATABASE_URL: the benchmarks start their own embedded server in .data/pg-bench")
    run_all.main([*(["--quick"] if args.quick else []), "--only", args.only])


# --- token -----------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> None:
    import time

    import jwt

    secret = os.environ.get("SUPABASE_JWT_SECRET")
    if not secret:
        path = project_root() / ".data" / JWT_SECRET_FILE
        if not path.exists():
            raise CliError(f"no SUPABASE_JWT_SECRET and no {path}: set the secret the server uses, "
                           "or start `upshift-platform run` once (it generates one)")
        secret = _read_secret(path)
    url = database_url(args)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select id from auth.users where lower(email) = lower(%s)", (args.email,)).fetchone()
        if row is None:
            if not args.create:
                raise CliError(f"no user with email {args.email} (pass --create to add one)")
            row = conn.execute(
                "insert into auth.users (email) values (%s) returning id", (args.email,)
            ).fetchone()
    assert row is not None
    now = int(time.time())
    token = jwt.encode(
        {"sub": str(row[0]), "email": args.email, "role": "authenticated", "aud": "authenticated",
         "iat": now, "exp": now + args.ttl},
        secret, algorithm="HS256",
    )
    info(f"access token for {args.email} ({row[0]}), valid {args.ttl} s")
    print(token)


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upshift-platform",
        description="Run and operate the upshift platform (credit pools, audit logs, billing).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group: Any, name: str, fn: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    def db_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="embedded data directory (default: .data/postgres)")
        p.add_argument("--port", dest="db_port", type=int,
                       help=f"embedded server port (default {embedded.DEFAULT_PORT})")

    db = sub.add_parser("db", help="the database: up, down, migrate, reset, url")
    dbs = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_target(add(dbs, "up", cmd_db_up, "start (or reuse) the embedded PostgreSQL, migrate, print its URL"))
    db_target(add(dbs, "down", cmd_db_down, "stop the embedded PostgreSQL"))
    db_target(add(dbs, "url", cmd_db_url, "print the database URL in use"))
    db_target(add(dbs, "migrate", cmd_db_migrate, "apply pending migrations to DATABASE_URL or the embedded server"))
    p = add(dbs, "lint", cmd_db_lint, "run plpgsql_check on every function, in a scratch database on a server "
            "that has the extension (default: DATABASE_URL, else 127.0.0.1:5432)")
    p.add_argument("--server", help="a PostgreSQL URL (the scratch database is created and dropped there)")
    p = add(dbs, "reset", cmd_db_reset, "drop and recreate the database, then migrate (local only)")
    db_target(p)
    p.add_argument("--force-remote", action="store_true", help=argparse.SUPPRESS)

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
        p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
        p.add_argument("--usage-rollup-every", type=float, default=5.0, metavar="SECONDS",
                       help="run the usage rollup job in the background every SECONDS (default 5; 0: off)")
        p.add_argument("--data-dir", help="embedded data directory (default: .data/postgres)")
        p.add_argument("--db-port", type=int, help="embedded database port")

    server_args(add(sub, "serve", cmd_serve, "serve every function on one port (gunicorn); needs "
                    "SUPABASE_JWT_SECRET or SUPABASE_URL"))

    server_args(add(sub, "run", cmd_run, "start the database, migrate, load the demo and serve everything"))

    p = add(sub, "token", cmd_token, "mint a local HS256 access token for a user (printed last), signed with "
            "SUPABASE_JWT_SECRET or else the secret `run` keeps in .data/jwt-secret")
    db_target(p)
    p.add_argument("--email", required=True)
    p.add_argument("--create", action="store_true", help="add the auth.users row if missing")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    p = add(sub, "bench", cmd_bench, "run the benchmarks (debit, HTTP, audit) and print their tables")
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test, not figures to quote)")
    p.add_argument("--only", default="debit,http,audit", help="comma-separated subset")

    from . import demo, operator

    operator.add_commands(sub, add, db_target)
    demo.add_commands(sub, add, db_target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (CliError, embedded.EmbeddedError, MigrationError) as exc:
        print(f"upshift-platform: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        msg = ((exc.diag.message_primary if exc.diag else None) or str(exc) or type(exc).__name__).splitlines()[0]
        state = exc.diag.sqlstate if exc.diag else None
        prefix = "" if state and (state.startswith("PT") or state == "P0001") else "database error: "
        print(f"upshift-platform: {prefix}{msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
