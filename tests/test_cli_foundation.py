"""The operator CLI's database commands and the production server, run as real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from upshift_platform.embedded import free_port

CLI = [sys.executable, "-m", "upshift_platform.cli"]


def run(args, env=None, check=True):
    env = {**os.environ, **(env or {})}
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=180)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} failed: {done.stderr}")
    return done


def test_db_up_reuse_migrate_down(tmp_path):
    data_dir = tmp_path / "pg"
    port = free_port()
    env = {"DATABASE_URL": ""}
    first = run(["db", "up", "--data-dir", str(data_dir), "--port", str(port)], env)
    url = first.stdout.strip().splitlines()[-1]
    assert url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        again = run(["db", "up", "--data-dir", str(data_dir)], env)
        assert again.stdout.strip().splitlines()[-1] == url  # reused, not restarted
        assert "0 migration(s) applied" in again.stderr
        migrated = run(["db", "migrate"], {"DATABASE_URL": url})
        assert "nothing to apply" in migrated.stderr
        with psycopg.connect(url) as c:
            n = c.execute("select count(*) from supabase_migrations.schema_migrations").fetchone()
        assert n and n[0] >= 1
        assert run(["db", "url", "--data-dir", str(data_dir)], env).stdout.strip() == url
        reset = run(["db", "reset", "--data-dir", str(data_dir)], env)
        assert reset.stdout.strip().splitlines()[-1] == url
    finally:
        down = run(["db", "down", "--data-dir", str(data_dir)], env)
    assert "stopped" in down.stderr
    assert run(["db", "down", "--data-dir", str(data_dir)], env).stderr.strip().endswith("not running")
    from upshift_platform import embedded

    embedded.server(data_dir).destroy()  # as root the data went to /var/tmp/upshift-platform: clean it


def test_db_reset_refuses_remote_target():
    done = run(["db", "reset"], {"DATABASE_URL": "postgresql://u@db.example.com:5432/postgres"}, check=False)
    assert done.returncode == 1
    assert "refusing to reset a non-local database" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_db_migrate_reports_unreachable_database_in_one_line():
    done = run(["db", "migrate"], {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"},
               check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("upshift-platform: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_token_mints_a_verifiable_jwt(db_url):
    import jwt

    missing = run(["token", "--email", "dev@example.test"], {"DATABASE_URL": db_url}, check=False)
    assert missing.returncode == 1
    done = run(["token", "--email", "dev@example.test", "--create"],
               {"DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": "s3cret-for-this-test-0123456789abcdef"})
    token = done.stdout.strip().splitlines()[-1]
    claims = jwt.decode(token, "s3cret-for-this-test-0123456789abcdef", algorithms=["HS256"],
                        audience="authenticated")
    with psycopg.connect(db_url) as c:
        row = c.execute("select id::text from auth.users where email = 'dev@example.test'").fetchone()
    assert row and claims["sub"] == row[0]


def test_serve_runs_gunicorn_and_answers_health(db_url):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "SUPABASE_JWT_SECRET": "x" * 40}
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    body = json.loads(resp.read())
                    server = resp.headers.get("Server", "")
                break
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok", "database": "ok"}
        assert "gunicorn" in server.lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.parametrize("command", [["--help"], ["db", "--help"], ["db", "up", "--help"],
                                     ["serve", "--help"], ["token", "--help"]])
def test_help(command):
    assert run(command).stdout.startswith("usage: upshift-platform")


# --- one tool (issue 17) and crash recovery (issue 18), as real processes ----------------------

# Ports and folders of the private servers below: a range of their own, so that parallel runs of
# other suites on this machine never collide with them.
PORTS = range(18600, 18700)
TMP_PREFIX = "wt-ops-"


def private_port() -> int:
    import random
    import socket

    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in the test range")


def private_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir="/tmp"))
    path.chmod(0o755)  # as root the server runs as nobody, who must reach the data directory
    return path


def _audit_events(db_url: str, n: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        user = c.execute("insert into auth.users (email) values ('a@acme.test') returning id").fetchone()
        org = c.execute("select (public.admin_create_org('Acme', 'acme', 'team', %s)) ->> 'id'", (user[0],)).fetchone()
        c.execute("select private.audit_append(%s::uuid, %s::uuid, 'deploy', 'app', 'r' || g, '{}'::jsonb)"
                  " from generate_series(1, %s) g", (org[0], org[0], n))


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_export_into_a_closed_pipe_ends_quietly(db_url, fmt):
    """`audit export ... | head -3`: three lines, no traceback, status 141 like any tool killed by SIGPIPE."""
    _audit_events(db_url, 3000)  # far more than a pipe buffer holds
    env = {**os.environ, "DATABASE_URL": db_url}
    producer = subprocess.Popen([*CLI, "audit", "export", "--org", "acme", "--format", fmt], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-3"], stdin=producer.stdout, stdout=subprocess.PIPE)
    assert producer.stdout is not None
    producer.stdout.close()  # only head reads it now
    lines, _ = head.communicate(timeout=120)
    _, err = producer.communicate(timeout=120)
    assert len(lines.splitlines()) == 3
    assert producer.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err


@pytest.mark.parametrize("argv", [
    ["orgs", "list"], ["members", "list", "--org", "acme"], ["audit", "export", "--org", "acme"],
    ["audit", "verify", "--org", "acme"], ["credits", "balance", "--org", "acme"], ["keys", "list"],
    ["prices", "list"], ["db", "url"], ["db", "migrate"], ["token", "--email", "a@acme.test"], ["demo"],
    ["credits", "grant", "--org", "acme", "--amount", "5"], ["db", "reset"],
], ids=lambda a: "-".join(a[:2]))
def test_commands_never_create_a_cluster_for_a_mistyped_data_dir(argv):
    base = private_dir()
    typo = base / "postgress"
    try:
        done = run([*argv, "--data-dir", str(typo)], {"DATABASE_URL": "", "SUPABASE_JWT_SECRET": "x" * 40},
                   check=False)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"upshift-platform: no database cluster in {typo} (mistyped --data-dir or UPSHIFT_DATA_DIR? "
            "`upshift-platform db up` creates one there)")
        assert done.stdout == ""
        assert not typo.exists()
        from upshift_platform import embedded

        assert not embedded.server(typo).exists()  # nor in the root fallback folder
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_second_server_on_a_busy_port_stops_at_once(db_url, tmp_path, command):
    """A second `make run` while one serves: one line saying the port is taken, no keys printed, no retries."""
    import socket

    port = private_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        started = time.monotonic()
        done = run([command, "--port", str(port), "--workers", "1"],
                   {"DATABASE_URL": db_url, "UPSHIFT_PROJECT_DIR": str(tmp_path), "SUPABASE_JWT_SECRET": "x" * 40},
                   check=False)
        elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert done.stdout == ""  # no paste block, no keys
    assert done.stderr == (f"upshift-platform: port {port} on 127.0.0.1 is already in use (another "
                           "`upshift-platform run` or `serve`?): stop it, or pass --port\n")
    assert elapsed < 15
    assert not (tmp_path / ".data" / "demo-keys.json").exists()  # nothing was started or minted


# --- `db up` after a crash --------------------------------------------------------------------


@pytest.fixture(scope="module")
def crashable():
    """A private embedded server (real durability settings) that these tests SIGKILL; never the shared one."""
    from upshift_platform import embedded

    base = private_dir()
    data_dir, port = base / "pg", private_port()
    env = {"DATABASE_URL": ""}
    url = run(["db", "up", "--data-dir", str(data_dir), "--port", str(port)], env).stdout.strip().splitlines()[-1]
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("create table public.kept (x integer)")
        c.execute("insert into public.kept values (42)")
    try:
        yield data_dir, url, env
    finally:
        srv = embedded.server(data_dir)
        try:
            srv.stop()
        finally:
            if srv.running_port() is None:  # only a dead server's processes are left over
                for pid in srv.leftover_processes():
                    os.kill(pid, signal.SIGKILL)
            srv.destroy()
            shutil.rmtree(base, ignore_errors=True)


def _kill_postmaster_while_busy(data_dir: Path, url: str, busy_s: float) -> tuple[int, threading.Thread]:
    """A backend spins in a query (it outlives its postmaster until the query ends); then SIGKILL the postmaster."""
    def spin() -> None:
        try:
            with psycopg.connect(url, autocommit=True, application_name="spin") as c:
                c.execute("do $$ declare t timestamptz := clock_timestamp(); begin"
                          f" while clock_timestamp() < t + interval '{busy_s} s' loop end loop; end $$")
        except psycopg.Error:
            pass

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    with psycopg.connect(url, autocommit=True) as c:  # until the query runs (an idle backend exits at once)
        deadline = time.monotonic() + 30
        while not c.execute("select 1 from pg_stat_activity where application_name = 'spin' and state = 'active'"
                            " and query like 'do %'").fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    from upshift_platform import embedded

    srv = embedded.server(data_dir)
    pid = int((srv.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while srv.running_port() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.leftover_processes(), "the busy backend should outlive its postmaster"
    return pid, thread


def test_db_up_after_sigkill_waits_for_the_old_server_and_recovers(crashable):
    data_dir, url, env = crashable
    pid, thread = _kill_postmaster_while_busy(data_dir, url, busy_s=6)
    started = time.monotonic()
    done = run(["db", "up", "--data-dir", str(data_dir), "--json"], env)
    elapsed = time.monotonic() - started
    thread.join(30)
    report = json.loads(done.stdout)
    assert report["url"] == url and report["migrations_applied"] == []
    rec = report["recovery"]
    assert rec["stale_postmaster_pid"] == pid and rec["leftover_pids"] and rec["terminated_pids"] == []
    assert rec["waited_s"] > 0 and rec["crash_recovery"] is True and rec["redo_from"] and rec["redo_to"]
    assert any("automatic recovery in progress" in line for line in rec["log"])
    assert f"its postmaster (pid {pid}) is gone" in done.stderr
    assert "waiting up to 30 s for 1 process(es) of the old server to exit" in done.stderr
    assert "crash recovery: PostgreSQL replayed the write-ahead log from" in done.stderr
    assert "connection refused" not in done.stderr.lower()
    assert elapsed < 60
    with psycopg.connect(url) as c:
        assert c.execute("select x from public.kept").fetchone() == (42,)
    # Again: a clean start now, nothing to report.
    assert json.loads(run(["db", "up", "--data-dir", str(data_dir), "--json"], env).stdout)["recovery"] is None


def test_db_up_terminates_an_old_server_process_that_does_not_exit(crashable):
    data_dir, url, env = crashable
    _pid, thread = _kill_postmaster_while_busy(data_dir, url, busy_s=120)
    started = time.monotonic()
    done = run(["db", "up", "--data-dir", str(data_dir), "--json"], {**env, "UPSHIFT_PG_STALE_WAIT": "1"})
    assert time.monotonic() - started < 60
    rec = json.loads(done.stdout)["recovery"]
    assert rec["terminated_pids"] == rec["leftover_pids"] != []
    assert "still running after 1 s: terminating pids" in done.stderr
    thread.join(30)
    with psycopg.connect(url) as c:
        assert c.execute("select x from public.kept").fetchone() == (42,)


def test_a_read_command_after_a_crash_recovers_instead_of_connection_refused(crashable):
    data_dir, url, env = crashable
    _pid, thread = _kill_postmaster_while_busy(data_dir, url, busy_s=2)
    refused = run(["db", "url", "--data-dir", str(data_dir)], env, check=False)  # never starts anything
    assert refused.returncode == 1 and "not shut down cleanly" in refused.stderr
    done = run(["orgs", "list", "--data-dir", str(data_dir), "--json"], env)
    assert json.loads(done.stdout) == []
    assert "crash recovery: PostgreSQL" in done.stderr and "connection refused" not in done.stderr.lower()
    thread.join(30)


def test_a_read_command_waits_for_a_server_that_is_still_recovering(crashable):
    """A server that is up but not yet accepting connections (57P03) is waited for and named, not refused.

    A standby without hot_standby stays in recovery until it is promoted: a recovery we control.
    """
    from upshift_platform import embedded

    data_dir, url, env = crashable
    srv = embedded.server(data_dir)
    srv.port = int(url.rsplit(":", 1)[1].split("/")[0])
    srv.stop()
    (srv.data_dir / "standby.signal").touch()
    started = srv._run([srv.binaries.tool("pg_ctl"), "start", "-D", str(srv.data_dir), "-W",
                        "-l", str(srv.data_dir / "server.log"),
                        "-o", f"-p {srv.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                              "-c hot_standby=off"])
    assert started.returncode == 0, started.stderr
    proc = subprocess.Popen([*CLI, "orgs", "list", "--data-dir", str(data_dir), "--json"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        assert proc.poll() is None  # still waiting for the server, not failed
        promoted = srv._run([srv.binaries.tool("pg_ctl"), "promote", "-D", str(srv.data_dir), "-w"])
        assert promoted.returncode == 0, promoted.stderr
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out) == []
    assert f"PostgreSQL at 127.0.0.1:{srv.port} is not ready yet (the database system is not" in err
    assert "connection refused" not in err.lower()


def test_audit_tail_follow_json_streams_one_object_per_line(db_url):
    _audit_events(db_url, 3)
    env = {**os.environ, "DATABASE_URL": db_url}
    proc = subprocess.Popen([*CLI, "audit", "tail", "--org", "acme", "-n", "2", "--follow", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(2)]
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("select private.audit_append(id, id, 'deploy', 'app', 'later', '{}'::jsonb)"
                      " from public.orgs where slug = 'acme'")
        later = json.loads(proc.stdout.readline())  # within the 2 s poll
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert [r["seq"] for r in first] == [first[0]["seq"], first[0]["seq"] + 1]
    assert later["resource_id"] == "later" and later["seq"] == first[1]["seq"] + 1
    assert "T" in later["created_at"]
