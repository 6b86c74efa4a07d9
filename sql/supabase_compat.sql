-- Supabase compatibility bootstrap for a plain PostgreSQL.
--
-- Creates what a Supabase project already has and our migrations rely on: the API roles,
-- schema auth with a minimal auth.users, auth.uid() / auth.jwt() / auth.role() defined as
-- Supabase defines them, and -- just as important -- the grants and default privileges a real
-- project has (docs/security.md, ../shared/design/SUPABASE_PRIVILEGES.md). The local database
-- must never be friendlier than production, so the migrations run against the permissive
-- defaults below and have to close everything themselves.
--
-- Every statement is conditional: on a real Supabase database (or a second run) it changes
-- nothing. The migration runner applies it before the migrations only when auth.users does not
-- exist yet, with upshift.compat_privileges set to the profile to reproduce:
--   legacy (default)  projects created before 2026-05-30: every new table, function and
--                     sequence in public is granted to anon, authenticated and service_role;
--   2026              projects created since: no automatic table grants; functions and
--                     sequences still granted (Supabase does not promise otherwise).

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
exception
  -- Several databases of one cluster may be bootstrapped at once (tests): a concurrent
  -- creator winning the race is fine.
  when duplicate_object or unique_violation then null;
end
$$;

grant anon, authenticated, service_role to authenticator;
-- The connecting role (postgres locally) switches to these with set_config('role', ...).
do $$
begin
  execute format('grant anon, authenticated, service_role to %I', current_user);
exception when others then null;  -- superusers need no grant; older servers may refuse it
end
$$;

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

create table if not exists auth.users (
  id uuid primary key default gen_random_uuid(),
  email text unique,
  raw_app_meta_data jsonb not null default '{}'::jsonb,
  raw_user_meta_data jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on table auth.users is
  'Minimal stand-in for Supabase Auth users (local PostgreSQL only; Supabase provides the real one).';

-- auth.uid() and auth.role() read one claim, as Supabase defines them (the old per-claim setting
-- first, then request.jwt.claims); auth.jwt() is all of them.
do $$
declare
  f record;
begin
  for f in select * from (values ('uid', 'uuid', 'sub'), ('role', 'text', 'role')) as v(name, type, claim) loop
    if to_regprocedure(format('auth.%s()', f.name)) is null then
      execute format($f$create function auth.%1$s() returns %2$s language sql stable as $b$
        select coalesce(nullif(current_setting('request.jwt.claim.%3$s', true), ''),
                        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> '%3$s'))::%2$s
      $b$ $f$, f.name, f.type, f.claim);
    end if;
  end loop;
  if to_regprocedure('auth.jwt()') is null then
    create function auth.jwt() returns jsonb language sql stable as $f$
      select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                      nullif(current_setting('request.jwt.claims', true), ''))::jsonb
    $f$;
  end if;
end
$$;

grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;

-- Schema grants and default privileges, as a Supabase project has them for the role that runs
-- the migrations (postgres there; whoever runs this here).
grant usage on schema public to anon, authenticated, service_role;

do $$
declare
  v_profile text := coalesce(nullif(current_setting('upshift.compat_privileges', true), ''), 'legacy');
  v_me text := quote_ident(current_user);
begin
  if v_profile not in ('legacy', '2026') then
    raise exception 'upshift.compat_privileges is legacy or 2026, not %', v_profile;
  end if;
  if v_profile = 'legacy' then
    execute format('alter default privileges for role %s in schema public grant all on tables'
                   ' to %s, anon, authenticated, service_role', v_me, v_me);
  end if;
  execute format('alter default privileges for role %s in schema public grant all on functions'
                 ' to %s, anon, authenticated, service_role', v_me, v_me);
  execute format('alter default privileges for role %s in schema public grant all on sequences'
                 ' to %s, anon, authenticated, service_role', v_me, v_me);
end
$$;
