"""Who may do what: every table and every RPC x every kind of caller, against a written table.

Actors: anon, a signed-in non-member, acme's member, viewer and admin, the admin of another org,
and another org's service key. Each check runs in its own rolled-back transaction, acting as the
caller exactly as PostgREST would (role + request.jwt.claims). "Denied" means 42501, PT403 or
PT404, or (for writes RLS filters) zero rows affected; any other error fails the test.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import acting_as

ACTORS = ["anon", "nonmember", "member", "viewer", "admin", "other_admin", "other_ci"]
DENIED_STATES = {"42501", "PT403", "PT404"}


@pytest.fixture
def world_state(world, conn):
    admin, member, viewer = world.user("admin@acme.test"), world.user("member@acme.test"), world.user("v@acme.test")
    bystander, nonmember, other_admin = world.user("by@acme.test"), world.user("no@x.test"), world.user("oa@o.test")
    acme = world.org("acme", plan="team", balance=100, admin=admin)
    for u, r in ((member, "member"), (viewer, "viewer"), (bystander, "member")):
        world.member(acme, u, r)
    other = world.org("other", plan="team", balance=100, admin=other_admin)
    acme_ci = world.key(admin, kind="service", org=acme)
    other_ci = world.key(other_admin, kind="service", org=other)
    with acting_as(conn, "authenticated", {"sub": admin, "role": "authenticated"}, commit=True) as cur:
        invite = cur.execute("select public.create_invite('acme', 'new@acme.test', 'member') as r").fetchone()["r"]
    with acting_as(conn, "authenticated", {"sub": member, "role": "authenticated"}, commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme')")
    conn.execute("select public.admin_set_slices('acme', 4)")  # a sliced pool: its slices are rows to read
    conn.execute("insert into public.audit_checkpoints (scope_id, seq, hash) values (%s, 0, '\\x00')", (acme,))
    conn.execute("insert into public.subscriptions (id, account_id, tier, status, last_event_at)"
                 " values ('sub_acme', %s, 'team', 'active', now())", (acme,))
    ids = {"anon": None, "nonmember": nonmember, "member": member, "viewer": viewer, "admin": admin,
           "other_admin": other_admin, "other_ci": None}
    claims = {a: {"sub": u, "role": "authenticated", "aud": "authenticated"} for a, u in ids.items() if u}
    claims["anon"] = {"role": "anon"}
    claims["other_ci"] = {"role": "authenticated", "upshift": {"key_id": other_ci["id"], "kind": "service",
                                                               "org_id": other}}
    return {"acme": acme, "member": member, "viewer": viewer, "bystander": bystander, "claims": claims,
            "acme_ci": acme_ci["id"], "invite": invite["id"]}


def attempt(conn, actor, state, sql, params) -> bool:
    role = "anon" if actor == "anon" else "authenticated"
    try:
        with acting_as(conn, role, state["claims"][actor]) as cur:
            cur.execute(sql, params)
            if cur.description is not None:
                rows = cur.fetchall()
                if sql.lstrip().lower().startswith("select count"):
                    return rows[0]["n"] > 0
                return True
            return cur.rowcount > 0
    except psycopg.Error as exc:
        assert exc.diag.sqlstate in DENIED_STATES, f"{actor}: {sql}: {exc.diag.sqlstate} {exc.diag.message_primary}"
        return False


# --- tables ----------------------------------------------------------------------------------

NOBODY: set[str] = set()
USERS_AND_CI = {"read": {"nonmember", "member", "viewer", "admin", "other_admin", "other_ci"}}
TABLES = {
    # table: (read sql, {op: allowed actors})
    "orgs": ("select count(*) as n from public.orgs where id = %(acme)s",
             {"read": {"member", "viewer", "admin"}}),
    "org_members": ("select count(*) as n from public.org_members where org_id = %(acme)s",
                    {"read": {"member", "viewer", "admin"}}),
    "profiles": ("select count(*) as n from public.profiles where id = %(member)s",
                 {"read": {"member"}}),
    "api_keys": ("select count(*) as n from public.api_keys where id = %(acme_ci)s", {"read": {"admin"}}),
    "org_invites": ("select count(*) as n from public.org_invites where id = %(invite)s", {"read": {"admin"}}),
    "credit_transactions": ("select count(*) as n from public.credit_transactions where account_id = %(acme)s",
                            {"read": {"member", "viewer", "admin"}}),
    "audit_logs": ("select count(*) as n from public.audit_logs where org_id = %(acme)s",
                   {"read": {"viewer", "admin"}}),
    "audit_checkpoints": ("select count(*) as n from public.audit_checkpoints where scope_id = %(acme)s",
                          {"read": {"viewer", "admin"}}),
    "subscriptions": ("select count(*) as n from public.subscriptions where account_id = %(acme)s",
                      {"read": {"viewer", "admin"}}),
    "audit_ingest_keys": ("select count(*) as n from public.audit_ingest_keys", {}),
    "stripe_events": ("select count(*) as n from public.stripe_events", {}),
    "stripe_payments": ("select count(*) as n from public.stripe_payments", {}),
    "credit_accounts": ("select count(*) as n from public.credit_accounts where id = %(acme)s",
                        {"read": {"member", "viewer", "admin"}}),
    "credit_prices": ("select count(*) as n from public.credit_prices", USERS_AND_CI),
    "credit_slices": ("select count(*) as n from public.credit_slices where account_id = %(acme)s",
                      {"read": {"member", "viewer", "admin"}}),
}
WRITES = {
    "orgs": {"insert": "insert into public.orgs (slug, name) values ('x-new', 'X')",
             "update": "update public.orgs set name = name where id = %(acme)s",
             "delete": "delete from public.orgs where id = %(acme)s"},
    "org_members": {"insert": "insert into public.org_members (org_id, user_id, role) values (%(acme)s, %(member)s, 'admin')",
                    "update": "update public.org_members set role = 'admin' where org_id = %(acme)s",
                    "delete": "delete from public.org_members where org_id = %(acme)s"},
    "profiles": {"insert": "insert into public.profiles (id) values (gen_random_uuid())",
                 "update": "update public.profiles set default_org_id = %(acme)s where id = %(member)s",
                 "delete": "delete from public.profiles where id = %(member)s"},
    "api_keys": {"insert": "insert into public.api_keys (user_id, kind, name, key_hash, key_prefix)"
                           " values (%(member)s, 'personal', 'x', repeat('a', 64), 'upk_')",
                 "update": "update public.api_keys set revoked_at = now() where id = %(acme_ci)s",
                 "delete": "delete from public.api_keys where id = %(acme_ci)s"},
    "org_invites": {"insert": "insert into public.org_invites (org_id, email, role, token_hash) values (%(acme)s, 'a@b.c', 'admin', 'h')",
                    "update": "update public.org_invites set role = 'admin' where id = %(invite)s",
                    "delete": "delete from public.org_invites where id = %(invite)s"},
    "credit_transactions": {"insert": "insert into public.credit_transactions (account_id, amount, balance_after, reason)"
                                      " values (%(acme)s, 1000, 1000, 'x')",
                            "update": "update public.credit_transactions set amount = 1 where account_id = %(acme)s",
                            "delete": "delete from public.credit_transactions where account_id = %(acme)s"},
    "audit_logs": {"insert": "insert into public.audit_logs (scope_id, seq, actor_kind, event_type, resource_type,"
                             " created_at, prev_hash, hash) values (%(acme)s, 999, 'system', 'x', 'y', now(), '\\x00', '\\x00')",
                   "update": "update public.audit_logs set metadata = '{}' where org_id = %(acme)s",
                   "delete": "delete from public.audit_logs where org_id = %(acme)s"},
    "audit_checkpoints": {"insert": "insert into public.audit_checkpoints (scope_id, seq, hash) values (gen_random_uuid(), 1, '\\x00')",
                          "update": "update public.audit_checkpoints set seq = 5 where scope_id = %(acme)s",
                          "delete": "delete from public.audit_checkpoints where scope_id = %(acme)s"},
    "subscriptions": {"insert": "insert into public.subscriptions (id, account_id, tier, status, last_event_at)"
                                " values ('sub_x', %(acme)s, 'team', 'active', now())",
                      "update": "update public.subscriptions set status = 'canceled' where account_id = %(acme)s",
                      "delete": "delete from public.subscriptions where account_id = %(acme)s"},
    "audit_ingest_keys": {"insert": "insert into public.audit_ingest_keys values (gen_random_uuid(), 'k', 'h', '{}')",
                          "update": "update public.audit_ingest_keys set result = '{}'",
                          "delete": "delete from public.audit_ingest_keys"},
    "stripe_events": {"insert": "insert into public.stripe_events (id, type, created, payload) values ('evt', 't', now(), '{}')",
                      "update": "update public.stripe_events set outcome = 'x'",
                      "delete": "delete from public.stripe_events"},
    "credit_accounts": {"insert": "insert into public.credit_accounts (id) values (gen_random_uuid())",
                        "update": "update public.credit_accounts set balance = balance + 1000 where id = %(acme)s",
                        "delete": "delete from public.credit_accounts where id = %(acme)s"},
    "credit_slices": {"insert": "insert into public.credit_slices (account_id, slice, balance) values (%(acme)s, 9, 1000)",
                      "update": "update public.credit_slices set balance = balance + 1000 where account_id = %(acme)s",
                      "delete": "delete from public.credit_slices where account_id = %(acme)s"},
    "credit_prices": {"insert": "insert into public.credit_prices (action, credits) values ('free', 1)",
                      "update": "update public.credit_prices set credits = 1",
                      "delete": "delete from public.credit_prices"},
    "stripe_payments": {"insert": "insert into public.stripe_payments (payment_key) values ('pi_x')",
                        "update": "update public.stripe_payments set credits_reversed = 0",
                        "delete": "delete from public.stripe_payments"},
}
TABLE_CASES = [
    pytest.param(table, op, id=f"{table}-{op}") for table in TABLES for op in ("read", "insert", "update", "delete")
]


def test_matrix_covers_every_table(conn):
    tables = {r["relname"] for r in conn.execute(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'public' and c.relkind in ('r', 'p')")}
    assert tables == set(TABLES), "a table without a row in the access matrix"


@pytest.mark.parametrize(("table", "op"), TABLE_CASES)
def test_table_access(conn, world_state, table, op):
    sql = TABLES[table][0] if op == "read" else WRITES[table][op]
    expected = TABLES[table][1].get(op, NOBODY)
    got = {actor for actor in ACTORS if attempt(conn, actor, world_state, sql, world_state)}
    assert got == expected


# --- RPCs ------------------------------------------------------------------------------------

USERS = {"nonmember", "member", "viewer", "admin", "other_admin"}
RPCS = {
    "debit_credits": ("select public.debit_credits(1, 'explain', 'acme')", {"member", "admin"}),
    "get_org": ("select public.get_org('acme')", {"member", "viewer", "admin"}),
    "list_members": ("select public.list_members('acme')", {"member", "viewer", "admin"}),
    "update_org": ("select public.update_org('acme', 'Acme Two')", {"admin"}),
    "set_member_role": ("select public.set_member_role('acme', %(bystander)s, 'viewer')", {"admin"}),
    "remove_member": ("select public.remove_member('acme', %(bystander)s)", {"admin"}),
    "create_invite": ("select public.create_invite('acme', 'z@acme.test', 'member')", {"admin"}),
    "list_invites": ("select public.list_invites('acme')", {"admin"}),
    "revoke_invite": ("select public.revoke_invite('acme', %(invite)s)", {"admin"}),
    "create_api_key": ("select public.create_api_key('ci', 'service', 'acme')", {"admin"}),
    "revoke_api_key": ("select public.revoke_api_key(%(acme_ci)s)", {"admin"}),
    "resolve_org": ("select public.resolve_org('acme')", {"member", "viewer", "admin"}),
    "billing_status": ("select public.billing_status('acme')", {"member", "viewer", "admin"}),
    "record_audit_events": ("select public.record_audit_events('[{\"event_type\": \"deploy\", \"resource_type\": \"app\"}]',"
                            " 'acme')", {"member", "admin"}),
    "audit_scope": ("select public.audit_scope('acme')", {"viewer", "admin"}),
    "verify_audit_log": ("select public.verify_audit_log('acme')", {"viewer", "admin"}),
    "list_credit_transactions": ("select public.list_credit_transactions('acme')", {"member", "viewer", "admin"}),
    "org_usage": ("select public.org_usage('acme')", {"member", "viewer", "admin"}),
    "audit_head": ("select public.audit_head('acme')", {"viewer", "admin"}),
    "verify_audit_checkpoint": ("select public.verify_audit_checkpoint(0, repeat('0', 64), 'acme')", {"viewer", "admin"}),
    "record_audit_export": ("select public.record_audit_export('acme')", {"viewer", "admin"}),
    "begin_checkout": ("select public.begin_checkout('credits', 'acme')", {"admin"}),
    "create_org": ("select public.create_org('New', 'brand-new')", USERS),
    "list_my_orgs": ("select public.list_my_orgs()", USERS | {"other_ci"}),
    "list_api_keys": ("select public.list_api_keys()", USERS | {"other_ci"}),
    "me": ("select public.me()", USERS | {"other_ci"}),
    "set_default_org": ("select public.set_default_org(null)", USERS),
    "accept_invite": ("select public.accept_invite('upi_nope')", set()),  # unknown token: 404 for everyone
}
BACKEND_ONLY = [
    "grant_credits", "authenticate_api_key", "ledger_mismatches", "set_stripe_customer", "stripe_apply_event",
    "purge_audit_logs", "admin_add_member", "admin_create_api_key", "admin_find_user", "admin_create_org",
    "admin_set_member_role", "admin_remove_member", "admin_revoke_api_key", "admin_set_org_plan",
    "admin_verify_audit_log", "admin_set_audit_retention", "admin_get_org", "admin_set_prices", "seal_audit_logs", "admin_set_slices",
    "api_key_claims",
    "usage_rollup",
]


def test_matrix_covers_every_rpc(conn):
    functions = {r["proname"] for r in conn.execute(
        "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public'")}
    assert functions == set(RPCS) | set(BACKEND_ONLY), "a public function without a row in the access matrix"


@pytest.mark.parametrize("rpc", list(RPCS))
def test_rpc_access(conn, world_state, rpc):
    sql, expected = RPCS[rpc]
    got = {actor for actor in ACTORS if attempt(conn, actor, world_state, sql, world_state)}
    assert got == expected


@pytest.mark.parametrize("rpc", BACKEND_ONLY)
def test_backend_rpcs_are_service_role_only(conn, rpc):
    row = conn.execute(
        "select array_agg(distinct r.rolname order by r.rolname) as roles from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace"
        " cross join (values ('anon'), ('authenticated'), ('service_role')) as r(rolname)"
        " where n.nspname = 'public' and p.proname = %s and has_function_privilege(r.rolname, p.oid, 'execute')",
        (rpc,)).fetchone()
    assert row["roles"] == ["service_role"]
