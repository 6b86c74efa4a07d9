-- Helpers every later migration uses: schema private, errors, the backend-only guard, request
-- context (client IP, user agent), secrets and hashes, and the shared vocabularies.
--
-- Grants: on Supabase every table and function created in public starts out granted to anon,
-- authenticated and service_role (the project's default privileges; sql/supabase_compat.sql
-- reproduces them locally), on top of PostgreSQL's own EXECUTE for PUBLIC on every function. So
-- every object in these migrations revokes all of that right after it is created and grants back
-- exactly what its callers need. tests/test_privileges.py keeps the resulting list
-- (tests/api_privileges.txt); docs/security.md explains who calls what.

create schema if not exists private;
revoke all on schema private from public;
-- authenticated evaluates RLS policies that call private helpers; nothing else in private is granted.
grant usage on schema private to authenticated;
comment on schema private is 'Helpers for RLS policies and RPCs; not exposed through the API.';

-- Errors -------------------------------------------------------------------------------------

create function private.err(p_status integer, p_code text, p_message text, p_fields jsonb default '{}')
returns void
language plpgsql set search_path = '' as $$
begin
  raise exception using
    errcode = 'PT' || p_status::text,
    message = p_message,
    detail = (jsonb_build_object('error', p_code) || coalesce(p_fields, '{}'::jsonb))::text;
end $$;
comment on function private.err(integer, text, text, jsonb) is
  'Raise SQLSTATE PT<status> (PostgREST maps it to HTTP <status>) with a JSON detail {"error": code, ...}.';
revoke all on function private.err(integer, text, text, jsonb) from public, anon, authenticated, service_role;

-- Who is calling -----------------------------------------------------------------------------

create function private.is_backend() returns boolean
language plpgsql stable set search_path = '' as $$
begin
  -- The API role the request runs as (PostgREST and our functions SET ROLE per transaction; a
  -- security-definer function changes current_user, not this), else the connected role.
  return coalesce(nullif(current_setting('role', true), 'none'), session_user::text)
         not in ('anon', 'authenticated', 'authenticator');
end $$;
comment on function private.is_backend() is
  'Is the caller the backend (service_role, or a direct connection such as the operator''s), not an API user?';
revoke all on function private.is_backend() from public, anon, authenticated, service_role;

create function private.require_backend(p_function text) returns void
language plpgsql stable set search_path = '' as $$
begin
  if not private.is_backend() then
    perform private.err(403, 'backend_only',
      format('%s is for the platform''s backend (service_role) only.', p_function),
      jsonb_build_object('function', p_function));
  end if;
end $$;
comment on function private.require_backend(text) is
  'Defence in depth for backend-only RPCs: refuse anon and authenticated even if EXECUTE was granted by mistake.';
revoke all on function private.require_backend(text) from public, anon, authenticated, service_role;

create function private.require_user() returns uuid
language plpgsql stable set search_path = '' as $$
begin
  if (select auth.uid()) is null then
    perform private.err(403, 'user_required', 'This needs a signed-in user (service keys cannot do it).');
  end if;
  return (select auth.uid());
end $$;
comment on function private.require_user() is 'The calling user''s id, or PT403 user_required (a service key, say).';
revoke all on function private.require_user() from public, anon, authenticated, service_role;

create function private.request_ip() returns inet
language plpgsql stable set search_path = '' as $$
declare
  v text := btrim(split_part(
    nullif(current_setting('request.headers', true), '')::jsonb ->> 'x-forwarded-for', ',', 1));
begin
  if v ~ '^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$' then
    return v::inet;  -- a valid IPv4 address: no exception block (and no subtransaction) needed
  end if;
  if v is null or v !~ '^[0-9A-Fa-f:.]{2,45}$' or position(':' in v) = 0 then
    return null;
  end if;
  begin
    return v::inet;
  exception when invalid_text_representation then
    return null;
  end;
end $$;
comment on function private.request_ip() is 'The client address the functions resolved (request.headers x-forwarded-for).';
revoke all on function private.request_ip() from public, anon, authenticated, service_role;

create function private.request_user_agent() returns text
language plpgsql stable set search_path = '' as $$
begin
  return left(nullif(current_setting('request.headers', true), '')::jsonb ->> 'user-agent', 512);
end $$;
comment on function private.request_user_agent() is 'The client''s User-Agent (request.headers), at most 512 characters.';
revoke all on function private.request_user_agent() from public, anon, authenticated, service_role;

-- Secrets, hashes, timestamps ----------------------------------------------------------------

create function private.new_secret(p_prefix text) returns text
language sql volatile set search_path = '' as $$
  -- 2 x 122 random bits from the server's strong random source.
  select p_prefix || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
$$;
comment on function private.new_secret(text) is 'A new random secret (API key, invite token) with a recognisable prefix.';
revoke all on function private.new_secret(text) from public, anon, authenticated, service_role;

create function private.sha256_hex(p_text text) returns text
language sql immutable set search_path = '' as $$
  select encode(sha256(convert_to(p_text, 'UTF8')), 'hex')
$$;
comment on function private.sha256_hex(text) is 'Hex SHA-256 of a text: how API keys and invite tokens are stored.';
revoke all on function private.sha256_hex(text) from public, anon, authenticated, service_role;

create function private.set_updated_at() returns trigger
language plpgsql set search_path = '' as $$
begin
  new.updated_at := now();
  return new;
end $$;
comment on function private.set_updated_at() is 'Trigger: keep updated_at current.';
revoke all on function private.set_updated_at() from public, anon, authenticated, service_role;

-- Vocabularies: each list is defined here once; the domains, the checks and the error messages
-- all read it. ------------------------------------------------------------------------------

create function private.member_roles() returns text[]
language sql immutable set search_path = '' as $$ select array['admin', 'member', 'viewer'] $$;
comment on function private.member_roles() is
  'Org roles. admin: manage members, keys, billing, read audit logs; member: spend the pool; viewer: read.';
revoke all on function private.member_roles() from public, anon, authenticated, service_role;

create function private.org_plans() returns text[]
language sql immutable set search_path = '' as $$ select array['pro', 'team'] $$;
comment on function private.org_plans() is 'Plans of an org: team (a live Team subscription) unlocks org audit logs.';
revoke all on function private.org_plans() from public, anon, authenticated, service_role;

create function private.user_plans() returns text[]
language sql immutable set search_path = '' as $$ select array['free', 'pro'] $$;
comment on function private.user_plans() is 'Plans of a user: pro with a live Pro subscription.';
revoke all on function private.user_plans() from public, anon, authenticated, service_role;

create function private.subscription_tiers() returns text[]
language sql immutable set search_path = '' as $$ select array['pro', 'team'] $$;
comment on function private.subscription_tiers() is 'What can be subscribed to: pro (a user), team (an org).';
revoke all on function private.subscription_tiers() from public, anon, authenticated, service_role;

create domain public.member_role as text check (value = any (private.member_roles()));
comment on domain public.member_role is 'admin, member or viewer (private.member_roles()).';
create domain public.org_plan as text check (value = any (private.org_plans()));
comment on domain public.org_plan is 'pro or team (private.org_plans()).';
create domain public.user_plan as text check (value = any (private.user_plans()));
comment on domain public.user_plan is 'free or pro (private.user_plans()).';
create domain public.subscription_tier as text check (value = any (private.subscription_tiers()));
comment on domain public.subscription_tier is 'pro or team (private.subscription_tiers()).';
create domain public.org_slug as text
  check (value ~ '^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$' and value !~ '^[0-9a-f]{8}-[0-9a-f]{4}-');
comment on domain public.org_slug is 'An org''s short name: 1-40 of a-z, 0-9 and inner hyphens, not a UUID.';

create function private.check_in(p_value text, p_allowed text[], p_field text) returns text
language plpgsql immutable set search_path = '' as $$
begin
  if p_value is null or not p_value = any (p_allowed) then
    perform private.err(400, 'invalid_' || p_field, format('%s is one of %s.', p_field, array_to_string(p_allowed, ', ')),
                        jsonb_build_object('field', p_field, 'allowed', to_jsonb(p_allowed)));
  end if;
  return p_value;
end $$;
comment on function private.check_in(text, text[], text) is
  'p_value if it is one of p_allowed, else PT400 invalid_<field> naming the allowed values.';
revoke all on function private.check_in(text, text[], text) from public, anon, authenticated, service_role;

create function private.check_slug(p_slug text) returns text
language plpgsql immutable set search_path = '' as $$
begin
  -- null passes through (update_org changes only what was given); the domain holds the rule.
  return lower(btrim(p_slug))::public.org_slug;
exception when check_violation then
  perform private.err(400, 'invalid_slug', 'A slug is 1-40 characters of a-z, 0-9 and inner hyphens (and not a UUID).',
                      jsonb_build_object('field', 'slug'));
  return null;  -- not reached: private.err raises
end $$;
comment on function private.check_slug(text) is 'A slug normalised (trimmed, lower case) and checked, or PT400 invalid_slug.';
revoke all on function private.check_slug(text) from public, anon, authenticated, service_role;

create function private.check_name(p_name text) returns text
language plpgsql immutable set search_path = '' as $$
begin
  if p_name is not null and length(btrim(p_name)) not between 1 and 100 then
    perform private.err(400, 'invalid_name', 'A name is 1-100 characters.', jsonb_build_object('field', 'name'));
  end if;
  return btrim(p_name);  -- null passes through
end $$;
comment on function private.check_name(text) is 'A display name trimmed and checked (1-100 characters), or PT400 invalid_name.';
revoke all on function private.check_name(text) from public, anon, authenticated, service_role;
