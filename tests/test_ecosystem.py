"""Fit with the Supabase CLI and Cloud Run functions: seed, config, deployable targets."""

from __future__ import annotations

import re
import tomllib

import functions_framework
import pytest
from functions_framework import _function_registry

from upshift_platform.paths import project_root

ROOT = project_root()


def test_seed_applies_twice_and_creates_the_demo_org(conn):
    sql = (ROOT / "supabase" / "seed.sql").read_text()
    conn.execute(sql)
    conn.execute(sql)
    org = conn.execute("select o.plan, a.balance as credit_balance from public.orgs o join public.credit_accounts a on a.id = o.id where o.slug = 'acme'").fetchone()
    assert org == {"plan": "team", "credit_balance": 500}
    roles = {r["email"]: r["role"] for r in conn.execute(
        "select p.email, m.role from public.org_members m join public.profiles p on p.id = m.user_id")}
    assert roles == {"admin@acme.test": "admin", "member@acme.test": "member", "viewer@acme.test": "viewer"}
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []


def test_supabase_config_points_at_the_seed_and_exposes_only_public():
    config = tomllib.loads((ROOT / "supabase" / "config.toml").read_text())
    assert config["db"]["seed"]["sql_paths"] == ["./seed.sql"]
    assert config["api"]["schemas"] == ["public"]


def test_migration_names_follow_supabase_cli_format():
    names = sorted(p.name for p in (ROOT / "supabase" / "migrations").glob("*.sql"))
    assert names and all(re.fullmatch(r"\d{14}_[a-z0-9_]+\.sql", n) for n in names)


def test_requirements_txt_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(lines) == sorted(d.split(";")[0].split("  #")[0].strip() for d in deps)


TARGETS = ["billing", "stripe_webhook", "audit", "orgs", "jobs"]


@pytest.fixture
def deploy(db_url, monkeypatch):
    """``deploy(target, source)``: functions-framework's app for one target, as Cloud Run functions would
    build it: from the environment alone, with no platform made yet (closed afterwards)."""
    import upshift_platform.app as app_module
    from upshift_platform.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("SUPABASE_JWT_SECRET", "x" * 40)
    get_settings.cache_clear()
    monkeypatch.setattr(app_module, "_platform", None)
    try:
        yield lambda target, source: functions_framework.create_app(target, str(ROOT / source))
    finally:
        if app_module._platform is not None:
            app_module._platform.close()
        get_settings.cache_clear()


@pytest.mark.parametrize("target", TARGETS)
def test_each_function_deploys_alone(target, deploy):
    """functions-framework loads each target from the root main.py, as Cloud Run functions would."""
    client = deploy(target, "main.py").test_client()
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["database"] == "ok"
    other = {"billing": "/api/orgs", "orgs": "/credits/consume", "audit": "/billing/status",
             "stripe_webhook": "/api/me", "jobs": "/api/me"}[target]
    assert client.get(other).status_code in (404, 405)  # not this function's path


def test_functions_main_registers_each_target_under_its_own_name():
    """``functions_framework.http`` records a target by ``__name__``: each must be the name it is deployed by."""
    import functions.main

    for target in TARGETS:
        fn = getattr(functions.main, target)
        assert (fn.__name__, _function_registry.REGISTRY_MAP.get(target)) == (target, "http")
        assert fn.__doc__, target


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_of_functions_main_answers_health(target, deploy):
    health = deploy(target, "functions/main.py").test_client().get("/health")
    assert health.status_code == 200 and health.get_json()["database"] == "ok"
