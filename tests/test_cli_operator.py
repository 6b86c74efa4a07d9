"""Every operator command at least once, against a real database, in-process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psycopg
import pytest

from tests.conftest import age_audit_logs
from upshift_platform import cli
from upshift_platform.embedded import free_port


@pytest.fixture
def run_cli(db_url, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("UPSHIFT_PROJECT_DIR", str(tmp_path))  # demo keys file goes here

    def run(*argv: str, ok: bool = True):
        code = cli.main(list(argv))
        out = capsys.readouterr()
        if ok:
            assert code == 0, out.err
        return code, out.out, out.err

    return run


def js(run, *argv):
    return json.loads(run(*argv, "--json")[1])


def test_orgs_members_keys(run_cli, conn):
    org = js(run_cli, "orgs", "create", "--name", "Beta", "--slug", "beta", "--plan", "team",
             "--admin-email", "boss@beta.test", "--create-user")
    assert org["slug"] == "beta" and org["plan"] == "team"
    code, _, err = run_cli("orgs", "create", "--name", "Beta", "--slug", "beta", ok=False)
    assert code == 1 and err.strip() == "upshift-platform: The slug beta is taken."
    assert [o["slug"] for o in js(run_cli, "orgs", "list")] == ["beta"]
    assert "beta" in run_cli("orgs", "list")[1]
    assert js(run_cli, "orgs", "set-plan", "--org", "beta", "--plan", "pro")["plan"] == "pro"

    js(run_cli, "members", "add", "--org", "beta", "--email", "dev@beta.test", "--create-user")
    assert js(run_cli, "members", "set-role", "--org", "beta", "--email", "dev@beta.test", "--role", "viewer")["role"] \
        == "viewer"
    code, _, err = run_cli("members", "set-role", "--org", "beta", "--email", "boss@beta.test", "--role", "member",
                           ok=False)
    assert code == 1 and "at least one admin" in err
    assert {m["email"] for m in js(run_cli, "members", "list", "--org", "beta")} == {"boss@beta.test", "dev@beta.test"}
    assert js(run_cli, "members", "remove", "--org", "beta", "--email", "dev@beta.test")["removed"] is True
    code, _, err = run_cli("members", "add", "--org", "beta", "--email", "ghost@beta.test", ok=False)
    assert code == 1 and "No user with email" in err

    _, secret, _ = run_cli("keys", "create", "--email", "boss@beta.test", "--org", "beta", "--kind", "service",
                           "--name", "ci")
    assert secret.strip().startswith("ups_")
    keys = js(run_cli, "keys", "list", "--org", "beta")
    assert [k["name"] for k in keys] == ["ci"] and all("secret" not in k for k in keys)
    assert secret.strip() not in json.dumps(keys)
    revoked = js(run_cli, "keys", "revoke", keys[0]["id"])
    assert revoked["revoked_at"] is not None


def test_credits_commands(run_cli, world):
    world.org("acme", balance=0, admin=world.user("a@acme.test"))
    g = js(run_cli, "credits", "grant", "--org", "acme", "--amount", "100", "--reason", "admin_grant",
           "--idempotency-key", "ticket-42")
    assert g["balance"] == 100
    again = js(run_cli, "credits", "grant", "--org", "acme", "--amount", "100", "--reason", "admin_grant",
               "--idempotency-key", "ticket-42")
    assert again["replayed"] is True and again["balance"] == 100
    assert js(run_cli, "credits", "balance", "--org", "acme")["balance"] == 100
    assert js(run_cli, "credits", "balance", "--email", "a@acme.test")["balance"] == 10
    history = js(run_cli, "credits", "history", "--org", "acme")
    assert [h["reason"] for h in history] == ["admin_grant"]
    code, _, err = run_cli("credits", "grant", "--org", "acme", "--amount", "0", ok=False)
    assert code == 1 and "amount must be a whole number" in err
    with pytest.raises(SystemExit) as exc:  # argparse: one of --org/--email is required
        run_cli("credits", "grant", "--amount", "5", ok=False)
    assert exc.value.code == 2


def test_audit_commands(run_cli, world, conn, tmp_path):
    org = world.org("acme", balance=5, admin=world.user("a@acme.test"))
    tail = js(run_cli, "audit", "tail", "--org", "acme", "-n", "5")
    assert [e["event_type"] for e in tail][-1] == "credits_granted"
    assert js(run_cli, "audit", "verify", "--org", "acme")["ok"] is True
    assert run_cli("audit", "verify", "--org", "acme")[1].startswith("ok: ")
    out = tmp_path / "audit.ndjson"
    run_cli("audit", "export", "--org", "acme", "--output", str(out))
    assert len(out.read_text().splitlines()) == len(tail)
    run_cli("audit", "export", "--org", "acme", "--format", "csv", "--output", str(tmp_path / "a.csv"))
    assert (tmp_path / "a.csv").read_text().startswith("id,seq,")
    assert js(run_cli, "audit", "retention", "--org", "acme", "--days", "30")["effective_days"] == 30
    assert js(run_cli, "audit", "retention", "--org", "acme", "--days", "default")["effective_days"] == 365
    age_audit_logs(conn, org, 400)
    assert js(run_cli, "audit", "purge")["dry_run"] is True
    purge = js(run_cli, "audit", "purge", "--yes")
    assert purge["deleted"] >= 1
    assert js(run_cli, "audit", "verify", "--org", "acme")["ok"] is True


def test_audit_verify_exits_3_when_broken(run_cli, world, conn):
    world.org("acme", balance=5, admin=world.user("a@acme.test"))
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("alter table public.audit_logs disable trigger audit_logs_no_update")
        conn.execute("update public.audit_logs set metadata = '{}' where seq = 1")
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")
    code, out, _ = run_cli("audit", "verify", "--org", "acme", ok=False)
    assert code == 3 and out.startswith("BROKEN at seq 1")


def test_demo_is_idempotent_and_its_keys_work(run_cli, conn, client):
    first = js(run_cli, "demo")
    assert set(first) >= {"endpoint", "audit_url", "org_id", "org_slug", "keys"}
    assert set(first["keys"]) == {"admin", "member", "viewer", "ci"}
    before = conn.execute("select (select count(*) from public.api_keys) as k, (select count(*) from public.audit_logs)"
                          " as a, (select a.balance from public.credit_accounts a join public.orgs o on o.id = a.id where o.slug = 'acme') as b").fetchone()
    second = js(run_cli, "demo")
    after = conn.execute("select (select count(*) from public.api_keys) as k, (select count(*) from public.audit_logs)"
                         " as a, (select a.balance from public.credit_accounts a join public.orgs o on o.id = a.id where o.slug = 'acme') as b").fetchone()
    assert second["keys"] == first["keys"] and before == after and after["b"] == 500
    org = conn.execute("select plan from public.orgs where slug = 'acme'").fetchone()
    assert org["plan"] == "team"
    status = client.get("/billing/status", headers={"Authorization": f"Bearer {first['keys']['member']}"}).get_json()
    assert status["tier"] == "team" and status["balance"] == 500
    # Keys that no longer work are replaced by new ones on the next run.
    conn.execute("update public.api_keys set revoked_at = now()")
    third = js(run_cli, "demo")
    assert third["keys"]["member"] != first["keys"]["member"]
    assert client.get("/billing/status", headers={"Authorization": f"Bearer {third['keys']['ci']}"}).status_code == 200
    text = run_cli("demo")[1]
    assert "export UPSHIFT_CREDITS_ENDPOINT=" in text and "export UPSHIFT_ORG=acme" in text


@pytest.mark.parametrize("argv", [["orgs", "--help"], ["members", "add", "--help"], ["keys", "create", "--help"],
                                  ["credits", "grant", "--help"], ["audit", "verify", "--help"], ["demo", "--help"],
                                  ["run", "--help"], ["bench", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: upshift-platform")


def test_run_loads_demo_prints_paste_block_and_serves(db_url, tmp_path):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "UPSHIFT_PROJECT_DIR": str(tmp_path)}
    env.pop("SUPABASE_JWT_SECRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "upshift_platform.cli", "run", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert json.loads(resp.read()) == {"status": "ok", "database": "ok"}
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("run did not serve /health")
        keys = json.loads((tmp_path / ".data" / "demo-keys.json").read_text())
        req = urllib.request.Request(f"http://127.0.0.1:{port}/credits/consume", method="POST",
                                     data=b'{"action": "explain", "count": 1}',
                                     headers={"Authorization": f"Bearer {keys['member']}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["balance"] == 499
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert f"export UPSHIFT_CREDITS_ENDPOINT=http://127.0.0.1:{port}" in out
    assert f"export UPSHIFT_AUDIT_URL=http://127.0.0.1:{port}/audit-events" in out
    assert "export UPSHIFT_ORG=acme" in out
    assert keys["member"] in out
    # One JSON log line per request, never a key.
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    consume = next(line for line in lines if line["path"] == "/credits/consume")
    assert consume["status"] == 200 and consume["actor_id"] and consume["org_id"] and consume["request_id"]
    assert keys["member"] not in err


def test_bench_quick_prints_one_summary_table(db_url, capsys, monkeypatch):
    """`upshift-platform bench` against a real database (the audit part, quick: the rest is the same code path)."""
    from urllib.parse import urlparse

    monkeypatch.setenv("DATABASE_URL", urlparse(db_url)._replace(path="/postgres").geturl())
    assert cli.main(["bench", "--quick", "--only", "audit"]) == 0
    out = capsys.readouterr().out
    assert "upshift platform benchmarks; " in out and "PostgreSQL" in out
    assert "audit query p50 / p99 ms, first page, unfiltered" in out
    assert "audit ingest events/s, 100 per transaction" in out


def test_prices_live_in_the_database(run_cli, world, as_role):
    assert {p["action"]: p["credits"] for p in js(run_cli, "prices", "list")} == {"audit": 2, "explain": 1, "fix": 3}
    assert js(run_cli, "prices", "set", "explain=2", "scan=5") == {"audit": 2, "explain": 2, "fix": 3, "scan": 5}
    code, _, err = run_cli("prices", "set", "explain=0", ok=False)
    assert code == 1 and "1-1000000 credits" in err
    user = world.user()
    with as_role("authenticated", user) as cur, pytest.raises(psycopg.Error) as exc:
        cur.execute("select public.debit_credits(1, 'explain')")  # a PostgREST caller cannot pay less either
    assert exc.value.diag.sqlstate == "PT400" and json.loads(exc.value.diag.message_detail)["price"] == 2
    assert js(run_cli, "prices", "set", "--replace", "explain=1") == {"explain": 1}
    with as_role("authenticated", user) as cur, pytest.raises(psycopg.Error) as exc:
        cur.execute("select public.debit_credits(3, 'fix')")
    assert json.loads(exc.value.diag.message_detail) == {"error": "unknown_action", "field": "reason",
                                                          "known_actions": ["explain"]}


# --- one tool: errors, --json, output, export parity, purge (issue 17) ------------------------

ORG_COMMANDS = [
    ["orgs", "set-plan", "--plan", "team"],
    ["members", "add", "--email", "a@acme.test"],
    ["members", "set-role", "--email", "a@acme.test", "--role", "member"],
    ["members", "remove", "--email", "a@acme.test"],
    ["members", "list"],
    ["keys", "create", "--email", "a@acme.test"],
    ["keys", "list"],
    ["credits", "grant", "--amount", "5"],
    ["credits", "balance"],
    ["credits", "history"],
    ["audit", "tail"],
    ["audit", "export"],
    ["audit", "verify"],
    ["audit", "retention", "--days", "30"],
]


@pytest.mark.parametrize("argv", [pytest.param(a, id="-".join(a[:2])) for a in ORG_COMMANDS])
@pytest.mark.parametrize(("org", "message"), [
    pytest.param("nope", "No org nope.", id="slug"),
    pytest.param("00000000-0000-0000-0000-000000000000", "No org 00000000-0000-0000-0000-000000000000.", id="uuid"),
    pytest.param("", "Name an org (its id or slug).", id="empty"),
])
def test_an_unknown_org_is_the_same_one_line_error_everywhere(run_cli, world, conn, argv, org, message, tmp_path):
    world.org("acme", admin=world.user("a@acme.test"))
    before = conn.execute("select (select count(*) from public.audit_logs) as a,"
                          " (select count(*) from public.api_keys) as k").fetchone()
    extra = ["--output", str(tmp_path / "x.ndjson")] if argv[:2] == ["audit", "export"] else []
    code, out, err = run_cli(*argv, "--org", org, *extra, ok=False)
    assert (code, out, err) == (1, "", f"upshift-platform: {message}\n")
    code, out, err = run_cli(*argv, "--org", org, *extra, "--json", ok=False)
    assert (code, out, err) == (1, "", f"upshift-platform: {message}\n")
    assert not (tmp_path / "x.ndjson").exists()  # no empty export file either
    after = conn.execute("select (select count(*) from public.audit_logs) as a,"
                         " (select count(*) from public.api_keys) as k").fetchone()
    assert before == after


@pytest.mark.parametrize("argv", [
    pytest.param(["keys", "list"], id="keys-list"), pytest.param(["credits", "balance"], id="credits-balance"),
    pytest.param(["audit", "tail"], id="audit-tail"), pytest.param(["audit", "verify"], id="audit-verify"),
])
def test_an_unknown_user_is_an_error_not_an_empty_answer(run_cli, argv):
    code, out, err = run_cli(*argv, "--email", "ghost@nowhere.test", ok=False)
    assert (code, out, err) == (1, "", "upshift-platform: No user with email ghost@nowhere.test.\n")


def _commands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
            return
    yield prefix, parser


def test_every_command_takes_json():
    commands = dict(_commands(cli.build_parser()))
    assert len(commands) >= 30 and ("token",) in commands and ("db", "up") in commands
    missing = [" ".join(c) for c, p in commands.items() if "--json" not in p._option_string_actions]
    assert missing == []


def test_json_of_token_db_and_demo(run_cli, db_url, monkeypatch):
    import jwt

    monkeypatch.setenv("SUPABASE_JWT_SECRET", "s3cret-for-this-test-0123456789abcdef")
    token = js(run_cli, "token", "--email", "dev@example.test", "--create")
    claims = jwt.decode(token["token"], "s3cret-for-this-test-0123456789abcdef", algorithms=["HS256"],
                        audience="authenticated")
    assert claims["sub"] == token["user_id"] and token["expires_at"] == claims["exp"]
    assert js(run_cli, "db", "url") == {"url": db_url}
    assert js(run_cli, "db", "migrate") == {"applied": []}
    assert set(js(run_cli, "demo")) >= {"endpoint", "keys", "org_slug"}


def test_tables_and_plain_answers_have_no_python_reprs(run_cli, world):
    admin = world.user("a@acme.test")
    world.org("acme", admin=admin, balance=5)
    run_cli("keys", "create", "--email", "a@acme.test", "--org", "acme", "--kind", "service", "--name", "ci")
    outputs = [run_cli(*argv)[1] for argv in (
        ["orgs", "list"], ["members", "list", "--org", "acme"], ["keys", "list"], ["credits", "history", "--org", "acme"],
        ["audit", "tail", "--org", "acme"], ["credits", "balance", "--org", "acme"], ["prices", "list"],
        ["credits", "grant", "--org", "acme", "--amount", "1", "--idempotency-key", "k1"],
        ["members", "set-role", "--org", "acme", "--email", "a@acme.test", "--role", "admin"],
    )]
    text = "\n".join(outputs)
    for repr_ in ("None", "False", "True", "{'", "datetime.", "UUID(", "Decimal("):
        assert repr_ not in text
    assert "replayed: false" in text
    stamps = re.findall(r"\d{4}-\d\d-\d\d.\d\d:\d\d:\d\d", text)
    assert stamps and all("T" in s for s in stamps)  # times as in JSON, not Python's str()
    keys_table = outputs[2].splitlines()
    assert keys_table[0].split() == ["id", "kind", "name", "prefix", "owner", "org", "last_used_at", "revoked_at"]
    assert all(line == line.rstrip() for line in keys_table)


def test_orgs_create_says_the_admin_must_have_signed_in_once(run_cli, conn):
    code, out, err = run_cli("orgs", "create", "--name", "Beta", "--slug", "beta", "--admin-email",
                             "cto@beta.test", ok=False)
    assert code == 1 and out == ""
    assert err == ("upshift-platform: No user with email cto@beta.test: they must sign in once first (Supabase "
                   "Auth creates the user then), or pass --create-user to create them now\n")
    assert conn.execute("select count(*) as n from public.orgs").fetchone()["n"] == 0  # nothing created
    code, _, err = run_cli("members", "add", "--org", "beta", "--email", "x@beta.test", ok=False)
    assert err == "upshift-platform: No org beta.\n"
    org = js(run_cli, "orgs", "create", "--name", "Beta", "--slug", "beta", "--admin-email", "cto@beta.test",
             "--create-user")
    assert org["slug"] == "beta"
    code, _, err = run_cli("members", "add", "--org", "beta", "--email", "dev@beta.test", ok=False)
    assert "they must sign in once first" in err and "--create-user" in err


def _http_export(client, admin: str, fmt: str) -> str:
    from tests.conftest import bearer, make_token

    resp = client.get(f"/api/audit-logs/export?org_id=acme&format={fmt}", headers=bearer(make_token(admin)))
    assert resp.status_code == 200
    return resp.get_data(as_text=True)


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_cli_export_matches_the_http_export(run_cli, world, client, tmp_path, fmt):
    """Same columns, order, row order and time format: the files are byte for byte the same."""
    from tests.conftest import bearer

    admin = world.user("a@acme.test")
    org = world.org("acme", plan="team", admin=admin, balance=50)
    ci = world.key(admin, kind="service", org=org)["secret"]
    events = [{"event_type": "upgrade", "resource_type": "package", "resource_id": f"pkg-{i}", "org_id": "acme",
               "metadata": {"from_version": "1.0.0", "to_version": "2.0.0", "outcome": "success", "n": i},
               "timestamp": "2026-11-25T08:13:58.336Z"} for i in range(5)]
    resp = client.post("/audit-events", json={"events": events},
                       headers={"Content-Type": "application/json", "User-Agent": "node", **bearer(ci)})
    assert resp.status_code == 201, resp.get_json()
    http = _http_export(client, admin, fmt)  # records its own audit_export event first
    out = tmp_path / f"audit.{fmt}"
    run_cli("audit", "export", "--org", "acme", "--format", fmt, "--output", str(out))
    cli_text = out.read_bytes().decode()
    assert cli_text == http
    if fmt == "csv":
        from upshift_platform.handlers.audit import COLUMNS

        assert cli_text.splitlines()[0] == ",".join(COLUMNS)
        assert re.search(r",2026-11-25T08:13:58\.336\+00:00,", cli_text)  # client_timestamp, as in JSON
    else:
        rows = [json.loads(line) for line in cli_text.splitlines()]
        assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
        assert all("T" in r["created_at"] for r in rows)
    # To stdout as well, the same bytes.
    assert run_cli("audit", "export", "--org", "acme", "--format", fmt)[1].replace("\r\n", "\n") == \
        http.replace("\r\n", "\n")


def _counts(conn, org):
    return conn.execute("select count(*) as n, count(*) filter (where event_type = 'audit_purged') as purged"
                        " from public.audit_logs where scope_id = %s", (org,)).fetchone()


def test_audit_purge_is_a_dry_run_unless_yes(run_cli, world, conn):
    admin = world.user("a@acme.test")
    org = world.org("acme", plan="pro", admin=admin, balance=5)  # pro: 90 days
    fresh = world.org("fresh", plan="team", admin=admin)
    age_audit_logs(conn, org, 100)
    before, fresh_before = _counts(conn, org), _counts(conn, fresh)
    assert before["n"] >= 1

    dry = js(run_cli, "audit", "purge")
    assert dry["dry_run"] is True and dry["deleted"] == before["n"] and dry["scopes"] == 1
    (log,) = dry["logs"]
    assert log["log"] == "acme" and log["kind"] == "org" and log["retention_days"] == 90
    assert log["events"] == before["n"] and log["through_seq"] == before["n"]
    assert _counts(conn, org) == before and _counts(conn, fresh) == fresh_before  # nothing deleted, nothing recorded
    _, out, err = run_cli("audit", "purge")
    assert out.split("\n")[1].split()[:2] == ["acme", "org"]
    assert f"dry run: would delete {before['n']} event(s) in 1 log(s)" in err and "--yes" in err
    assert _counts(conn, org) == before

    done = js(run_cli, "audit", "purge", "--yes")
    assert done["dry_run"] is False and done["deleted"] == dry["deleted"] and done["logs"][0]["events"] == log["events"]
    after = _counts(conn, org)
    assert after["n"] == 1 and after["purged"] == 1  # the chain goes on from its checkpoint with audit_purged
    event = conn.execute("select metadata from public.audit_logs where scope_id = %s and event_type = 'audit_purged'",
                         (org,)).fetchone()["metadata"]
    assert event["deleted"] == before["n"] and event["retention_days"] == 90
    assert js(run_cli, "audit", "verify", "--org", "acme")["ok"] is True
    assert _counts(conn, fresh) == fresh_before
    again = js(run_cli, "audit", "purge", "--yes")
    assert again["deleted"] == 0 and again["logs"] == []


@pytest.mark.parametrize("when", ["2030-01-01", "2099-12-31T23:59:59Z"])
@pytest.mark.parametrize("yes", [[], ["--yes"]], ids=["dry-run", "yes"])
def test_audit_purge_refuses_a_date_past_the_retention_cutoff(run_cli, world, conn, when, yes):
    """--as-of in the future would delete events that are still inside their retention."""
    org = world.org("acme", plan="pro", admin=world.user("a@acme.test"), balance=5)
    before = _counts(conn, org)
    code, out, err = run_cli("audit", "purge", "--as-of", when, *yes, ok=False)
    assert code == 1 and out == ""
    assert err.startswith(f"upshift-platform: --as-of {when} is in the future") and len(err.splitlines()) == 1
    assert _counts(conn, org) == before


def test_audit_purge_as_of_a_past_date(run_cli, world, conn):
    org = world.org("acme", plan="pro", admin=world.user("a@acme.test"), balance=5)
    age_audit_logs(conn, org, 100)
    # As of 30 days ago the rows were 70 days old: inside the 90 days, nothing to purge.
    from datetime import UTC, datetime, timedelta

    past = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    assert js(run_cli, "audit", "purge", "--as-of", past)["deleted"] == 0
    with pytest.raises(SystemExit) as exc:
        run_cli("audit", "purge", "--as-of", "yesterday", ok=False)
    assert exc.value.code == 2


def test_usage_rollup(run_cli, conn):
    """`usage rollup` runs the job once: nothing to fold in a new database, W moves to a few seconds ago."""
    result = js(run_cli, "usage", "rollup")
    assert result["skipped"] is False and result["folded"] == 0
    assert conn.execute("select closed_through > now() - interval '1 minute' as ok from private.usage_state"
                        ).fetchone()["ok"]
    code, _, err = run_cli("usage", "rollup", "--every", "0", ok=False)
    assert code == 1 and "--every" in err
