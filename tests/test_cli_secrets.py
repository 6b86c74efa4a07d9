"""No built-in secrets: `serve` needs real ones, `run` generates its own once and keeps them in .data/."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from upshift_platform import cli
from upshift_platform.embedded import free_port

CLI = [sys.executable, "-m", "upshift_platform.cli"]
SECRET_VARS = ("SUPABASE_JWT_SECRET", "SUPABASE_URL", "SUPABASE_JWKS_URL", "UPSHIFT_AUDIT_SIGNING_KEY")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    return {**env, **extra}


def cli_run(args, env):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


class Running:
    """`upshift-platform run` in its own process group, stopped on exit; ``err`` is its stderr."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*CLI, "run", "--port", str(self.port), "--workers", "1"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.err = ""

    def __enter__(self) -> Running:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited: {self.proc.communicate()[1]}")
            try:
                get(f"{self.base}/health")
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise AssertionError("run did not serve /health")

    def __exit__(self, *_exc: object) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.err = self.proc.communicate(timeout=20)[1]


def test_serve_refuses_to_start_without_a_jwt_secret(db_url, tmp_path):
    done = cli_run(["serve", "--port", str(free_port()), "--workers", "1"],
                   clean_env(DATABASE_URL=db_url, UPSHIFT_PROJECT_DIR=str(tmp_path)))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upshift-platform: serve needs SUPABASE_JWT_SECRET or SUPABASE_URL")
    assert not (tmp_path / ".data").exists()  # serve generates nothing


def test_serve_refuses_a_malformed_signing_key(db_url, tmp_path):
    done = cli_run(["serve", "--port", str(free_port()), "--workers", "1"],
                   clean_env(DATABASE_URL=db_url, UPSHIFT_PROJECT_DIR=str(tmp_path), SUPABASE_JWT_SECRET="x" * 40,
                             UPSHIFT_AUDIT_SIGNING_KEY="c2hvcnQ="))  # base64 of 5 bytes
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "UPSHIFT_AUDIT_SIGNING_KEY" in lines[0] and "32-byte" in lines[0]
    assert "c2hvcnQ=" not in done.stderr


def test_token_without_a_secret_says_where_it_looked(db_url, tmp_path):
    done = cli_run(["token", "--email", "dev@example.test", "--create"],
                   clean_env(DATABASE_URL=db_url, UPSHIFT_PROJECT_DIR=str(tmp_path)))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SUPABASE_JWT_SECRET" in lines[0] and str(tmp_path / ".data" / "jwt-secret") in lines[0]


def test_run_generates_its_secrets_once_and_token_matches_the_server(db_url, tmp_path):
    env = clean_env(DATABASE_URL=db_url, UPSHIFT_PROJECT_DIR=str(tmp_path))
    data = tmp_path / ".data"
    with Running(env) as first:
        assert mode(data) == 0o700
        for name in ("jwt-secret", "audit-signing-key"):
            assert mode(data / name) == 0o600, name
        secret = (data / "jwt-secret").read_text().strip()
        seed = base64.b64decode((data / "audit-signing-key").read_text().strip(), validate=True)
        assert len(secret) >= 32 and len(seed) == 32
        # token mints with the secret run uses (no environment variable: the file)
        done = cli_run(["token", "--email", "dev@example.test", "--create"], env)
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip().splitlines()[-1]
        assert jwt.decode(token, secret, algorithms=["HS256"], audience="authenticated")["email"] == "dev@example.test"
        status, me = get(f"{first.base}/api/me", token)
        assert status == 200
        # the server signs checkpoints with the generated key
        _, public = get(f"{first.base}/api/audit-logs/public-key")
        raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        assert base64.b64decode(public["public_key"]) == raw
        status, checkpoint = get(f"{first.base}/api/audit-logs/checkpoint", token)
        assert status == 200 and checkpoint["key_id"] == public["key_id"]
    assert "(generated now)" in first.err
    with Running(env) as second:  # the next run keeps both
        assert (data / "jwt-secret").read_text().strip() == secret
        assert base64.b64decode((data / "audit-signing-key").read_text()) == seed
        assert get(f"{second.base}/api/me", token)[1] == me
        assert get(f"{second.base}/api/audit-logs/public-key")[1] == public
    assert "generated now" not in second.err and str(data / "jwt-secret") in second.err


def test_run_keeps_secrets_given_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UPSHIFT_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("SUPABASE_JWT_SECRET", "from-the-environment-" + "x" * 20)
    monkeypatch.setenv("UPSHIFT_AUDIT_SIGNING_KEY", base64.b64encode(b"\x02" * 32).decode())
    monkeypatch.setenv("DATABASE_URL", "postgresql://unused")
    cli.local_env("postgresql://unused")
    assert os.environ["SUPABASE_JWT_SECRET"] == "from-the-environment-" + "x" * 20
    assert not (tmp_path / ".data").exists()
    monkeypatch.delenv("SUPABASE_JWT_SECRET")
    monkeypatch.setenv("SUPABASE_URL", "https://example.supabase.co")  # JWKS: no HS256 secret is made up
    cli.local_env("postgresql://unused")
    assert "SUPABASE_JWT_SECRET" not in os.environ and not (tmp_path / ".data").exists()


def test_a_loose_secret_file_is_tightened(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UPSHIFT_PROJECT_DIR", str(tmp_path))
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "jwt-secret").write_text("kept-secret-" + "y" * 30 + "\n")
    (tmp_path / ".data" / "jwt-secret").chmod(0o644)
    value, path, created = cli.local_secret("jwt-secret", lambda: pytest.fail("must not generate"))
    assert value == "kept-secret-" + "y" * 30 and not created and mode(path) == 0o600
    assert "now 0600" in capsys.readouterr().err
