"""An outsider attacks the database the way PostgREST exposes it: RPCs and tables, as each kind of caller.

On Supabase anything ``anon`` / ``authenticated`` can execute in ``public`` is one
``POST /rest/v1/rpc/<name>`` away, with the caller's JWT claims as ``request.jwt.claims``. Each
attack below runs in a *committed* transaction (so a success would stick), must be refused, and
must leave every balance, membership, key, invite, ledger row and audit row as it was, with the
ledger invariant intact. ``tests/test_access_matrix.py`` already covers "each role x each RPC
with ordinary arguments"; these are the tricky arguments, forged claims, lookalikes, mixed
batches and multi-step abuses.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.conftest import acting_as

# Insufficient privilege, the RPCs' own PT4xx answers, and data exceptions (class 22: PostgREST's 400).
REFUSED = {"42501", "PT400", "PT401", "PT402", "PT403", "PT404", "PT409", "PT413"}


# --- the world and what must not change -----------------------------------------------------------


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Everything an attack could change that matters (not last_used_at, which a real use touches)."""
    def rows(sql: str) -> list[Any]:
        return [tuple(r.values()) for r in conn.execute(sql).fetchall()]

    return {
        "orgs": rows("select id, slug, name, plan from public.orgs order by id"),
        "profiles": rows("select id, plan, default_org_id from public.profiles order by id"),
        "accounts": rows("select id, balance, stripe_customer_id from public.credit_accounts order by id"),
        "members": rows("select org_id, user_id, role from public.org_members order by org_id, user_id"),
        "keys": rows("select id, org_id, kind, user_id, revoked_at, expires_at from public.api_keys order by id"),
        "invites": rows("select id, org_id, email, role, accepted_at, revoked_at from public.org_invites order by id"),
        "ledger": rows("select id, amount, balance_after from public.credit_transactions order by id"),
        "audit": rows("select scope_id, seq, encode(hash, 'hex') from public.audit_logs order by scope_id, seq"),
        "checkpoints": rows("select scope_id, seq from public.audit_checkpoints order by scope_id"),
        "ingest_keys": rows("select actor_id, idempotency_key from public.audit_ingest_keys order by 1, 2"),
        "stripe": rows("select id from public.stripe_events order by id"),
        "payments": rows("select payment_key, credits_reversed from public.stripe_payments order by 1"),
        "subscriptions": rows("select id, status from public.subscriptions order by id"),
    }


def assert_ledger_ok(conn: psycopg.Connection[Any]) -> None:
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []


def assert_chains_verify(conn: psycopg.Connection[Any]) -> None:
    scopes = conn.execute("select distinct scope_id from public.audit_logs").fetchall()
    for s in scopes:
        out = conn.execute("select private.verify_audit_scope(%s) as r", (s["scope_id"],)).fetchone()["r"]
        assert out["ok"], out


def claims(user: str | None = None, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"role": "authenticated", "aud": "authenticated", **extra}
    if user:
        c["sub"] = user
    return c


@pytest.fixture
def w(world, conn):
    """acme (team, 100 credits): admin, member, viewer, CI key, a pending invite; rival (team, 50): its admin
    and CI key; a signed-in user of no org; the victim an invite is meant for (no account yet)."""
    admin, member, viewer = world.user("admin@acme.test"), world.user("member@acme.test"), world.user("viewer@acme.test")
    rival_admin, nobody = world.user("boss@rival.test"), world.user("nobody@example.test")
    acme = world.org("acme", plan="team", balance=100, admin=admin)
    world.member(acme, member, "member")
    world.member(acme, viewer, "viewer")
    rival = world.org("rival", plan="team", balance=50, admin=rival_admin)
    acme_ci = world.key(admin, kind="service", org=acme)
    rival_ci = world.key(rival_admin, kind="service", org=rival)
    with acting_as(conn, "authenticated", claims(admin), commit=True) as cur:
        invite = cur.execute("select public.create_invite('acme', 'victim@acme.test', 'admin') as r").fetchone()["r"]
        cur.execute("select public.record_audit_events(%s::jsonb, 'acme')",
                    (json.dumps([{"event_type": "deploy", "resource_type": "app"}]),))
    with acting_as(conn, "authenticated", claims(member), commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme')")
    personas = {
        "anon": ("anon", {"role": "anon"}),
        "nobody": ("authenticated", claims(nobody)),
        "viewer": ("authenticated", claims(viewer)),
        "member": ("authenticated", claims(member)),
        "rival_admin": ("authenticated", claims(rival_admin)),
        "rival_ci": ("authenticated", claims(None, upshift={"key_id": rival_ci["id"], "kind": "service",
                                                             "org_id": rival})),
        "acme_ci": ("authenticated", claims(None, upshift={"key_id": acme_ci["id"], "kind": "service",
                                                            "org_id": acme})),
    }
    return {"acme": acme, "rival": rival, "admin": admin, "member": member, "viewer": viewer,
            "rival_admin": rival_admin, "nobody": nobody, "acme_ci": acme_ci, "rival_ci": rival_ci,
            "invite": invite, "personas": personas}


def attack(conn, w, persona: str, sql: str, params: dict[str, Any] | None = None) -> psycopg.Error | Any:
    """Run ``sql`` as ``persona`` in a committed transaction; return the error, or the rows on success."""
    role, c = w["personas"][persona]
    try:
        with acting_as(conn, role, c, commit=True) as cur:
            cur.execute(sql, params or {})
            return cur.fetchall() if cur.description else cur.rowcount
    except psycopg.Error as exc:
        return exc


def refused(result: Any, *states: str) -> None:
    assert isinstance(result, psycopg.Error), f"the attack succeeded: {result!r}"
    state = result.diag.sqlstate or ""
    allowed = set(states) or REFUSED
    assert state in allowed or (not states and state.startswith("22")), (state, result.diag.message_primary)


def params_for(w) -> dict[str, Any]:
    return {"acme": w["acme"], "rival": w["rival"], "admin": w["admin"], "member": w["member"],
            "viewer": w["viewer"], "nobody": w["nobody"], "rival_admin": w["rival_admin"],
            "acme_ci": w["acme_ci"]["id"], "invite_id": w["invite"]["id"], "token": w["invite"]["token"],
            "acme_upper": w["acme"].upper(), "acme_padded": f"  {w['acme']}\t"}


# --- spending credits that are not yours ----------------------------------------------------------

SPEND_ATTACKS = [
    # (persona, sql)
    pytest.param("anon", "select public.debit_credits(1, 'explain', 'acme')", id="anon_spends_acme"),
    pytest.param("nobody", "select public.debit_credits(1, 'explain', %(acme)s)", id="nobody_spends_acme_by_id"),
    pytest.param("nobody", "select public.debit_credits(1, 'explain', %(acme_upper)s)",
                 id="nobody_spends_acme_by_upper_case_id"),
    pytest.param("nobody", "select public.debit_credits(1, 'explain', %(acme_padded)s)",
                 id="nobody_spends_acme_by_padded_id"),
    pytest.param("nobody", "select public.debit_credits(1, 'explain', ' ACME ')", id="nobody_spends_acme_by_odd_slug"),
    pytest.param("viewer", "select public.debit_credits(1, 'explain', 'acme')", id="viewer_spends"),
    pytest.param("viewer", "select public.debit_credits(1, 'explain', 'acme', 'k-1', '{\"role\": \"admin\"}')",
                 id="viewer_spends_with_metadata"),
    pytest.param("rival_admin", "select public.debit_credits(1, 'explain', 'acme')", id="rival_admin_spends_acme"),
    pytest.param("rival_ci", "select public.debit_credits(1, 'explain', 'acme')", id="rival_ci_spends_acme"),
    pytest.param("rival_ci", "select public.debit_credits(1, 'explain', %(acme)s)", id="rival_ci_spends_acme_by_id"),
    pytest.param("member", "select public.debit_credits(0, 'explain', 'acme')", id="member_spends_zero"),
    pytest.param("member", "select public.debit_credits(-100, 'explain', 'acme')", id="member_spends_negative"),
    pytest.param("member", "select public.debit_credits(101, 'explain', 'acme')", id="member_overspends"),
    pytest.param("member", "select public.debit_credits(9223372036854775807, 'explain', 'acme')",
                 id="member_spends_bigint_max"),
    pytest.param("member", "select public.debit_credits(-9223372036854775808, 'explain', 'acme')",
                 id="member_spends_bigint_min"),
    pytest.param("member", "select public.debit_credits(1, 'explain', 'acme', repeat('k', 201))",
                 id="member_overlong_idempotency_key"),
    pytest.param("member", "select public.debit_credits(1, 'explain', 'acme', null, '[1, 2]')",
                 id="member_array_metadata"),
    pytest.param("member", "select public.debit_credits(1, 'explain', 'acme', null, 'null'::jsonb)",
                 id="member_json_null_metadata"),
    pytest.param("member", "select public.debit_credits(1, 'explain', 'acme', null,"
                           " jsonb_build_object('pad', repeat('x', 5000)))", id="member_oversized_metadata"),
    pytest.param("member", "select public.debit_credits(1, 'refund', 'acme', null, '{}'::jsonb)"
                           " from generate_series(1, 200)", id="member_drains_past_zero_in_one_statement"),
    pytest.param("acme_ci", "select public.debit_credits(1, 'explain', 'rival')", id="acme_ci_spends_rival"),
    pytest.param("member", "select public.grant_credits(1000, 'admin_grant', 'acme', null, 'gift')",
                 id="member_grants_itself"),
]


@pytest.mark.parametrize(("persona", "sql"), SPEND_ATTACKS)
def test_spending_what_is_not_yours_is_refused(conn, w, persona, sql):
    before = snapshot(conn)
    refused(attack(conn, w, persona, sql, params_for(w)))
    assert snapshot(conn) == before
    assert_ledger_ok(conn)


@pytest.mark.parametrize("forged", [
    pytest.param({"upshift": {"org_id": "{acme}"}}, id="user_jwt_with_key_org_claim"),
    pytest.param({"upshift": {"key_id": "{acme_ci}", "kind": "service", "org_id": "{acme}"}},
                 id="user_jwt_with_acme_service_key_claims"),
    pytest.param({"app_metadata": {"org_id": "{acme}", "role": "admin"}}, id="user_jwt_with_app_metadata"),
    pytest.param({"request.jwt.claim.sub": "{admin}"}, id="nested_claim_name"),
])
def test_extra_claims_in_a_users_jwt_do_not_reach_another_orgs_pool(conn, w, forged):
    """A signed-in user cannot mint claims, but Supabase custom claims / hooks might add some: none of them may
    turn a user into acme's service key or bind them to acme. The spend falls back to their own balance."""
    text = json.dumps(forged)
    for name, value in params_for(w).items():
        text = text.replace("{" + name + "}", str(value))
    c = {**claims(w["nobody"]), **json.loads(text)}
    before = snapshot(conn)
    try:
        with acting_as(conn, "authenticated", c, commit=True) as cur:
            out = cur.execute("select public.debit_credits(1, 'explain', public.resolve_org(null) ->> 'id') as r"
                              ).fetchone()["r"]
        assert out["source"] == "user" and out["org_id"] is None  # their own 10 credits, nobody else's
    except psycopg.Error as exc:
        refused(exc)
    after = snapshot(conn)
    assert after["orgs"] == before["orgs"]
    assert_ledger_ok(conn)


def test_a_service_key_claim_with_a_sub_is_the_user_not_the_key(conn, w):
    """PostgREST would pass both: with a sub present the key claims must count for nothing."""
    c = claims(w["nobody"], upshift={"key_id": w["acme_ci"]["id"], "kind": "service", "org_id": w["acme"]})
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as exc, acting_as(conn, "authenticated", c, commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme')")
    refused(exc.value, "PT403")
    assert snapshot(conn) == before


def test_an_idempotency_key_of_another_member_replays_nothing_for_you(conn, w, world):
    """Replaying someone else's key must neither return their transaction nor charge a second time."""
    second = world.user("second@acme.test")
    world.member(w["acme"], second, "member")
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        first = cur.execute("select public.debit_credits(3, 'fix', 'acme', 'ci-run-7') as r").fetchone()["r"]
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as exc, acting_as(conn, "authenticated", claims(second), commit=True) as cur:
        cur.execute("select public.debit_credits(3, 'fix', 'acme', 'ci-run-7')")
    refused(exc.value, "PT409")
    assert first["transaction_id"] not in (exc.value.diag.message_detail or "")
    assert snapshot(conn) == before


def test_a_removed_member_cannot_replay_an_old_idempotency_key(conn, w):
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme', 'before-removal')")
    with acting_as(conn, "authenticated", claims(w["admin"]), commit=True) as cur:
        cur.execute("select public.remove_member('acme', %s)", (w["member"],))
    before = snapshot(conn)
    for sql in ("select public.debit_credits(1, 'explain', 'acme', 'before-removal')",
                "select public.debit_credits(1, 'explain', 'acme', 'after-removal')",
                "select public.debit_credits(1, 'explain', %(acme)s)"):
        refused(attack(conn, w, "member", sql, params_for(w)), "PT403")
    assert snapshot(conn) == before
    assert_ledger_ok(conn)


# --- other orgs' data -------------------------------------------------------------------------------

READ_ATTACKS = [
    pytest.param(p, sql, id=f"{p}-{name}")
    for name, sql in [
        ("org_row", "select * from public.orgs where id = %(acme)s or slug = 'acme'"),
        ("members", "select * from public.org_members where org_id = %(acme)s"),
        ("admin_profile", "select * from public.profiles where id = %(admin)s"),
        ("ledger", "select * from public.credit_transactions where account_id = %(acme)s"),
        ("account", "select * from public.credit_accounts where id = %(acme)s"),
        ("keys", "select id, name from public.api_keys where org_id = %(acme)s or user_id = %(admin)s"),
        ("invites", "select id, email from public.org_invites where org_id = %(acme)s"),
        ("audit", "select * from public.audit_logs where scope_id = %(acme)s or org_id = %(acme)s"),
        ("admin_personal_audit", "select * from public.audit_logs where scope_id = %(admin)s"),
        ("subscriptions", "select * from public.subscriptions where account_id = %(acme)s"),
    ]
    for p in ("nobody", "rival_admin", "rival_ci", "acme_ci")
]


@pytest.mark.parametrize(("persona", "sql"), READ_ATTACKS)
def test_reading_another_orgs_rows_returns_nothing(conn, w, persona, sql):
    result = attack(conn, w, persona, sql, params_for(w))
    if isinstance(result, psycopg.Error):
        refused(result, "42501")
    else:
        assert result == [], result


@pytest.mark.parametrize(("persona", "sql"), [
    pytest.param("member", "select id from public.org_invites where org_id = %(acme)s", id="member_reads_invites"),
    pytest.param("viewer", "select id from public.org_invites where org_id = %(acme)s", id="viewer_reads_invites"),
    pytest.param("member", "select id from public.api_keys where kind = 'service'", id="member_lists_ci_keys"),
    pytest.param("viewer", "select id from public.api_keys where kind = 'service'", id="viewer_lists_ci_keys"),
    pytest.param("member", "select id from public.audit_logs where org_id = %(acme)s", id="member_reads_org_audit"),
    pytest.param("member", "select id from public.credit_transactions where account_id = %(acme)s"
                           " and actor_user_id is distinct from %(member)s", id="member_reads_others_spends"),
    pytest.param("member", "select scope_id from public.audit_checkpoints", id="member_reads_checkpoints"),
    pytest.param("member", "select id from public.subscriptions", id="member_reads_subscription"),
    pytest.param("viewer", "select id from public.profiles where id <> %(viewer)s", id="viewer_reads_profiles"),
])
def test_members_see_only_what_their_role_allows(conn, w, persona, sql):
    result = attack(conn, w, persona, sql, params_for(w))
    if isinstance(result, psycopg.Error):
        refused(result, "42501")
    else:
        assert result == [], result


@pytest.mark.parametrize("sql", [
    pytest.param("select key_hash from public.api_keys", id="api_key_hashes"),
    pytest.param("select token_hash from public.org_invites", id="invite_token_hashes"),
    pytest.param("select * from public.api_keys", id="api_keys_star"),
    pytest.param("select * from public.stripe_events", id="stripe_events"),
    pytest.param("select * from public.stripe_payments", id="stripe_payments"),
    pytest.param("select * from public.audit_ingest_keys", id="audit_ingest_keys"),
    pytest.param("select * from private.audit_permits", id="purge_permits"),
    pytest.param("select private.verify_audit_scope(%(acme)s)", id="private_verify_any_scope"),
    pytest.param("select private.org_json(%(acme)s, 'admin')", id="private_org_json"),
    pytest.param("select private.find_org('acme')", id="private_find_org"),
    pytest.param("select * from auth.users", id="auth_users"),
])
def test_secret_columns_and_private_objects_are_closed_even_to_acmes_admin(conn, w, sql):
    w["personas"]["acme_admin"] = ("authenticated", claims(w["admin"]))
    refused(attack(conn, w, "acme_admin", sql, params_for(w)), "42501")


def test_helper_functions_policies_use_reveal_nothing_about_other_orgs(conn, w):
    """has_role_on_org / can_read_org_audit / user_org_ids are executable for RLS: they answer about the caller."""
    out = attack(conn, w, "rival_admin",
                 "select private.has_role_on_org(%(acme)s, array['admin','member','viewer']) as a,"
                 " private.can_read_org_audit(%(acme)s) as b,"
                 " (select count(*) from private.user_org_ids() u where u = %(acme)s) as c", params_for(w))
    assert out == [{"a": False, "b": False, "c": 0}]


# --- changing another org / escalating ---------------------------------------------------------------

CHANGE_ATTACKS = [
    pytest.param("member", "select public.set_member_role('acme', %(member)s, 'admin')", id="member_promotes_self"),
    pytest.param("viewer", "select public.set_member_role('acme', %(viewer)s, 'member')", id="viewer_promotes_self"),
    pytest.param("member", "select public.remove_member('acme', %(admin)s)", id="member_removes_admin"),
    pytest.param("member", "select public.update_org('acme', 'Pwned', 'pwned')", id="member_renames_org"),
    pytest.param("member", "select public.create_invite('acme', 'sock@evil.test', 'admin')", id="member_invites"),
    pytest.param("member", "select public.create_api_key('ci', 'service', 'acme')", id="member_mints_ci_key"),
    pytest.param("member", "select public.revoke_api_key(%(acme_ci)s)", id="member_revokes_ci_key"),
    pytest.param("member", "select public.revoke_invite('acme', %(invite_id)s)", id="member_revokes_invite"),
    pytest.param("viewer", "select public.list_invites('acme')", id="viewer_lists_invite_tokens"),
    pytest.param("rival_admin", "select public.set_member_role('acme', %(rival_admin)s, 'admin')",
                 id="rival_admin_joins_as_admin"),
    pytest.param("rival_admin", "select public.set_member_role(%(acme)s, %(admin)s, 'viewer')",
                 id="rival_admin_demotes_acme_admin"),
    pytest.param("rival_admin", "select public.remove_member('acme', %(admin)s)", id="rival_admin_removes_admin"),
    pytest.param("rival_admin", "select public.create_invite('acme', 'boss@rival.test', 'admin')",
                 id="rival_admin_invites_self"),
    pytest.param("rival_admin", "select public.create_api_key('ci', 'service', 'acme')", id="rival_admin_ci_key"),
    pytest.param("rival_admin", "select public.create_api_key('p', 'personal', 'acme')",
                 id="rival_admin_key_bound_to_acme"),
    pytest.param("rival_admin", "select public.revoke_api_key(%(acme_ci)s)", id="rival_admin_revokes_acme_ci"),
    pytest.param("rival_admin", "select public.revoke_invite('acme', %(invite_id)s)", id="rival_admin_revokes_invite"),
    pytest.param("rival_admin", "select public.revoke_invite('rival', %(invite_id)s)",
                 id="rival_admin_revokes_acme_invite_via_own_org"),
    pytest.param("rival_admin", "select public.update_org(%(acme)s, null, 'rival-owned')", id="rival_admin_renames"),
    pytest.param("rival_admin", "select public.set_default_org('acme')", id="rival_admin_defaults_to_acme"),
    pytest.param("rival_admin", "select public.list_members('acme')", id="rival_admin_lists_members"),
    pytest.param("rival_admin", "select public.get_org(%(acme)s)", id="rival_admin_gets_org"),
    pytest.param("rival_admin", "select public.billing_status('acme')", id="rival_admin_reads_balance"),
    pytest.param("rival_admin", "select public.begin_checkout('credits', 'acme')", id="rival_admin_checkout_acme"),
    pytest.param("rival_admin", "select public.begin_checkout('team', 'acme')", id="rival_admin_team_for_acme"),
    pytest.param("member", "select public.begin_checkout('credits', 'acme')", id="member_buys_for_org"),
    pytest.param("rival_ci", "select public.list_members('acme')", id="rival_ci_lists_members"),
    pytest.param("acme_ci", "select public.set_member_role('acme', %(member)s, 'admin')", id="ci_promotes"),
    pytest.param("acme_ci", "select public.remove_member('acme', %(admin)s)", id="ci_removes_admin"),
    pytest.param("acme_ci", "select public.remove_member('acme', null)", id="ci_removes_null_user"),
    pytest.param("acme_ci", "select public.create_api_key('ci2', 'service', 'acme')", id="ci_mints_ci_key"),
    pytest.param("acme_ci", "select public.create_invite('acme', 'x@evil.test', 'admin')", id="ci_invites"),
    pytest.param("acme_ci", "select public.update_org('acme', 'Pwned')", id="ci_renames"),
    pytest.param("acme_ci", "select public.begin_checkout('credits', 'acme')", id="ci_buys"),
    pytest.param("acme_ci", "select public.accept_invite(%(token)s)", id="ci_accepts_invite"),
    pytest.param("acme_ci", "select public.revoke_api_key(%(acme_ci)s)", id="ci_revokes_itself"),
    pytest.param("nobody", "select public.accept_invite(%(token)s)", id="nobody_accepts_victims_invite"),
    pytest.param("rival_admin", "select public.accept_invite(%(token)s)", id="rival_admin_accepts_victims_invite"),
    pytest.param("member", "select public.accept_invite(%(token)s)", id="member_upgrades_with_admin_invite"),
    pytest.param("nobody", "select public.accept_invite(' ' || %(token)s || E'\\n')", id="padded_token"),
    pytest.param("nobody", "select public.accept_invite(upper(%(token)s))", id="upper_case_token"),
    pytest.param("nobody", "select public.accept_invite(left(%(token)s, 20))", id="token_prefix"),
    pytest.param("anon", "select public.accept_invite(%(token)s)", id="anon_accepts"),
]


@pytest.mark.parametrize(("persona", "sql"), CHANGE_ATTACKS)
def test_changing_or_reading_what_is_not_yours_is_refused(conn, w, persona, sql):
    before = snapshot(conn)
    refused(attack(conn, w, persona, sql, params_for(w)))
    assert snapshot(conn) == before
    assert_ledger_ok(conn)


@pytest.mark.parametrize("email", [
    pytest.param("victim@acme.test ", id="trailing_space"),
    pytest.param("victim@acme.t\u0435st", id="cyrillic_e_homoglyph"),
    pytest.param("victim@acme.test.evil.test", id="suffix_domain"),
    pytest.param("victim+x@acme.test", id="plus_alias"),
    pytest.param("victim@acme.test\u200b", id="zero_width_space"),
    pytest.param("xvictim@acme.test", id="prefix_local_part"),
])
def test_an_invite_cannot_be_accepted_by_a_lookalike_email(conn, w, world, email):
    sock = world.user(email)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as exc, acting_as(conn, "authenticated", claims(sock), commit=True) as cur:
        cur.execute("select public.accept_invite(%s)", (w["invite"]["token"],))
    refused(exc.value, "PT403")
    assert snapshot(conn) == before


def test_an_accepted_invite_cannot_be_reused_by_a_second_account_with_the_same_email(conn, w, world):
    victim = world.user("victim@acme.test")
    with acting_as(conn, "authenticated", claims(victim), commit=True) as cur:
        cur.execute("select public.accept_invite(%s)", (w["invite"]["token"],))
    # The victim changes their email; a new account registers the invited address and tries the same token.
    conn.execute("update auth.users set email = 'moved@acme.test' where id = %s", (victim,))
    sock = world.user("victim@acme.test")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as exc, acting_as(conn, "authenticated", claims(sock), commit=True) as cur:
        cur.execute("select public.accept_invite(%s)", (w["invite"]["token"],))
    refused(exc.value, "PT409")
    assert snapshot(conn) == before


def test_leaving_and_rejoining_does_not_restore_an_old_role(conn, w, world):
    """A demoted admin who leaves and comes back through an old pending invite must not regain admin."""
    admin2 = world.user("admin2@acme.test")
    world.member(w["acme"], admin2, "admin")
    with acting_as(conn, "authenticated", claims(admin2), commit=True) as cur:
        token = cur.execute("select public.create_invite('acme', 'alt@evil.test', 'admin') as r"
                            ).fetchone()["r"]["token"]
    with acting_as(conn, "authenticated", claims(w["admin"]), commit=True) as cur:
        cur.execute("select public.set_member_role('acme', %s, 'viewer')", (admin2,))
    alt = world.user("alt@evil.test")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as exc, acting_as(conn, "authenticated", claims(alt), commit=True) as cur:
        cur.execute("select public.accept_invite(%s)", (token,))
    refused(exc.value, "PT409")
    assert snapshot(conn) == before


# --- the audit log ------------------------------------------------------------------------------------

AUDIT_ATTACKS = [
    pytest.param("rival_admin", "select public.record_audit_events(%(ev)s::jsonb, 'acme')", id="rival_writes_acme"),
    pytest.param("rival_ci", "select public.record_audit_events(%(ev)s::jsonb, %(acme)s)", id="rival_ci_writes_acme"),
    pytest.param("viewer", "select public.record_audit_events(%(ev)s::jsonb, 'acme')", id="viewer_writes"),
    pytest.param("nobody", "select public.record_audit_events(%(mixed)s::jsonb)", id="nobody_mixed_batch"),
    pytest.param("member", "select public.record_audit_events(%(mixed_rival)s::jsonb, 'acme')",
                 id="member_mixed_batch_rival_last"),
    pytest.param("member", "select public.record_audit_events(%(mixed_reserved)s::jsonb, 'acme')",
                 id="member_mixed_batch_reserved_last"),
    pytest.param("member", "select public.record_audit_events(%(bad_ts_last)s::jsonb, 'acme')",
                 id="member_mixed_batch_bad_timestamp_last"),
    pytest.param("member", "select public.record_audit_events(%(ev501)s::jsonb, 'acme')", id="member_501_events"),
    pytest.param("member", "select public.record_audit_events('{\"event_type\": \"deploy\"}'::jsonb, 'acme')",
                 id="member_object_not_array"),
    pytest.param("member", "select public.record_audit_events('[]'::jsonb, 'acme')", id="member_empty_batch"),
    pytest.param("member", "select public.record_audit_events('[null]'::jsonb, 'acme')", id="member_null_event"),
    pytest.param("member", "select public.record_audit_events('[[1]]'::jsonb, 'acme')", id="member_array_event"),
    pytest.param("acme_ci", "select public.record_audit_events(%(ev)s::jsonb, 'rival')", id="acme_ci_writes_rival"),
    pytest.param("member", "select public.record_audit_export('acme')", id="member_exports"),
    pytest.param("rival_admin", "select public.record_audit_export(%(acme)s)", id="rival_exports"),
    pytest.param("acme_ci", "select public.record_audit_export('acme')", id="ci_exports"),
    pytest.param("acme_ci", "select public.record_audit_export(null)", id="ci_exports_personal"),
    pytest.param("member", "select public.verify_audit_log('acme')", id="member_verifies"),
    pytest.param("rival_admin", "select public.verify_audit_log('acme')", id="rival_verifies"),
    pytest.param("rival_admin", "select public.audit_head('acme')", id="rival_reads_head"),
    pytest.param("acme_ci", "select public.audit_head('acme')", id="ci_reads_head"),
    pytest.param("rival_admin", "select public.verify_audit_checkpoint(1, repeat('0', 64), 'acme')",
                 id="rival_probes_checkpoint"),
    pytest.param("member", "select public.verify_audit_checkpoint(-1, repeat('0', 64), null)",
                 id="negative_checkpoint_seq"),
    pytest.param("member", "select public.verify_audit_checkpoint(1, repeat('g', 64), null)",
                 id="non_hex_checkpoint_hash"),
    pytest.param("member", "select public.verify_audit_checkpoint(1, repeat('0', 66), null)",
                 id="long_checkpoint_hash"),
    pytest.param("member", "select public.verify_audit_checkpoint(1, repeat('0', 63) || E'\\n', null)",
                 id="checkpoint_hash_with_newline"),
    pytest.param("member", "select public.verify_audit_checkpoint(null, repeat('0', 64), null)",
                 id="null_checkpoint_seq"),
    pytest.param("member", "update public.audit_logs set metadata = '{}' where org_id is null", id="member_updates"),
    pytest.param("member", "delete from public.audit_logs where scope_id = %(member)s", id="member_deletes_own"),
    pytest.param("member", "insert into public.audit_checkpoints (scope_id, seq, hash) values (%(member)s, 99,"
                           " '\\x00')", id="member_forges_retention_checkpoint"),
]


def _audit_params(w) -> dict[str, Any]:
    deploy = {"event_type": "deploy", "resource_type": "app"}
    return {**params_for(w),
            "ev": json.dumps([deploy]),
            "ev501": json.dumps([deploy] * 501),
            "mixed": json.dumps([deploy, {**deploy, "org_id": "acme"}]),
            "mixed_rival": json.dumps([deploy, deploy, {**deploy, "org_id": "rival"}]),
            "mixed_reserved": json.dumps([deploy, {"event_type": "credits_granted", "resource_type": "x"}]),
            "bad_ts_last": json.dumps([deploy, {**deploy, "timestamp": "2026-02-30T25:61:00Z"}])}


@pytest.mark.parametrize(("persona", "sql"), AUDIT_ATTACKS)
def test_audit_attacks_are_refused_and_write_nothing(conn, w, persona, sql):
    before = snapshot(conn)
    refused(attack(conn, w, persona, sql, _audit_params(w)))
    assert snapshot(conn) == before
    assert_chains_verify(conn)


@pytest.mark.parametrize("event_type", [
    pytest.param("Credit_debit", id="upper_case"),
    pytest.param("\u0441redit_debit", id="cyrillic_c"),
    pytest.param("credit_debit ", id="trailing_space"),
    pytest.param("credit_debit.", id="trailing_dot"),
    pytest.param("member_removed", id="exact_platform_type"),
    pytest.param("org_deleted", id="org_family"),
    pytest.param("webhook.stripe", id="webhook_family"),
    pytest.param("audit_chain_reset", id="audit_family"),
    pytest.param("platform.notice", id="platform_family"),
    pytest.param("upshift_security_notice", id="upshift_family"),
    pytest.param("stripe_refund", id="stripe_family"),
    pytest.param("credit\u0000debit", id="nul_inside"),
])
def test_lookalike_platform_event_types_are_refused(conn, w, event_type):
    before = snapshot(conn)
    refused(attack(conn, w, "member", "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
                   {"ev": json.dumps([{"event_type": event_type, "resource_type": "x"}])}))
    assert snapshot(conn) == before


@pytest.mark.parametrize("event_type", [
    "members_removed", "membership_revoked", "organization_deleted", "orgs_updated", "creditsgranted",
    "credit2_debit", "webhooks_replayed", "invites_accepted", "apikey_revoked", "plans_changed",
])
def test_event_types_in_the_documented_reserved_families_are_refused(conn, w, event_type):
    before = snapshot(conn)
    refused(attack(conn, w, "member", "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
                   {"ev": json.dumps([{"event_type": event_type, "resource_type": "user"}])}), "PT400")
    assert snapshot(conn) == before


@pytest.mark.parametrize(("fmt", "filters"), [
    pytest.param("csv", {"note": "x" * 200_000}, id="200kb_filters"),
    pytest.param("ndjson\nmember_removed admin@acme.test", {}, id="forged_format_text"),
    pytest.param("csv", {"event_type": ["credits_granted"], "granted_by": "operator", "amount": 1_000_000},
                 id="filters_that_read_like_a_grant"),
    pytest.param("xml", [1, 2, 3], id="filters_not_an_object"),
])
def test_a_viewer_cannot_write_arbitrary_content_through_record_audit_export(conn, w, fmt, filters):
    before = snapshot(conn)
    refused(attack(conn, w, "viewer", "select public.record_audit_export('acme', %(fmt)s, %(filters)s::jsonb)",
                   {"fmt": fmt, "filters": json.dumps(filters)}), "PT400", "PT413")
    assert snapshot(conn)["audit"] == before["audit"]


def test_a_batch_that_fails_halfway_records_nothing_and_consumes_no_idempotency_key(conn, w):
    events = [{"event_type": "deploy", "resource_type": "app"}] * 3 + [{"event_type": "fix", "resource_type": "p",
                                                                        "metadata": {"applied": "yes"}}]
    before = snapshot(conn)
    refused(attack(conn, w, "member", "select public.record_audit_events(%(ev)s::jsonb, 'acme', 'batch-1')",
                   {"ev": json.dumps(events)}), "PT400")
    assert snapshot(conn) == before
    # The same key then works for a valid batch: the failed attempt did not burn it.
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        out = cur.execute("select public.record_audit_events(%s::jsonb, 'acme', 'batch-1') as r",
                          (json.dumps(events[:3]),)).fetchone()["r"]
    assert out["replayed"] is False and out["count"] == 3


def test_an_audit_idempotency_key_is_per_actor(conn, w):
    """Another actor reusing my key neither sees my result nor blocks me, and cannot inject into my scope."""
    body = json.dumps([{"event_type": "deploy", "resource_type": "app"}])
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        mine = cur.execute("select public.record_audit_events(%s::jsonb, 'acme', 'k') as r", (body,)).fetchone()["r"]
    with acting_as(conn, "authenticated", claims(w["rival_admin"]), commit=True) as cur:
        theirs = cur.execute("select public.record_audit_events(%s::jsonb, 'rival', 'k') as r", (body,)
                             ).fetchone()["r"]
    assert theirs["replayed"] is False
    assert theirs["events"][0]["scope_id"] == w["rival"] != mine["events"][0]["scope_id"]
    assert_chains_verify(conn)
