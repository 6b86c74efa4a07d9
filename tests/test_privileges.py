"""What the API roles can reach, read from the catalog, against an allow-list kept in this repo.

On Supabase every table, function and sequence created in ``public`` starts with grants to anon,
authenticated and service_role (the project's default privileges, reproduced by
``sql/supabase_compat.sql``), and anything anon or authenticated can execute in an exposed schema
is callable over HTTP with the project's anon key. So the list of what each API role can reach is
the platform's attack surface. ``tests/api_privileges.txt`` is that list, reviewed by hand: a new
function, table or grant that is reachable by accident fails here.

Both of Supabase's privilege profiles are checked (``legacy``: everything granted by default;
``2026``: no automatic table grants). The migrations state every grant explicitly, so both must
give exactly the same list.

To see the current list after an intended change: ``python -m tests.test_privileges <database url>``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import RUN_ID, _with_db, functions_where
from upshift_platform.migrate import migrate

ALLOW_LIST = Path(__file__).with_name("api_privileges.txt")
API_ROLES = ("anon", "authenticated", "service_role")

# One line per (role, privilege, object). Column-level grants (where the role lacks the privilege on
# the whole table) list their columns. Only schemas the role can use count: an object in a schema
# without USAGE is unreachable whatever its own grants say.
REACHABLE_SQL = """
with roles(r) as (select unnest(%(roles)s::text[])),
schemas as (
  select n.oid, n.nspname from pg_namespace n
  where n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_(toast|temp)'
),
rels as (
  select c.oid, s.nspname, c.relname,
         case c.relkind when 'S' then 'sequence' when 'v' then 'view' when 'm' then 'view' else 'table' end as kind,
         case c.relkind when 'S' then array['usage', 'select', 'update']
              else array['select', 'insert', 'update', 'delete', 'truncate', 'references', 'trigger'] end as privs
  from pg_class c join schemas s on s.oid = c.relnamespace
  where c.relkind in ('r', 'p', 'v', 'm', 'S', 'f')
)
select format('%%s execute function %%s.%%s(%%s)', r, s.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
  as line
from roles cross join pg_proc p join schemas s on s.oid = p.pronamespace
where has_schema_privilege(r, s.oid, 'usage') and has_function_privilege(r, p.oid, 'execute')
union all
select format('%%s %%s %%s %%s.%%s', r, priv, rels.kind, rels.nspname, rels.relname)
from roles cross join rels cross join lateral unnest(rels.privs) as priv
where has_schema_privilege(r, rels.nspname, 'usage')
  and case when rels.kind = 'sequence' then has_sequence_privilege(r, rels.oid, priv)
           else has_table_privilege(r, rels.oid, priv) end
union all
select format('%%s %%s(%%s) %%s %%s.%%s', r, priv, string_agg(a.attname, ',' order by a.attnum), rels.kind,
              rels.nspname, rels.relname)
from roles cross join rels cross join unnest(array['select', 'insert', 'update', 'references']) as priv
join pg_attribute a on a.attrelid = rels.oid and a.attnum > 0 and not a.attisdropped
where rels.kind <> 'sequence' and has_schema_privilege(r, rels.nspname, 'usage')
  and not has_table_privilege(r, rels.oid, priv) and has_column_privilege(r, rels.oid, a.attnum, priv)
group by r, priv, rels.kind, rels.nspname, rels.relname
order by 1
"""


def reachable(url: str) -> list[str]:
    """Every object an API role can reach in the database at ``url``, one sorted line each."""
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(REACHABLE_SQL, {"roles": list(API_ROLES)})]


def allowed() -> list[str]:
    return [line for line in ALLOW_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")]


def diff(got: list[str], want: list[str]) -> str:
    extra = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    return "\n".join([*(f"+ reachable but not allowed: {x}" for x in extra),
                      *(f"- allowed but not reachable: {x}" for x in missing)])


def _migrated(server_url: str, profile: str) -> Any:
    name = f"upshift_test_{RUN_ID}_priv{profile}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = _with_db(server_url, name)
    migrate(url, log=lambda _m: None, privileges=profile)
    yield url
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module")
def db_2026(pg_server_url: str) -> Any:
    """A database migrated under the 2026 profile (no automatic table grants)."""
    yield from _migrated(pg_server_url, "2026")


@pytest.fixture(scope="module")
def db_legacy(pg_server_url: str) -> Any:
    """A database migrated under the legacy profile (everything granted by default), whatever the run uses."""
    yield from _migrated(pg_server_url, "legacy")


def test_compat_reproduces_supabase_default_privileges(db_legacy, db_2026):
    """The bootstrap sets the defaults a Supabase project has for the migrating role."""
    query = ("select d.defaclobjtype as kind, array_agg(distinct a.grantee::regrole::text order by"
             " a.grantee::regrole::text) as grantees from pg_default_acl d"
             " join pg_namespace n on n.oid = d.defaclnamespace cross join lateral aclexplode(d.defaclacl) a"
             " where n.nspname = 'public' and d.defaclrole = current_user::regrole group by 1")
    with psycopg.connect(db_legacy) as c:
        legacy = {r[0]: set(r[1]) for r in c.execute(query)}
    with psycopg.connect(db_2026) as c:
        new = {r[0]: set(r[1]) for r in c.execute(query)}
    api = {"anon", "authenticated", "service_role"}
    assert {k: v >= api for k, v in legacy.items()} == {"r": True, "f": True, "S": True}
    assert {k: v >= api for k, v in new.items()} == {"f": True, "S": True}  # no table defaults


@pytest.mark.parametrize("profile", ["legacy", "2026"])
def test_api_roles_reach_exactly_the_allow_list(request, profile):
    url = request.getfixturevalue("db_legacy" if profile == "legacy" else "db_2026")
    problems = diff(reachable(url), allowed())
    assert not problems, f"{profile} profile:\n{problems}\n(update tests/api_privileges.txt only if intended)"


def test_the_suite_database_matches_the_allow_list(db_url):
    """The database every other test runs against (whatever profile this run uses) is no friendlier."""
    assert not diff(reachable(db_url), allowed())


def test_a_function_reachable_by_accident_is_caught(db_url, conn):
    """What Supabase does to a new function in public, and that this test notices it."""
    conn.execute("create function public.zz_accident() returns int language sql as 'select 1'")
    problems = diff(reachable(db_url), allowed())
    for role in API_ROLES:
        assert f"+ reachable but not allowed: {role} execute function public.zz_accident()" in problems


def test_no_function_in_public_or_private_keeps_the_public_grant(conn):
    """PostgreSQL grants EXECUTE to PUBLIC on every new function: each of ours revokes it."""
    assert functions_where(conn, "p.proacl is null or exists ("
                                 "select 1 from aclexplode(p.proacl) a where a.grantee = 0)") == []


if __name__ == "__main__":
    print("\n".join(reachable(sys.argv[1])))
