"""Operator commands: orgs, members, keys, credits and audit, through service_role RPCs.

Every command runs as ``service_role`` in one transaction, calling the same RPCs (and so keeping
the same rules) as the API. Errors come back as the RPC's one-line message: an unknown org is
``No org <org>.`` with exit status 1 in every command, because every command resolves it through
the same RPC (``admin_get_org`` / ``private.operator_org``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from . import csvsafe
from .clikit import SERVICE, CliError, cell, connect, database_url, emit, info, service_tx, sql_error_code
from .db import act_as, call, connect_kwargs
from .encoding import dumps
from .handlers.audit import COLUMNS as EXPORT_COLUMNS
from .handlers.audit import SELECT as EXPORT_SELECT


def _url(args: argparse.Namespace) -> str:
    return database_url(args)


def _emit(args: argparse.Namespace, data: Any, rows: list[dict[str, Any]] | None = None,
          columns: tuple[str, ...] = ()) -> None:
    emit(args, data, rows, columns)


def _org(cur: psycopg.Cursor[Any], org: str) -> dict[str, Any]:
    """An org by id or slug, resolved by the database (private.context), with its balance."""
    found: dict[str, Any] = call(cur, "admin_get_org", org=org)
    return found


def _user(cur: psycopg.Cursor[Any], email: str, create: bool = False, *, can_create: bool = False) -> str:
    """A user's id by email. ``can_create``: the command has ``--create-user``, and the error says so."""
    try:
        return str(call(cur, "admin_find_user", email=email, create_missing=create))
    except psycopg.Error as exc:
        if can_create and sql_error_code(exc) == "user_not_found":
            raise CliError(f"No user with email {email}: they must sign in once first (Supabase Auth creates "
                           "the user then), or pass --create-user to create them now") from None
        raise


def _account(cur: psycopg.Cursor[Any], args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(org, user_id) from --org / --email (an empty --org is an org that does not exist, not "no org")."""
    if getattr(args, "org", None) is not None:
        return args.org, None
    return None, _user(cur, args.email)


def _account_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--org", help="an org id or slug")
    group.add_argument("--email", help="a user's email (their personal account)")


# --- orgs ------------------------------------------------------------------------------------


def orgs_create(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        admin = (_user(cur, args.admin_email, args.create_user, can_create=True)
                 if args.admin_email is not None else None)
        org = call(cur, "admin_create_org", name=args.name, slug=args.slug, plan=args.plan, admin_user_id=admin)
    _emit(args, org)


def orgs_list(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        rows = cur.execute(
            "select o.id, o.slug, o.name, o.plan, a.balance,"
            " (select count(*) from public.org_members m where m.org_id = o.id) as members, o.created_at"
            " from public.orgs o join public.credit_accounts a on a.id = o.id order by o.slug").fetchall()
    _emit(args, rows, rows, ("slug", "name", "plan", "balance", "members", "id"))


def orgs_set_plan(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        _emit(args, call(cur, "admin_set_org_plan", org=args.org, plan=args.plan))


# --- members ---------------------------------------------------------------------------------


def members_add(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        _org(cur, args.org)  # an unknown org first, as in every command
        user = _user(cur, args.email, args.create_user, can_create=True)
        _emit(args, call(cur, "admin_add_member", org=args.org, user_id=user, role=args.role))


def members_set_role(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        _org(cur, args.org)  # an unknown org first, as in every command
        user = _user(cur, args.email)
        _emit(args, call(cur, "admin_set_member_role", org=args.org, user_id=user, role=args.role))


def members_remove(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        _org(cur, args.org)  # an unknown org first, as in every command
        user = _user(cur, args.email)
        _emit(args, call(cur, "admin_remove_member", org=args.org, user_id=user))


def members_list(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        rows = cur.execute(
            "select p.email, m.role, m.user_id, m.created_at from public.org_members m"
            " join public.profiles p on p.id = m.user_id where m.org_id = %s order by m.created_at",
            (_org(cur, args.org)["id"],)).fetchall()
    _emit(args, rows, rows, ("email", "role", "user_id", "created_at"))


# --- keys ------------------------------------------------------------------------------------


def keys_create(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        if args.org is not None:
            _org(cur, args.org)
        user = _user(cur, args.email)
        key = call(cur, "admin_create_api_key", user_id=user, name=args.name, kind=args.kind, org=args.org,
                   expires_at=args.expires_at)
    if args.json:
        _emit(args, key)
        return
    print(f"created {key['kind']} key {key['id']} ({key['name']}); the secret is shown only now:", file=sys.stderr)
    print(key["secret"])


def keys_list(args: argparse.Namespace) -> None:
    where, params = ["true"], {}
    with service_tx(_url(args)) as cur:
        if args.email is not None:  # an unknown user is an error, not an empty list
            where.append("k.user_id = %(user)s")
            params["user"] = _user(cur, args.email)
        if args.org is not None:
            where.append("k.org_id = %(org)s")
            params["org"] = _org(cur, args.org)["id"]
        rows = cur.execute(
            "select k.id, k.kind, k.name, k.key_prefix as prefix, p.email as owner, o.slug as org, k.created_at,"
            " k.last_used_at, k.expires_at, k.revoked_at from public.api_keys k"
            " join public.profiles p on p.id = k.user_id"
            f" left join public.orgs o on o.id = k.org_id where {' and '.join(where)} order by k.created_at",
            params).fetchall()
    _emit(args, rows, rows, ("id", "kind", "name", "prefix", "owner", "org", "last_used_at", "revoked_at"))


def keys_revoke(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        _emit(args, call(cur, "admin_revoke_api_key", key_id=args.key_id))


# --- credits ---------------------------------------------------------------------------------


def credits_grant(args: argparse.Namespace) -> None:
    key = args.idempotency_key or f"cli:{uuid.uuid4()}"
    with service_tx(_url(args)) as cur:
        org, user = _account(cur, args)
        if org is not None:
            org = str(_org(cur, org)["id"])  # the one resolver, so its error is every command's error
        out = call(cur, "grant_credits", amount=args.amount, reason=args.reason, org=org, user_id=user,
                   idempotency_key=key, metadata={"via": "upshift-platform", "note": args.note} if args.note
                   else {"via": "upshift-platform"})
    _emit(args, {**out, "idempotency_key": key})


def credits_balance(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        org, user = _account(cur, args)
        row: dict[str, Any] | None
        if org is not None:
            found = _org(cur, org)
            row = cur.execute("select o.slug as account, o.plan, a.balance from public.orgs o"
                              " join public.credit_accounts a on a.id = o.id where o.id = %s",
                              (found["id"],)).fetchone()
        else:
            row = cur.execute("select p.email as account, p.plan, a.balance from public.profiles p"
                              " join public.credit_accounts a on a.id = p.id where p.id = %s", (user,)).fetchone()
    _emit(args, row)


def credits_history(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        org, user = _account(cur, args)
        account = _org(cur, org)["id"] if org is not None else user
        rows = cur.execute(
            "select t.created_at, t.amount, t.balance_after, t.reason, t.actor_user_id as user_id, t.service_key_id,"
            " coalesce(t.idempotency_key, t.system_key) as idempotency_key, t.id from public.credit_transactions t"
            " where t.account_id = %s order by t.created_at desc, t.id desc limit %s",
            (account, args.limit)).fetchall()
    _emit(args, rows, rows, ("created_at", "amount", "balance_after", "reason", "idempotency_key"))


def prices_list(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        rows = cur.execute("select action, credits, updated_at from public.credit_prices order by action").fetchall()
    _emit(args, rows, rows, ("action", "credits", "updated_at"))


def prices_set(args: argparse.Namespace) -> None:
    prices: dict[str, int] = {}
    for item in args.prices:
        action, _, credits = item.partition("=")
        if not credits.strip().isdigit():
            raise CliError(f"{item!r}: want action=credits, e.g. explain=1")
        prices[action.strip()] = int(credits)
    with service_tx(_url(args)) as cur:
        _emit(args, call(cur, "admin_set_prices", prices=prices, replace_all=args.replace))


# --- audit -----------------------------------------------------------------------------------

AUDIT_SELECT = ("select l.id, l.seq, l.created_at, l.event_type, l.actor_kind, l.user_id, l.service_key_id,"
                " l.resource_type, l.resource_id, l.metadata, host(l.ip) as ip, l.user_agent, l.client_timestamp,"
                " l.org_id, l.scope_id from public.audit_logs l")


def _scope(cur: psycopg.Cursor[Any], args: argparse.Namespace) -> str:
    org, user = _account(cur, args)
    return str(_org(cur, org)["id"]) if org is not None else str(user)


def _seal(url: str) -> None:
    """Move committed events still in the outbox into the chain (the sealer does it within a second)."""
    with service_tx(url) as cur:
        call(cur, "seal_audit_logs")


def audit_tail(args: argparse.Namespace) -> None:
    url = _url(args)
    _seal(url)
    with service_tx(url) as cur:
        scope = _scope(cur, args)
        rows = cur.execute(f"{AUDIT_SELECT} where l.scope_id = %s order by l.seq desc limit %s",
                           (scope, args.n)).fetchall()[::-1]
    columns = ("seq", "created_at", "event_type", "actor_kind", "resource_type", "resource_id")
    if args.follow and args.json:  # a stream: one JSON object per line (NDJSON), the first rows included
        for row in rows:
            print(dumps(row), flush=True)
    else:
        _emit(args, rows, rows, columns)
    last = rows[-1]["seq"] if rows else 0
    while args.follow:
        time.sleep(2)
        _seal(url)
        with service_tx(url) as cur:
            new = cur.execute(f"{AUDIT_SELECT} where l.scope_id = %s and l.seq > %s order by l.seq",
                              (scope, last)).fetchall()
        for row in new:
            print(dumps(row) if args.json else "  ".join(cell(row[c]) for c in columns), flush=True)
            last = row["seq"]


def audit_export(args: argparse.Namespace) -> None:
    """Every event of a log, streamed: the HTTP export's columns, row order and encoding (CSV or NDJSON).

    ``--output`` is written under a temporary name and renamed when complete: a failed export leaves
    no partial file behind, and an unknown org no empty one.
    """
    url = _url(args)
    _seal(url)
    count = 0
    target = Path(args.output) if args.output else None
    partial = target.with_name(f".{target.name}.partial") if target else None
    with connect(url, **connect_kwargs()) as conn, conn.transaction():
        with conn.cursor() as cur:
            act_as(cur, "service_role", SERVICE)
            scope = _scope(cur, args)
        out = open(partial, "w", newline="") if partial else sys.stdout  # closed below
        try:
            with conn.cursor(name="audit_export") as named:
                named.itersize = 2000
                named.execute(f"{EXPORT_SELECT} where l.scope_id = %s order by l.created_at, l.id", (scope,))
                if args.format == "csv":
                    out.write(csvsafe.line(EXPORT_COLUMNS))
                for row in named:
                    if args.format == "csv":
                        out.write(csvsafe.line(row[c] for c in EXPORT_COLUMNS))  # formula-like cells escaped
                    else:
                        out.write(dumps(row) + "\n")
                    count += 1
                    if count % 10000 == 0 and target:
                        info(f"[export] {count} rows")
            out.flush()
        except BaseException:
            if partial:
                out.close()
                partial.unlink(missing_ok=True)
            raise
    if partial and target:
        out.close()
        partial.replace(target)
    info(f"[export] {count} rows written{' to ' + str(target) if target else ''}")


def audit_verify(args: argparse.Namespace) -> None:
    with service_tx(_url(args)) as cur:
        org, user = _account(cur, args)
        result = call(cur, "admin_verify_audit_log", org=org, user_id=user)
    if args.json:
        _emit(args, result)
    elif result["ok"]:
        print(f"ok: {result['checked']} events verified (head seq {result['head_seq']}, hash {result['head_hash']})")
    else:
        print(f"BROKEN at seq {result['first_bad_seq']}: {result['message']}")
    if not result["ok"]:
        raise SystemExit(3)


PURGED_SQL = """
select l.scope_id, coalesce(o.slug, p.email) as log, case when l.org_id is null then 'user' else 'org' end as kind,
       (l.metadata ->> 'retention_days')::integer as retention_days, (l.metadata ->> 'cutoff')::timestamptz as cutoff,
       (l.metadata ->> 'deleted')::bigint as events, (l.metadata ->> 'through_seq')::bigint as through_seq
from public.audit_logs l
left join public.orgs o on o.id = l.org_id
left join public.profiles p on p.id = l.scope_id and l.org_id is null
where l.event_type = 'audit_purged' and l.xmin = pg_current_xact_id()::xid
order by kind, log
"""


class AsOf(NamedTuple):
    text: str  # as typed, for messages
    moment: datetime


def _as_of(text: str) -> AsOf:
    """``--as-of``: an ISO 8601 date or time; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or time (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)") from None
    return AsOf(text, moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def audit_purge(args: argparse.Namespace) -> None:
    """Without ``--yes``, the purge runs in a transaction that is rolled back: it reports exactly what
    ``--yes`` would delete (the same SQL, ``purge_audit_logs``), and deletes nothing."""
    with connect(_url(args), **connect_kwargs()) as conn:
        with conn.transaction(force_rollback=not args.yes), conn.cursor() as cur:
            act_as(cur, "service_role", SERVICE)
            try:
                result = call(cur, "purge_audit_logs", as_of=args.as_of.moment if args.as_of else None)
            except psycopg.Error as exc:
                if args.as_of and sql_error_code(exc) == "invalid_as_of":
                    raise CliError(f"--as-of {args.as_of.text} is in the future: purging as of a later time would "
                                   "delete events that are still inside their retention; refused") from None
                raise
            logs = cur.execute(PURGED_SQL).fetchall()  # each shortened log's audit_purged event, this transaction
    out = {"dry_run": not args.yes, **result, "logs": logs}
    _emit(args, out, logs, ("log", "kind", "retention_days", "cutoff", "events", "through_seq"))
    if args.json:
        return
    what = f"{result['deleted']} event(s) in {result['scopes']} log(s) (as of {cell(result['as_of'])})"
    if args.yes:
        info(f"deleted {what}; each of those logs now starts with an audit_purged event and still verifies")
    else:
        info(f"dry run: would delete {what}; nothing was deleted. Run again with --yes to delete them.")


def audit_retention(args: argparse.Namespace) -> None:
    days = None if args.days == "default" else int(args.days)
    with service_tx(_url(args)) as cur:
        _emit(args, call(cur, "admin_set_audit_retention", org=args.org, days=days))


# --- usage -----------------------------------------------------------------------------------


def usage_rollup(args: argparse.Namespace) -> None:
    from .usage_job import run_once

    if args.every is not None and args.every <= 0:
        raise CliError("--every is a number of seconds above 0")
    url = _url(args)
    while True:
        try:
            result = run_once(url, wait_ms=args.wait_ms)
        except psycopg.Error as exc:
            raise CliError(exc.diag.message_primary or str(exc)) from None
        if args.every is None:
            _emit(args, result)
            return
        if result.get("folded") or args.json:
            print(dumps(result) if args.json else
                  f"closed through {result['closed_through']}: folded {result['folded']} spend(s)", flush=True)
        time.sleep(args.every)


# --- parser ----------------------------------------------------------------------------------


def add_commands(sub: Any, add: Any, db_target: Any) -> None:
    def group(name: str, help_: str) -> Any:
        p = sub.add_parser(name, help=help_, description=help_)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    def cmd(g: Any, name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = add(g, name, fn, help_)
        db_target(p)
        return p

    g = group("orgs", "orgs: create, list, set-plan")
    p = cmd(g, "create", orgs_create, "create an org")
    p.add_argument("--name", required=True)
    p.add_argument("--slug", required=True)
    p.add_argument("--plan", default="pro", help="pro (default) or team")
    p.add_argument("--admin-email", help="make this user its first admin")
    p.add_argument("--create-user", action="store_true", help="create the admin's auth.users row if missing")
    cmd(g, "list", orgs_list, "list every org")
    p = cmd(g, "set-plan", orgs_set_plan, "set an org's plan by hand (Stripe does it otherwise)")
    p.add_argument("--org", required=True)
    p.add_argument("--plan", required=True, help="pro or team")

    g = group("members", "org members: add, set-role, remove, list")
    p = cmd(g, "add", members_add, "add a user to an org (or set their role)")
    p.add_argument("--org", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--role", default="member", help="admin, member (default) or viewer")
    p.add_argument("--create-user", action="store_true", help="create the auth.users row if missing")
    p = cmd(g, "set-role", members_set_role, "change a member's role (never the last admin)")
    p.add_argument("--org", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--role", required=True, help="admin, member or viewer")
    p = cmd(g, "remove", members_remove, "remove a member (never the last admin)")
    p.add_argument("--org", required=True)
    p.add_argument("--email", required=True)
    p = cmd(g, "list", members_list, "list an org's members")
    p.add_argument("--org", required=True)

    g = group("prices", "what each action costs: list, set")
    cmd(g, "list", prices_list, "list the price of every action")
    p = cmd(g, "set", prices_set, "set prices (action=credits ...); --replace drops the actions not named")
    p.add_argument("prices", nargs="+", metavar="ACTION=CREDITS")
    p.add_argument("--replace", action="store_true")

    g = group("keys", "API keys: create, list, revoke")
    p = cmd(g, "create", keys_create, "create an API key for a user; prints the secret once")
    p.add_argument("--email", required=True, help="the key's owner")
    p.add_argument("--org", help="personal: default org; service: the org it acts for")
    p.add_argument("--kind", default="personal", help="personal (default) or service")
    p.add_argument("--name", default="cli")
    p.add_argument("--expires-at", help="ISO 8601 timestamp")
    p = cmd(g, "list", keys_list, "list keys (never secrets)")
    p.add_argument("--org")
    p.add_argument("--email")
    p = cmd(g, "revoke", keys_revoke, "revoke a key at once")
    p.add_argument("key_id", type=uuid.UUID)

    g = group("credits", "credits: grant, balance, history")
    p = cmd(g, "grant", credits_grant, "grant credits to an org or a user")
    _account_args(p)
    p.add_argument("--amount", type=int, required=True)
    p.add_argument("--reason", default="admin_grant")
    p.add_argument("--note")
    p.add_argument("--idempotency-key", help="repeat a grant safely (default: a new one each time)")
    p = cmd(g, "balance", credits_balance, "an account's balance")
    _account_args(p)
    p = cmd(g, "history", credits_history, "an account's ledger, newest first")
    _account_args(p)
    p.add_argument("--limit", type=int, default=20)

    g = group("audit", "audit logs: tail, export, verify, purge, retention")
    p = cmd(g, "tail", audit_tail, "the latest events of an org or a user")
    _account_args(p)
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--follow", action="store_true", help="keep printing new events (with --json: one JSON object "
                   "per line)")
    p = cmd(g, "export", audit_export, "export every event (streamed)")
    _account_args(p)
    p.add_argument("--format", choices=["ndjson", "csv"], default="ndjson")
    p.add_argument("--output", help="file (default: stdout)")
    p = cmd(g, "verify", audit_verify, "recompute the hash chain (exit 3 when broken)")
    _account_args(p)
    p = cmd(g, "purge", audit_purge, "report (dry run, the default) or, with --yes, delete the events past each "
            "log's retention; a purge keeps a checkpoint and records audit_purged in each log it shortens")
    p.add_argument("--yes", action="store_true", help="delete them (without it: only say what would be deleted)")
    p.add_argument("--as-of", type=_as_of, help="purge as if it were this time, ISO 8601, UTC unless it says "
                   "otherwise (default now; a time in the future is refused)")
    p = cmd(g, "retention", audit_retention, "set an org's audit retention")
    p.add_argument("--org", required=True)
    p.add_argument("--days", required=True, help="days, or 'default' for the plan's")

    g = group("usage", "the usage rollup behind GET /api/orgs/{org}/usage: rollup")
    p = cmd(g, "rollup", usage_rollup, "fold the closed part of the ledger into the usage rollup (once, or --every)")
    p.add_argument("--every", type=float, metavar="SECONDS", help="keep running, every SECONDS")
    p.add_argument("--wait-ms", type=int, default=200,
                   help="how long a run waits for the transactions running when it starts (default 200)")
