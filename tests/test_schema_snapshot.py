"""The migrated catalog, diffed against a checked-in snapshot (tests/schema_snapshot.txt).

Tables and their columns, constraints, indexes, RLS policies, triggers, domains, types, and every
function with its signature, kind, volatility, security, a hash of its body and its grants: any
drift, intended or not, shows in review as a diff of that file. After an intended change to a
migration, regenerate it and read the diff:

    python -m tests.test_schema_snapshot <database url> > tests/schema_snapshot.txt
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import psycopg
import pytest

SNAPSHOT = Path(__file__).with_name("schema_snapshot.txt")
SCHEMAS = "('public', 'private')"

QUERIES = {
    "table": f"""
        select format('%s.%s rls=%s', n.nspname, c.relname, c.relrowsecurity)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in {SCHEMAS} and c.relkind in ('r', 'p', 'v', 'm')""",
    "column": f"""
        select format('%s.%s.%s %s%s%s', n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                      case when a.attnotnull then ' not null' else '' end,
                      coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''))
        from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where n.nspname in {SCHEMAS} and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped""",
    "constraint": f"""
        select format('%s %s %s', coalesce(c.conrelid::regclass::text, c.contypid::regtype::text), c.conname,
                      pg_get_constraintdef(c.oid))
        from pg_constraint c join pg_namespace n on n.oid = c.connamespace where n.nspname in {SCHEMAS}""",
    "index": f"""
        select pg_get_indexdef(i.indexrelid)
        from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in {SCHEMAS}""",
    "policy": f"""
        select format('%s.%s %s %s to %s using (%s) check (%s)', p.schemaname, p.tablename, p.policyname, p.cmd,
                      array_to_string(p.roles, ','), p.qual, p.with_check)
        from pg_policies p where p.schemaname in {SCHEMAS}""",
    "trigger": f"""
        select format('%s %s', t.tgrelid::regclass, pg_get_triggerdef(t.oid))
        from pg_trigger t join pg_proc p on p.oid = t.tgfoid join pg_namespace n on n.oid = p.pronamespace
        where not t.tgisinternal and n.nspname in {SCHEMAS}""",
    "type": f"""
        select format('%s %s %s', t.oid::regtype, t.typtype, coalesce(format_type(t.typbasetype, t.typtypmod), ''))
        from pg_type t join pg_namespace n on n.oid = t.typnamespace
        where n.nspname in {SCHEMAS} and t.typtype in ('d', 'e', 'c')
          and (t.typtype <> 'c' or (select c.relkind from pg_class c where c.oid = t.typrelid) = 'c')""",
    "function": f"""
        select format('%s.%s(%s) returns %s %s %s%s body=%s acl=%s', n.nspname, p.proname,
                      pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
                      (select l.lanname from pg_language l where l.oid = p.prolang),
                      case p.provolatile when 'i' then 'immutable' when 's' then 'stable' else 'volatile' end,
                      case when p.prosecdef then ' security definer' else '' end,
                      left(md5(p.prosrc), 12),
                      coalesce((select string_agg(a.grantee::regrole::text || ':' || a.privilege_type, ','
                                                  order by a.grantee::regrole::text)
                                from aclexplode(p.proacl) a where a.grantee <> p.proowner), '-'))
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname in {SCHEMAS}""",
    "grant": f"""
        select format('%s.%s %s:%s', n.nspname, c.relname, a.grantee::regrole::text, a.privilege_type)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace cross join lateral aclexplode(c.relacl) a
        where n.nspname in {SCHEMAS} and a.grantee <> c.relowner""",
}


def snapshot(url: str) -> list[str]:
    lines: list[str] = []
    with psycopg.connect(url) as conn:
        for kind, sql in QUERIES.items():
            lines.extend(sorted(f"{kind} {' '.join(row[0].split())}" for row in conn.execute(sql)))
    return lines


def test_catalog_matches_the_snapshot(db_url):
    got = snapshot(db_url)
    want = SNAPSHOT.read_text().splitlines()
    diff = "\n".join(difflib.unified_diff(want, got, "tests/schema_snapshot.txt", "migrated", lineterm="", n=0))
    assert not diff, ("the migrated schema drifted from tests/schema_snapshot.txt; if intended, regenerate it "
                      f"(see this module's docstring) and review the diff:\n{diff}")


def test_plpgsql_check_finds_nothing(pg_server_url):
    """Every plpgsql function through plpgsql_check, where the server has it (CI's PostgreSQL 15 does)."""
    with psycopg.connect(pg_server_url) as conn:
        if conn.execute("select 1 from pg_available_extensions where name = 'plpgsql_check'").fetchone() is None:
            pytest.skip("plpgsql_check is not installed on this server (`make lint` runs it on 127.0.0.1:5432)")
    from upshift_platform.sqlcheck import check

    assert check(pg_server_url) == []


if __name__ == "__main__":
    print("\n".join(snapshot(sys.argv[1])))
