"""``upshift-platform``: the operator and developer command line.

Human output goes to stderr and tables to stdout; ``--json`` (on every command) prints one JSON
document instead. Every failure exits non-zero with a one-line reason; a closed output pipe
(``... | head -3``) ends the command quietly with status 141, as it would any Unix tool.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg

from . import embedded
from .clikit import CliError, connect, database_url, emit, info, is_local
from .migrate import MigrationError, migrate
from .paths import project_root
from .settings import Settings, SettingsError
from .signing import new_seed_base64

JWT_SECRET_FILE = "jwt-secret"  # noqa: S105 (a file name in .data/, not a secret)
SIGNING_KEY_FILE = "audit-signing-key"


# --- db --------------------------------------------------------------------------------------


def cmd_db_up(args: argparse.Namespace) -> None:
    """Start (creating it the first time) or reuse the embedded server; after a crash, recover it first."""
    if os.environ.get("DATABASE_URL"):
        info("note: DATABASE_URL is set; `db up` manages the embedded server, which that variable overrides")
    srv = embedded.up(args.data_dir, args.db_port)
    applied = migrate(srv.url, log=info)
    info(f"PostgreSQL {srv.binaries.version()} ({srv.binaries.source}) in {srv.data_dir}; "
         f"{len(applied)} migration(s) applied")
    if args.json:
        emit(args, {"url": srv.url, "data_dir": str(srv.data_dir), "port": srv.port,
                    "version": srv.binaries.version(), "source": srv.binaries.source,
                    "migrations_applied": [m.path.name for m in applied], "recovery": srv.recovery})
        return
    print(srv.url)


def cmd_db_down(args: argparse.Namespace) -> None:
    srv = embedded.server(args.data_dir)
    stale = srv.stale_pid()
    stopped = srv.stop()
    info("stopped" if stopped else "not running" + (
        f" (a crashed server's lock file is left, pid {stale}: `db up` recovers it)" if stale else ""))
    if args.json:
        emit(args, {"stopped": stopped, "data_dir": str(srv.data_dir), "stale_pid": stale})


def cmd_db_url(args: argparse.Namespace) -> None:
    url = database_url(args, start=False)
    if args.json:
        emit(args, {"url": url})
    else:
        print(url)


def cmd_db_migrate(args: argparse.Namespace) -> None:
    url = database_url(args)
    connect(url).close()  # a server still recovering: wait for it, rather than fail on the first try
    applied = migrate(url, log=info)
    info(f"{len(applied)} migration(s) applied" if applied else "nothing to apply")
    if args.json:
        emit(args, {"applied": [m.path.name for m in applied]})


def cmd_db_lint(args: argparse.Namespace) -> None:
    from .sqlcheck import check, run

    server = args.server or os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    if not args.json:
        run(server)
        return
    findings = check(server)
    emit(args, {"ok": not findings, "findings": findings})
    if findings:
        raise SystemExit(1)


def cmd_db_reset(args: argparse.Namespace) -> None:
    url = database_url(args)
    if not is_local(url) and not args.force_remote:
        raise CliError(f"refusing to reset a non-local database ({urlparse(url).hostname})")
    parsed = urlparse(url)
    dbname = (parsed.path or "/postgres").lstrip("/") or "postgres"
    admin = parsed._replace(path="/template1").geturl()
    with connect(admin, autocommit=True) as conn:
        conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = %s and pid <> pg_backend_pid()", (dbname,)
        )
        conn.execute(f'drop database if exists "{dbname}"')
        conn.execute(f'create database "{dbname}"')
    applied = migrate(url, log=info)
    info(f"reset {dbname}: {len(applied)} migration(s) applied")
    if args.json:
        emit(args, {"url": url, "database": dbname, "applied": [m.path.name for m in applied]})
    else:
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


def check_port_free(host: str, port: int) -> None:
    """Refuse at once when something already listens on ``host:port`` (a second ``make run``, say),
    instead of printing keys and letting the HTTP server fail to bind five times."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CliError(f"cannot listen on {host}: {exc.strerror}") from None
    family, _type, _proto, _name, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"port {port} on {host} is already in use (another `upshift-platform run` or "
                               "`serve`?): stop it, or pass --port") from None
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


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
    from .server import default_workers, serve

    check_port_free(args.host, args.port)
    if not os.environ.get("SUPABASE_JWT_SECRET") and not os.environ.get("SUPABASE_URL"):
        raise CliError("serve needs SUPABASE_JWT_SECRET or SUPABASE_URL to verify access tokens "
                       "(for local development, `upshift-platform run` generates a secret)")
    os.environ.setdefault("DATABASE_URL", database_url(args))
    if check_settings().audit_signing_key is None:
        info("UPSHIFT_AUDIT_SIGNING_KEY not set: audit checkpoints answer 503 signing_not_configured")
    start_usage_rollup(os.environ["DATABASE_URL"], args.usage_rollup_every)
    if args.json:
        print(json.dumps({"endpoint": f"http://{args.host}:{args.port}", "workers": args.workers or default_workers(),
                          "threads": args.threads}), flush=True)
    serve(args.host, args.port, workers=args.workers, threads=args.threads)


def cmd_run(args: argparse.Namespace) -> None:
    """``make run``: embedded database, migrations, demo data, every function on one port."""
    from .demo import demo_data, paste_block
    from .server import serve

    check_port_free(args.host, args.port)  # before anything is started or printed
    url = database_url(args, create=True)
    endpoint = f"http://{args.host}:{args.port}"
    os.environ.setdefault("UPSHIFT_PUBLIC_BASE_URL", endpoint)
    local_env(url)
    check_settings()
    info("loading the demo data (idempotent)")
    data = demo_data(url, endpoint)
    if args.json:
        print(json.dumps(data), flush=True)  # one line: the demo's endpoint, org, users and keys
    else:
        print(paste_block(data), flush=True)
    start_usage_rollup(url, args.usage_rollup_every)
    serve(args.host, args.port, workers=args.workers, threads=args.threads)


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
    argv = [*(["--quick"] if args.quick else []), "--only", args.only]
    if not args.json:
        run_all.main(argv)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the tables go to stderr; stdout holds one JSON document
        results = run_all.main(argv)
    emit(args, results)


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
    with connect(url, autocommit=True) as conn:
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
    if args.json:
        emit(args, {"token": token, "user_id": str(row[0]), "email": args.email, "expires_at": now + args.ttl})
    else:
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
        p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
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
        p.add_argument("--workers", type=int, default=None,
                       help="gunicorn worker processes (default: one per core this process may use)")
        p.add_argument("--threads", type=int, default=8, help="request threads per worker (default 8)")
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
        if isinstance(exc, psycopg.OperationalError) and "connection refused" in str(exc).lower():
            msg = (f"{msg} (no server is listening there"
                   + ("; for the embedded one, `upshift-platform db up` starts it, recovering it after a crash)"
                      if is_local(os.environ.get("DATABASE_URL") or "") else ")"))
        print(f"upshift-platform: {prefix}{msg}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`... | head -3`): stop quietly, as a Unix tool killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush cannot fail either
        return 128 + 13
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
