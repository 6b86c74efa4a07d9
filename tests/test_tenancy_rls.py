"""Row-level security on the tenancy tables, acting as each API role."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import cases, functions_where

TABLES = ["public.orgs", "public.org_members", "public.profiles"]


@pytest.fixture
def two_orgs(world):
    alice, bob, mallory = world.user("alice@example.test"), world.user("bob@example.test"), world.user()
    acme = world.org("acme", admin=alice)
    world.member(acme, bob, "member")
    other = world.org("other", admin=mallory)
    return {"alice": alice, "bob": bob, "mallory": mallory, "acme": acme, "other": other}


def test_rls_enabled_on_every_public_table(conn):
    rows = conn.execute(
        "select c.relname, c.relrowsecurity from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'public' and c.relkind in ('r', 'p')").fetchall()
    assert rows, "no tables"
    assert all(r["relrowsecurity"] for r in rows), [r["relname"] for r in rows if not r["relrowsecurity"]]


@pytest.mark.parametrize("table", TABLES)
def test_anon_reads_nothing(as_role, table, two_orgs):
    with as_role("anon") as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute(f"select * from {table}")


def test_member_sees_only_own_orgs_and_their_members(as_role, two_orgs):
    with as_role("authenticated", two_orgs["bob"]) as cur:
        orgs = {r["slug"] for r in cur.execute("select slug from public.orgs")}
        members = {(str(r["org_id"]), str(r["user_id"])) for r in cur.execute("select * from public.org_members")}
        profiles = [str(r["id"]) for r in cur.execute("select id from public.profiles")]
    assert orgs == {"acme"}
    assert members == {(two_orgs["acme"], two_orgs["alice"]), (two_orgs["acme"], two_orgs["bob"])}
    assert profiles == [two_orgs["bob"]]


def test_signed_in_non_member_sees_no_org(as_role, world, two_orgs):
    stranger = world.user()
    with as_role("authenticated", stranger) as cur:
        assert cur.execute("select * from public.orgs").fetchall() == []
        assert cur.execute("select * from public.org_members").fetchall() == []


def test_only_admin_renames_org(as_role, conn, two_orgs):
    """Renames go through update_org (admin, audited); nobody may UPDATE orgs directly."""
    for who in ("bob", "mallory", "alice"):
        with as_role("authenticated", two_orgs[who]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("update public.orgs set name = 'Hacked' where id = %s", (two_orgs["acme"],))
    with as_role("authenticated", two_orgs["bob"]) as cur, pytest.raises(psycopg.Error) as exc:
        cur.execute("select public.update_org(%s, 'Hacked')", (two_orgs["acme"],))
    assert exc.value.diag.sqlstate == "PT403"
    with as_role("authenticated", two_orgs["alice"]) as cur:
        assert cur.execute("select public.update_org(%s, 'Acme Inc') as r",
                           (two_orgs["acme"],)).fetchone()["r"]["name"] == "Acme Inc"


@pytest.mark.parametrize(
    ("who", "sql"),
    cases({
        "bob": {
            "member_raises_own_role": "update public.org_members set role = 'admin' where user_id = %(bob)s",
            "user_sets_own_balance": "update public.credit_accounts set balance = 1000 where id = %(bob)s",
            "user_sets_own_plan": "update public.profiles set plan = 'pro' where id = %(bob)s",
            "join_other_org": "insert into public.org_members (org_id, user_id, role)"
                              " values (%(other)s, %(bob)s, 'admin')",
            "insert_org": "insert into public.orgs (slug, name) values ('x1', 'x')",
        },
        "alice": {
            "admin_sets_org_balance": "update public.credit_accounts set balance = 1000000 where id = %(acme)s",
            "admin_sets_org_plan": "update public.orgs set plan = 'team' where id = %(acme)s",
            "delete_members": "delete from public.org_members where org_id = %(acme)s",
            "delete_org": "delete from public.orgs where id = %(acme)s",
        },
    }),
)
def test_forbidden_writes_fail_with_42501(as_role, two_orgs, who, sql):
    with as_role("authenticated", two_orgs[who]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute(sql, two_orgs)


@pytest.mark.parametrize("role", ["anon", "service_role"])
def test_no_api_role_writes_balances_directly(as_role, two_orgs, role):
    with as_role(role) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("update public.credit_accounts set balance = 5 where id = %s", (two_orgs["acme"],))


def test_default_org_must_be_one_of_mine(as_role, two_orgs):
    with as_role("authenticated", two_orgs["bob"]) as cur:
        me = cur.execute("select public.set_default_org(%s) as r", (two_orgs["acme"],)).fetchone()["r"]
        assert str(me["default_org"]["id"]) == two_orgs["acme"]
    with as_role("authenticated", two_orgs["bob"]) as cur, pytest.raises(psycopg.Error) as exc:
        cur.execute("select public.set_default_org(%s)", (two_orgs["other"],))
    assert exc.value.diag.sqlstate == "PT403"
    with as_role("authenticated", two_orgs["bob"]) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("update public.profiles set default_org_id = %s where id = %s",
                    (two_orgs["acme"], two_orgs["bob"]))


def test_service_role_reads_everything(as_role, two_orgs):
    with as_role("service_role") as cur:
        assert cur.execute("select count(*) as n from public.orgs").fetchone()["n"] == 2


def test_security_definer_functions_pin_search_path(conn):
    rows = conn.execute(
        "select p.oid::regprocedure::text as fn, p.proconfig from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname in ('public', 'private') and p.prosecdef").fetchall()
    assert rows
    bad = [r["fn"] for r in rows if not r["proconfig"] or 'search_path=""' not in r["proconfig"]]
    assert bad == []


def test_no_function_executable_by_public(conn):
    assert functions_where(conn, "has_function_privilege('anon', p.oid, 'execute')") == []
