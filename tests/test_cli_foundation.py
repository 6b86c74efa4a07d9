"""The operator CLI's database commands and the production server, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

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
