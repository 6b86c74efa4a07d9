-- Org management: API keys, invites, and the RPCs that manage orgs, members, invites and keys.
--
-- Every decision about who may do what is made here (security-definer functions checking
-- auth.uid(), the caller's service key and membership). Errors use PostgREST's PTxyz codes:
-- the HTTP status, with a JSON detail holding a stable "error" code.

-- Errors and identity helpers ----------------------------------------------------------------

create function private.err(p_status integer, p_code text, p_message text, p_fields jsonb default '{}')
returns void
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = 'PT' || p_status::text,
    message = p_message,
    detail = (jsonb_build_object('error', p_code) || coalesce(p_fields, '{}'::jsonb))::text;
end
$$;
comment on function private.err(integer, text, text, jsonb) is
  'Raise SQLSTATE PT<status> (PostgREST maps it to HTTP <status>) with a JSON detail {"error": code, ...}.';
revoke all on function private.err(integer, text, text, jsonb) from public, anon, authenticated, service_role;

create function private.require_backend(p_function text) returns void
language plpgsql stable
set search_path = ''
as $$
declare
  -- The API role the request runs as (PostgREST and our functions SET ROLE per transaction; a
  -- security-definer function changes current_user, not this), else the connected role.
  v_role text := coalesce(nullif(current_setting('role', true), 'none'), session_user);
begin
  if v_role in ('anon', 'authenticated', 'authenticator') then
    perform private.err(403, 'backend_only',
      format('%s is for the platform''s backend (service_role) only.', p_function),
      jsonb_build_object('function', p_function));
  end if;
end
$$;
comment on function private.require_backend(text) is
  'Defence in depth for backend-only RPCs: refuse anon and authenticated even if EXECUTE was granted by mistake.';
revoke all on function private.require_backend(text) from public, anon, authenticated, service_role;

create function private.find_org(p_org text) returns uuid
language plpgsql stable security definer
set search_path = ''
as $$
begin
  -- Two separate indexed lookups (a single predicate mixing id and slug could not use either index).
  if btrim(p_org) ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    return (select o.id from public.orgs o where o.id = btrim(p_org)::uuid);
  end if;
  return (select o.id from public.orgs o where o.slug = lower(btrim(p_org)));
end
$$;
comment on function private.find_org(text) is 'An org by id or slug (no access check).';
revoke all on function private.find_org(text) from public, anon, authenticated, service_role;

create function private.require_org(p_org text) returns uuid
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v uuid := private.find_org(p_org);
begin
  if v is null then
    perform private.err(404, 'org_not_found', format('No org %s.', p_org), jsonb_build_object('org', p_org));
  end if;
  return v;
end
$$;
comment on function private.require_org(text) is 'An org by id or slug, or PT404 (operator paths: no access check).';
revoke all on function private.require_org(text) from public, anon, authenticated, service_role;

create table public.api_keys (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  org_id uuid references public.orgs (id) on delete cascade,
  kind text not null,
  name text not null,
  key_hash text not null,
  key_prefix text not null,
  created_at timestamptz not null default now(),
  last_used_at timestamptz,
  expires_at timestamptz,
  revoked_at timestamptz,
  constraint api_keys_key_hash_key unique (key_hash),
  constraint api_keys_kind_check check (kind in ('personal', 'service')),
  constraint api_keys_service_has_org check (kind = 'personal' or org_id is not null),
  constraint api_keys_name_length check (length(btrim(name)) between 1 and 100),
  constraint api_keys_key_hash_format check (key_hash ~ '^[0-9a-f]{64}$')
);
create index api_keys_user_id_idx on public.api_keys (user_id);
create index api_keys_org_id_idx on public.api_keys (org_id) where org_id is not null;
comment on table public.api_keys is
  'Platform API keys (UPSHIFT_API_TOKEN). Only the SHA-256 of a key is stored; the key is shown once.';
comment on column public.api_keys.user_id is 'Owner: the user a personal key acts as; who created a service key.';
comment on column public.api_keys.org_id is
  'Personal key: the default org context. Service key: the org it acts for (as a service actor, not a user).';
comment on column public.api_keys.key_prefix is 'First characters of the key, for recognising it; not secret.';
comment on column public.api_keys.last_used_at is 'Updated at most once a minute.';
alter table public.api_keys enable row level security;
revoke all on table public.api_keys from anon, authenticated, service_role;
grant select on table public.api_keys to service_role;
-- Direct reads for PostgREST clients (never the hash); writes only through the RPCs below.
grant select (id, user_id, org_id, kind, name, key_prefix, created_at, last_used_at, expires_at, revoked_at)
  on table public.api_keys to authenticated;

-- Hot-path helpers are plpgsql: their plans are cached per session, while a SQL function with a
-- SET clause is neither inlined nor plan-cached (it is planned again on every call).
create function private.service_key() returns table (key_id uuid, org_id uuid)
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_key uuid := nullif((select auth.jwt()) -> 'upshift' ->> 'key_id', '')::uuid;
begin
  if v_key is null or (select auth.uid()) is not null then
    return;
  end if;
  return query
    select k.id, k.org_id from public.api_keys k
    where k.id = v_key and k.kind = 'service' and k.revoked_at is null
      and (k.expires_at is null or k.expires_at > now());
end
$$;
comment on function private.service_key() is
  'The active org service key the caller acts as (claims set after the key was verified), if any.';
revoke all on function private.service_key() from public, anon, authenticated, service_role;

create function private.actor_org_role(p_org_id uuid) returns text
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_uid uuid := (select auth.uid());
begin
  if v_uid is not null then
    return (select m.role from public.org_members m where m.org_id = p_org_id and m.user_id = v_uid);
  end if;
  return (select 'service' from private.service_key() s where s.org_id = p_org_id);
end
$$;
comment on function private.actor_org_role(uuid) is
  'The caller''s role in the org: admin, member, viewer, service (an org service key) or null.';
revoke all on function private.actor_org_role(uuid) from public, anon, authenticated, service_role;

create function private.org_for(p_org text, p_roles text[] default null) returns uuid
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_id uuid;
  v_role text;
begin
  if p_org is null or btrim(p_org) = '' then
    perform private.err(400, 'invalid_request', 'An org (id or slug) is required.', '{"field": "org"}');
  end if;
  v_id := private.find_org(p_org);
  v_role := case when v_id is not null then private.actor_org_role(v_id) end;
  if v_role is null then
    perform private.err(404, 'org_not_found', format('No org %s that you can see.', p_org),
                        jsonb_build_object('org', p_org));
  end if;
  if p_roles is not null and not v_role = any (p_roles) then
    perform private.err(403, 'forbidden',
      format('This needs the %s role in org %s; you are %s.', array_to_string(p_roles, ' or '), p_org, v_role),
      jsonb_build_object('org', p_org, 'role', v_role, 'required', to_jsonb(p_roles)));
  end if;
  return v_id;
end
$$;
comment on function private.org_for(text, text[]) is
  'Resolve an org the caller can see (404 otherwise) and, with p_roles, check the caller''s role (403).';
revoke all on function private.org_for(text, text[]) from public, anon, authenticated, service_role;

create function private.require_user() returns uuid
language plpgsql stable
set search_path = ''
as $$
begin
  if (select auth.uid()) is null then
    perform private.err(403, 'user_required', 'This needs a signed-in user (service keys cannot do it).');
  end if;
  return (select auth.uid());
end
$$;
revoke all on function private.require_user() from public, anon, authenticated, service_role;

create function private.new_secret(p_prefix text) returns text
language sql volatile
set search_path = ''
as $$
  -- 2 x 122 random bits from the server's strong random source.
  select p_prefix || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
$$;
revoke all on function private.new_secret(text) from public, anon, authenticated, service_role;

create function private.sha256_hex(p_text text) returns text
language sql immutable
set search_path = ''
as $$
  select encode(sha256(convert_to(p_text, 'UTF8')), 'hex')
$$;
revoke all on function private.sha256_hex(text) from public, anon, authenticated, service_role;

create function private.org_json(p_org_id uuid, p_role text) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
begin
  return (select jsonb_build_object(
    'id', o.id, 'slug', o.slug, 'name', o.name, 'plan', o.plan,
    'credit_balance', o.credit_balance, 'role', p_role,
    'created_at', o.created_at, 'updated_at', o.updated_at)
  from public.orgs o where o.id = p_org_id);
end
$$;
revoke all on function private.org_json(uuid, text) from public, anon, authenticated, service_role;

create function private.check_role(p_role text) returns text
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_role is null or p_role not in ('admin', 'member', 'viewer') then
    perform private.err(400, 'invalid_role', 'role is one of admin, member, viewer.',
                        jsonb_build_object('field', 'role'));
  end if;
  return p_role;
end
$$;
revoke all on function private.check_role(text) from public, anon, authenticated, service_role;

-- Org RPCs -----------------------------------------------------------------------------------

create function public.create_org(name text, slug text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_uid uuid := private.require_user();
  v_id uuid;
begin
  insert into public.orgs (slug, name)
  values (private.check_slug(coalesce(create_org.slug, '')), private.check_name(coalesce(create_org.name, '')))
  on conflict on constraint orgs_slug_key do nothing
  returning id into v_id;
  if v_id is null then
    perform private.err(409, 'slug_taken', format('The slug %s is taken.', lower(btrim(create_org.slug))),
                        jsonb_build_object('field', 'slug'));
  end if;
  insert into public.org_members (org_id, user_id, role) values (v_id, v_uid, 'admin');
  perform private.audit_append(v_id, v_id, 'org_created', 'org', v_id::text,
    jsonb_build_object('slug', lower(btrim(create_org.slug)), 'name', btrim(create_org.name)));
  return private.org_json(v_id, 'admin');
end
$$;
comment on function public.create_org(text, text) is 'Create an org; the caller becomes its admin.';
revoke all on function public.create_org(text, text) from public, anon, authenticated, service_role;
grant execute on function public.create_org(text, text) to authenticated;

create function public.get_org(org text) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_id uuid := private.org_for(get_org.org);
begin
  return private.org_json(v_id, private.actor_org_role(v_id));
end
$$;
comment on function public.get_org(text) is 'An org the caller belongs to, with the caller''s role.';
revoke all on function public.get_org(text) from public, anon, authenticated, service_role;
grant execute on function public.get_org(text) to authenticated;

create function public.list_my_orgs() returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select coalesce(jsonb_agg(private.org_json(m.org_id, m.role) order by o.slug), '[]'::jsonb)
  from public.org_members m join public.orgs o on o.id = m.org_id
  where m.user_id = (select auth.uid())
$$;
comment on function public.list_my_orgs() is 'The caller''s orgs with their role in each.';
revoke all on function public.list_my_orgs() from public, anon, authenticated, service_role;
grant execute on function public.list_my_orgs() to authenticated;

create function public.update_org(org text, name text default null, slug text default null) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_id uuid := private.org_for(update_org.org, array['admin']);
begin
  begin
    update public.orgs o set
      name = coalesce(private.check_name(update_org.name), o.name),
      slug = coalesce(private.check_slug(update_org.slug), o.slug)
    where o.id = v_id;
    perform private.audit_append(v_id, v_id, 'org_updated', 'org', v_id::text,
      jsonb_strip_nulls(jsonb_build_object('name', update_org.name, 'slug', lower(btrim(update_org.slug)))));
  exception when unique_violation then
    perform private.err(409, 'slug_taken', format('The slug %s is taken.', lower(btrim(update_org.slug))),
                        jsonb_build_object('field', 'slug'));
  end;
  return private.org_json(v_id, 'admin');
end
$$;
comment on function public.update_org(text, text, text) is 'Rename an org or change its slug (admin).';
revoke all on function public.update_org(text, text, text) from public, anon, authenticated, service_role;
grant execute on function public.update_org(text, text, text) to authenticated;

-- check_name/check_slug pass null through (update_org changes only what was given).
create function private.check_name(p_name text) returns text
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_name is not null and length(btrim(p_name)) not between 1 and 100 then
    perform private.err(400, 'invalid_name', 'A name is 1-100 characters.', jsonb_build_object('field', 'name'));
  end if;
  return btrim(p_name);
end
$$;
revoke all on function private.check_name(text) from public, anon, authenticated, service_role;

create function private.check_slug(p_slug text) returns text
language plpgsql immutable
set search_path = ''
as $$
declare
  v text := lower(btrim(p_slug));
begin
  if p_slug is not null
     and (v !~ '^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$' or v ~ '^[0-9a-f]{8}-[0-9a-f]{4}-') then
    perform private.err(400, 'invalid_slug',
      'A slug is 1-40 characters of a-z, 0-9 and inner hyphens (and not a UUID).',
      jsonb_build_object('field', 'slug'));
  end if;
  return v;
end
$$;
revoke all on function private.check_slug(text) from public, anon, authenticated, service_role;

-- Members ------------------------------------------------------------------------------------

create function public.list_members(org text) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_id uuid := private.org_for(list_members.org);
begin
  return (
    select coalesce(jsonb_agg(jsonb_build_object(
      'user_id', m.user_id, 'email', u.email, 'role', m.role, 'created_at', m.created_at)
      order by m.created_at, m.user_id), '[]'::jsonb)
    from public.org_members m join auth.users u on u.id = m.user_id
    where m.org_id = v_id);
end
$$;
comment on function public.list_members(text) is 'Members of an org the caller belongs to.';
revoke all on function public.list_members(text) from public, anon, authenticated, service_role;
grant execute on function public.list_members(text) to authenticated;

create function private.lock_membership(p_org uuid, p_via text) returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  -- The org row is the lock that every membership change and every spend from the org's pool
  -- takes, so they serialize here. Everything below is read after the lock (each statement of a
  -- volatile function takes a new snapshot): the caller's role as it is now, not as it was when
  -- the request started, and the number of admins left.
  perform 1 from public.orgs o where o.id = p_org for update;
  if p_via = 'admin' and not exists (
      select 1 from public.org_members m
      where m.org_id = p_org and m.user_id = (select auth.uid()) and m.role = 'admin') then
    perform private.err(403, 'forbidden', 'You are no longer an admin of this org.',
                        jsonb_build_object('org_id', p_org));
  end if;
  return (select count(*)::integer from public.org_members m where m.org_id = p_org and m.role = 'admin');
end
$$;
comment on function private.lock_membership(uuid, text) is
  'Lock the org row for a membership change, re-check an admin caller (p_via = admin) and count the admins.';
revoke all on function private.lock_membership(uuid, text) from public, anon, authenticated, service_role;

create function private.change_member_role(p_org uuid, p_user uuid, p_role text, p_via text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_new text := private.check_role(p_role);
  v_admins integer := private.lock_membership(p_org, p_via);
  v_old text;
  v_revoked jsonb := '{"revoked_api_keys": [], "revoked_invites": []}'::jsonb;
begin
  select m.role into v_old from public.org_members m where m.org_id = p_org and m.user_id = p_user for update;
  if v_old is null then
    perform private.err(404, 'member_not_found', 'No such member in this org.', jsonb_build_object('user_id', p_user));
  end if;
  if v_old = 'admin' and v_new <> 'admin' and v_admins <= 1 then
    perform private.err(409, 'last_admin', 'An org keeps at least one admin: promote another member first.');
  end if;
  if v_new <> v_old then
    update public.org_members m set role = v_new where m.org_id = p_org and m.user_id = p_user;
    perform private.audit_append(p_org, p_org, 'member_role_changed', 'user', p_user::text,
      jsonb_build_object('user_id', p_user, 'from', v_old, 'to', v_new, 'via', p_via));
    if v_old = 'admin' then
      v_revoked := private.revoke_member_grants(p_org, p_user, 'member_demoted');
    end if;
  end if;
  return jsonb_build_object('org_id', p_org, 'user_id', p_user, 'role', v_new, 'previous_role', v_old) || v_revoked;
end
$$;
revoke all on function private.change_member_role(uuid, uuid, text, text) from public, anon, authenticated, service_role;

create function private.delete_member(p_org uuid, p_user uuid, p_via text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_admins integer := private.lock_membership(p_org, p_via);
  v_old text;
  v_revoked jsonb;
begin
  select m.role into v_old from public.org_members m where m.org_id = p_org and m.user_id = p_user for update;
  if v_old is null then
    perform private.err(404, 'member_not_found', 'No such member in this org.', jsonb_build_object('user_id', p_user));
  end if;
  if v_old = 'admin' and v_admins <= 1 then
    perform private.err(409, 'last_admin', 'An org keeps at least one admin: promote another member first.');
  end if;
  delete from public.org_members m where m.org_id = p_org and m.user_id = p_user;
  update public.profiles p set default_org_id = null where p.id = p_user and p.default_org_id = p_org;
  perform private.audit_append(p_org, p_org, 'member_removed', 'user', p_user::text,
    jsonb_build_object('user_id', p_user, 'role', v_old, 'via', p_via));
  v_revoked := private.revoke_member_grants(p_org, p_user, 'member_removed');
  return jsonb_build_object('org_id', p_org, 'user_id', p_user, 'removed', true, 'role', v_old) || v_revoked;
end
$$;
revoke all on function private.delete_member(uuid, uuid, text) from public, anon, authenticated, service_role;

create function public.set_member_role(org text, user_id uuid, role text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
begin
  return private.change_member_role(private.org_for(set_member_role.org, array['admin']), set_member_role.user_id,
                                    set_member_role.role, 'admin');
end
$$;
comment on function public.set_member_role(text, uuid, text) is 'Change a member''s role (admin; never the last admin).';
revoke all on function public.set_member_role(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.set_member_role(text, uuid, text) to authenticated;

create function public.remove_member(org text, user_id uuid) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_self boolean := remove_member.user_id = (select auth.uid());
begin
  return private.delete_member(
    private.org_for(remove_member.org, case when v_self then null else array['admin'] end),
    remove_member.user_id, case when v_self then 'left' else 'admin' end);
end
$$;
comment on function public.remove_member(text, uuid) is 'Remove a member (admin), or leave (the member); never the last admin.';
revoke all on function public.remove_member(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.remove_member(text, uuid) to authenticated;

create function public.admin_add_member(org text, user_id uuid, role text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_org uuid;
  v_role text;
  v_old text;
begin
  perform private.require_backend('admin_add_member');
  v_org := private.require_org(admin_add_member.org);
  v_role := private.check_role(admin_add_member.role);
  perform private.lock_membership(v_org, 'operator');
  if not exists (select 1 from auth.users u where u.id = admin_add_member.user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;
  select m.role into v_old from public.org_members m
  where m.org_id = v_org and m.user_id = admin_add_member.user_id for update;
  if v_old is null then
    insert into public.org_members (org_id, user_id, role) values (v_org, admin_add_member.user_id, v_role);
    perform private.audit_append(v_org, v_org, 'member_added', 'user', admin_add_member.user_id::text,
      jsonb_build_object('user_id', admin_add_member.user_id, 'role', v_role, 'via', 'operator'));
  else
    return private.change_member_role(v_org, admin_add_member.user_id, v_role, 'operator');
  end if;
  return jsonb_build_object('org_id', v_org, 'user_id', admin_add_member.user_id, 'role', v_role);
end
$$;
comment on function public.admin_add_member(text, uuid, text) is
  'Operator (service_role): add a user to an org or set their role.';
revoke all on function public.admin_add_member(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_add_member(text, uuid, text) to service_role;  -- backend only

-- Invites ------------------------------------------------------------------------------------

create table public.org_invites (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.orgs (id) on delete cascade,
  email text not null,
  role text not null,
  token_hash text not null,
  invited_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null default now() + interval '7 days',
  accepted_at timestamptz,
  accepted_by uuid references auth.users (id) on delete set null,
  revoked_at timestamptz,
  constraint org_invites_token_hash_key unique (token_hash),
  constraint org_invites_role_check check (role in ('admin', 'member', 'viewer')),
  constraint org_invites_email_format check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320)
);
create index org_invites_org_id_idx on public.org_invites (org_id);
comment on table public.org_invites is 'Single-use invitations (7 days); only the SHA-256 of the token is stored.';
alter table public.org_invites enable row level security;
revoke all on table public.org_invites from anon, authenticated, service_role;
grant select on table public.org_invites to service_role;
grant select (id, org_id, email, role, invited_by, created_at, expires_at, accepted_at, accepted_by, revoked_at)
  on table public.org_invites to authenticated;

create function private.invite_json(i public.org_invites) returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object('id', i.id, 'org_id', i.org_id, 'email', i.email, 'role', i.role,
    'invited_by', i.invited_by, 'created_at', i.created_at, 'expires_at', i.expires_at)
$$;
revoke all on function private.invite_json(public.org_invites) from public, anon, authenticated, service_role;

create function private.revoke_member_grants(p_org uuid, p_user uuid, p_via text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_keys jsonb := '[]'::jsonb;
  v_invites jsonb := '[]'::jsonb;
  k public.api_keys;
  i public.org_invites;
begin
  -- What a member handed out as an admin stops working when they stop being one: the org's service
  -- keys they created and the invites they sent that nobody has accepted yet.
  for k in
    update public.api_keys a set revoked_at = now()
    where a.org_id = p_org and a.kind = 'service' and a.user_id = p_user and a.revoked_at is null
    returning a.*
  loop
    perform private.audit_append(p_org, p_org, 'api_key_revoked', 'api_key', k.id::text,
      jsonb_build_object('name', k.name, 'kind', k.kind, 'prefix', k.key_prefix, 'owner', p_user, 'via', p_via));
    v_keys := v_keys || jsonb_build_array(jsonb_build_object('id', k.id, 'name', k.name, 'prefix', k.key_prefix));
  end loop;
  for i in
    update public.org_invites v set revoked_at = now()
    where v.org_id = p_org and v.invited_by = p_user and v.accepted_at is null and v.revoked_at is null
    returning v.*
  loop
    perform private.audit_append(p_org, p_org, 'invite_revoked', 'invite', i.id::text,
      jsonb_build_object('email', i.email, 'role', i.role, 'invited_by', p_user, 'via', p_via));
    v_invites := v_invites || jsonb_build_array(jsonb_build_object('id', i.id, 'email', i.email, 'role', i.role));
  end loop;
  return jsonb_build_object('revoked_api_keys', v_keys, 'revoked_invites', v_invites);
end
$$;
comment on function private.revoke_member_grants(uuid, uuid, text) is
  'Revoke the org''s service keys a member created and their pending invites (on removal or demotion from admin).';
revoke all on function private.revoke_member_grants(uuid, uuid, text) from public, anon, authenticated, service_role;

create function public.create_invite(org text, email text, role text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_org uuid := private.org_for(create_invite.org, array['admin']);
  v_token text := private.new_secret('upi_');
  v_email text := lower(btrim(create_invite.email));
  v_inv public.org_invites;
begin
  if v_email is null or v_email !~ '^[^@\s]+@[^@\s]+$' or length(v_email) > 320 then
    perform private.err(400, 'invalid_email', 'email is not an email address.', '{"field": "email"}');
  end if;
  insert into public.org_invites (org_id, email, role, token_hash, invited_by)
  values (v_org, v_email, private.check_role(create_invite.role), private.sha256_hex(v_token), (select auth.uid()))
  returning * into v_inv;
  perform private.audit_append(v_org, v_org, 'invite_created', 'invite', v_inv.id::text,
    jsonb_build_object('email', v_inv.email, 'role', v_inv.role, 'expires_at', v_inv.expires_at));
  return private.invite_json(v_inv) || jsonb_build_object('token', v_token);
end
$$;
comment on function public.create_invite(text, text, text) is
  'Invite an email to an org (admin). Returns the token once; valid 7 days, single use.';
revoke all on function public.create_invite(text, text, text) from public, anon, authenticated, service_role;
grant execute on function public.create_invite(text, text, text) to authenticated;

create function public.list_invites(org text) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_org uuid := private.org_for(list_invites.org, array['admin']);
begin
  return (select coalesce(jsonb_agg(private.invite_json(i) order by i.created_at), '[]'::jsonb)
          from public.org_invites i
          where i.org_id = v_org and i.accepted_at is null and i.revoked_at is null and i.expires_at > now());
end
$$;
comment on function public.list_invites(text) is 'Pending invites of an org (admin).';
revoke all on function public.list_invites(text) from public, anon, authenticated, service_role;
grant execute on function public.list_invites(text) to authenticated;

create function public.revoke_invite(org text, invite_id uuid) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_org uuid := private.org_for(revoke_invite.org, array['admin']);
  v_inv public.org_invites;
begin
  update public.org_invites i set revoked_at = now()
  where i.id = revoke_invite.invite_id and i.org_id = v_org and i.accepted_at is null and i.revoked_at is null
  returning * into v_inv;
  if v_inv.id is null then
    perform private.err(404, 'invite_not_found', 'No pending invite with that id in this org.');
  end if;
  perform private.audit_append(v_org, v_org, 'invite_revoked', 'invite', v_inv.id::text,
    jsonb_build_object('email', v_inv.email, 'role', v_inv.role));
  return private.invite_json(v_inv) || '{"revoked": true}'::jsonb;
end
$$;
comment on function public.revoke_invite(text, uuid) is 'Revoke a pending invite (admin).';
revoke all on function public.revoke_invite(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.revoke_invite(text, uuid) to authenticated;

create function public.accept_invite(token text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_uid uuid := private.require_user();
  v_inv public.org_invites;
  v_email text;
begin
  select * into v_inv from public.org_invites i
  where i.token_hash = private.sha256_hex(btrim(accept_invite.token)) for update;
  if v_inv.id is null then
    perform private.err(404, 'invite_not_found', 'No such invite.');
  elsif v_inv.accepted_at is not null then
    perform private.err(409, 'invite_used', 'This invite has already been used.');
  elsif v_inv.revoked_at is not null then
    perform private.err(409, 'invite_revoked', 'This invite was revoked.');
  elsif v_inv.expires_at <= now() then
    perform private.err(409, 'invite_expired', 'This invite has expired.');
  end if;
  if v_inv.invited_by is not null and not exists (
      select 1 from public.org_members m
      where m.org_id = v_inv.org_id and m.user_id = v_inv.invited_by and m.role = 'admin') then
    perform private.err(409, 'invite_revoked', 'The admin who sent this invite no longer administers the org.');
  end if;
  select lower(u.email) into v_email from auth.users u where u.id = v_uid;
  if v_email is distinct from v_inv.email then
    perform private.err(403, 'invite_email_mismatch', 'This invite is for another email address.');
  end if;
  if exists (select 1 from public.org_members m where m.org_id = v_inv.org_id and m.user_id = v_uid) then
    perform private.err(409, 'already_member', 'You are already a member of this org.');
  end if;
  update public.org_invites i set accepted_at = now(), accepted_by = v_uid where i.id = v_inv.id;
  insert into public.org_members (org_id, user_id, role) values (v_inv.org_id, v_uid, v_inv.role);
  perform private.audit_append(v_inv.org_id, v_inv.org_id, 'invite_accepted', 'invite', v_inv.id::text,
    jsonb_build_object('email', v_inv.email, 'role', v_inv.role, 'user_id', v_uid));
  perform private.audit_append(v_inv.org_id, v_inv.org_id, 'member_added', 'user', v_uid::text,
    jsonb_build_object('user_id', v_uid, 'role', v_inv.role, 'via', 'invite', 'invite_id', v_inv.id));
  return private.org_json(v_inv.org_id, v_inv.role);
end
$$;
comment on function public.accept_invite(text) is 'Join an org with an invite token sent to the caller''s email.';
revoke all on function public.accept_invite(text) from public, anon, authenticated, service_role;
grant execute on function public.accept_invite(text) to authenticated;

-- API keys -----------------------------------------------------------------------------------

create function private.api_key_json(k public.api_keys) returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object('id', k.id, 'name', k.name, 'kind', k.kind, 'prefix', k.key_prefix,
    'user_id', k.user_id, 'org_id', k.org_id, 'created_at', k.created_at, 'last_used_at', k.last_used_at,
    'expires_at', k.expires_at, 'revoked_at', k.revoked_at)
$$;
revoke all on function private.api_key_json(public.api_keys) from public, anon, authenticated, service_role;

create function private.issue_api_key(p_user uuid, p_name text, p_kind text, p_org uuid, p_expires timestamptz)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_secret text;
  v_key public.api_keys;
begin
  if p_kind is null or p_kind not in ('personal', 'service') then
    perform private.err(400, 'invalid_kind', 'kind is personal or service.', '{"field": "kind"}');
  end if;
  if p_name is null or length(btrim(p_name)) not between 1 and 100 then
    perform private.err(400, 'invalid_name', 'A key name is 1-100 characters.', '{"field": "name"}');
  end if;
  if p_expires is not null and p_expires <= now() then
    perform private.err(400, 'invalid_expires_at', 'expires_at must be in the future.', '{"field": "expires_at"}');
  end if;
  v_secret := private.new_secret(case p_kind when 'service' then 'ups_' else 'upk_' end);
  insert into public.api_keys (user_id, org_id, kind, name, key_hash, key_prefix, expires_at)
  values (p_user, p_org, p_kind, btrim(p_name), private.sha256_hex(v_secret), left(v_secret, 12), p_expires)
  returning * into v_key;
  perform private.audit_append(coalesce(p_org, p_user), p_org, 'api_key_created', 'api_key', v_key.id::text,
    jsonb_build_object('name', v_key.name, 'kind', v_key.kind, 'prefix', v_key.key_prefix, 'owner', p_user,
                       'expires_at', v_key.expires_at));
  return private.api_key_json(v_key) || jsonb_build_object('secret', v_secret);
end
$$;
revoke all on function private.issue_api_key(uuid, text, text, uuid, timestamptz) from public, anon, authenticated, service_role;

create function public.create_api_key(name text, kind text default 'personal', org text default null,
                                      expires_at timestamptz default null) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_uid uuid := private.require_user();
  v_org uuid;
begin
  if create_api_key.kind = 'service' then
    v_org := private.org_for(create_api_key.org, array['admin']);
  elsif create_api_key.org is not null then
    v_org := private.org_for(create_api_key.org, array['admin', 'member', 'viewer']);
  end if;
  return private.issue_api_key(v_uid, create_api_key.name, create_api_key.kind, v_org, create_api_key.expires_at);
end
$$;
comment on function public.create_api_key(text, text, text, timestamptz) is
  'Create an API key: personal (acts as you; org binds a default org) or service (an org''s CI key; admin). '
  'Returns the secret once.';
revoke all on function public.create_api_key(text, text, text, timestamptz) from public, anon, authenticated, service_role;
grant execute on function public.create_api_key(text, text, text, timestamptz) to authenticated;

create function public.admin_create_api_key(user_id uuid, name text, kind text default 'personal',
                                            org text default null, expires_at timestamptz default null)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_org uuid;
begin
  perform private.require_backend('admin_create_api_key');
  if admin_create_api_key.org is not null then
    v_org := private.require_org(admin_create_api_key.org);
  end if;
  if not exists (select 1 from auth.users u where u.id = admin_create_api_key.user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;
  if admin_create_api_key.kind = 'service' and v_org is null then
    perform private.err(400, 'org_required', 'A service key belongs to an org.', '{"field": "org"}');
  end if;
  if v_org is not null and not exists (
    select 1 from public.org_members m where m.org_id = v_org and m.user_id = admin_create_api_key.user_id
      and (admin_create_api_key.kind = 'personal' or m.role = 'admin')) then
    perform private.err(403, 'forbidden', 'The key owner must be a member (an admin, for a service key) of the org.');
  end if;
  return private.issue_api_key(admin_create_api_key.user_id, admin_create_api_key.name,
                               admin_create_api_key.kind, v_org, admin_create_api_key.expires_at);
end
$$;
comment on function public.admin_create_api_key(uuid, text, text, text, timestamptz) is
  'Operator (service_role): create an API key for a user.';
revoke all on function public.admin_create_api_key(uuid, text, text, text, timestamptz) from public, anon, authenticated, service_role;
grant execute on function public.admin_create_api_key(uuid, text, text, text, timestamptz) to service_role;  -- backend only

create function public.list_api_keys() returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select coalesce(jsonb_agg(private.api_key_json(k) order by k.created_at, k.id), '[]'::jsonb)
  from public.api_keys k
  where (k.kind = 'personal' and k.user_id = (select auth.uid()))
     or (k.kind = 'service' and private.has_role_on_org(k.org_id, array['admin']))
$$;
comment on function public.list_api_keys() is
  'The caller''s personal keys and the service keys of orgs the caller administers (never secrets).';
revoke all on function public.list_api_keys() from public, anon, authenticated, service_role;
grant execute on function public.list_api_keys() to authenticated;

create function public.revoke_api_key(key_id uuid) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_key public.api_keys;
begin
  -- A service key spends its org's pool: take the org row lock that spends take, so a spend in flight
  -- either finishes before the revocation or sees it.
  perform 1 from public.orgs o
  where o.id = (select k.org_id from public.api_keys k where k.id = revoke_api_key.key_id and k.kind = 'service')
  for update;
  update public.api_keys k set revoked_at = coalesce(k.revoked_at, now())
  where k.id = revoke_api_key.key_id
    and ((k.kind = 'personal' and k.user_id = (select auth.uid()))
         or (k.kind = 'service' and private.has_role_on_org(k.org_id, array['admin'])))
  returning * into v_key;
  if v_key.id is null then
    perform private.err(404, 'api_key_not_found', 'No API key with that id that you can manage.');
  end if;
  perform private.audit_append(coalesce(v_key.org_id, v_key.user_id), v_key.org_id, 'api_key_revoked', 'api_key',
    v_key.id::text, jsonb_build_object('name', v_key.name, 'kind', v_key.kind, 'prefix', v_key.key_prefix));
  return private.api_key_json(v_key);
end
$$;
comment on function public.revoke_api_key(uuid) is 'Revoke an API key at once (its owner, or an admin for service keys).';
revoke all on function public.revoke_api_key(uuid) from public, anon, authenticated, service_role;
grant execute on function public.revoke_api_key(uuid) to authenticated;

create function public.authenticate_api_key(p_key_hash text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_key public.api_keys;
begin
  perform private.require_backend('authenticate_api_key');
  select * into v_key from public.api_keys k where k.key_hash = p_key_hash;
  if v_key.id is null then
    return jsonb_build_object('status', 'unknown');
  end if;
  if v_key.revoked_at is not null then
    return jsonb_build_object('status', 'revoked');
  end if;
  if v_key.expires_at is not null and v_key.expires_at <= now() then
    return jsonb_build_object('status', 'expired');
  end if;
  if v_key.last_used_at is null or v_key.last_used_at < now() - interval '1 minute' then
    update public.api_keys k set last_used_at = now()
    where k.id = v_key.id and (k.last_used_at is null or k.last_used_at < now() - interval '1 minute');
  end if;
  return jsonb_build_object('status', 'active', 'key_id', v_key.id, 'kind', v_key.kind,
                            'user_id', v_key.user_id, 'org_id', v_key.org_id);
end
$$;
comment on function public.authenticate_api_key(text) is
  'Backend only (service_role): look a key up by its SHA-256; touches last_used_at at most once a minute.';
revoke all on function public.authenticate_api_key(text) from public, anon, authenticated, service_role;
grant execute on function public.authenticate_api_key(text) to service_role;  -- backend only

-- Context and profile ------------------------------------------------------------------------

create function public.resolve_org(org text default null) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_id uuid;
  v_source text;
  v_role text;
  v_key_org uuid := nullif((select auth.jwt()) -> 'upshift' ->> 'org_id', '')::uuid;
begin
  if resolve_org.org is not null and btrim(resolve_org.org) <> '' then
    v_id := private.find_org(resolve_org.org);
    v_source := 'explicit';
  elsif v_key_org is not null then
    v_id := v_key_org;
    v_source := 'api_key';
  elsif (select auth.uid()) is not null then
    select p.default_org_id into v_id from public.profiles p where p.id = (select auth.uid());
    v_source := 'default_org';
    if v_id is not null and private.actor_org_role(v_id) is null then
      v_id := null;  -- a stale default (left the org): personal
    end if;
  end if;
  if v_id is null and v_source is distinct from 'explicit' then
    return null;
  end if;
  v_role := case when v_id is not null then private.actor_org_role(v_id) end;
  if v_role is null then
    perform private.err(403, 'org_forbidden',
      format('You are not a member of org %s (or it does not exist).', coalesce(resolve_org.org, v_id::text)),
      jsonb_build_object('org', coalesce(resolve_org.org, v_id::text)));
  end if;
  return private.org_json(v_id, v_role) || jsonb_build_object('source', v_source);
end
$$;
comment on function public.resolve_org(text) is
  'The org context of a request: explicit org (id or slug) -> the API key''s org -> the default org -> '
  'null (personal). An explicit org the caller does not belong to is PT403.';
revoke all on function public.resolve_org(text) from public, anon, authenticated, service_role;
grant execute on function public.resolve_org(text) to authenticated;

create function public.set_default_org(org text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_uid uuid := private.require_user();
  v_org uuid;
begin
  if set_default_org.org is not null then
    v_org := private.org_for(set_default_org.org);
  end if;
  update public.profiles p set default_org_id = v_org where p.id = v_uid;
  return public.me();
end
$$;
revoke all on function public.set_default_org(text) from public, anon, authenticated, service_role;
grant execute on function public.set_default_org(text) to authenticated;

create function public.me() returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select jsonb_build_object(
    'id', p.id, 'email', p.email, 'credit_balance', p.credit_balance, 'plan', p.plan,
    'default_org', (select jsonb_build_object('id', o.id, 'slug', o.slug, 'name', o.name)
                    from public.orgs o where o.id = p.default_org_id),
    'memberships', coalesce((select jsonb_agg(jsonb_build_object(
        'org_id', o.id, 'slug', o.slug, 'name', o.name, 'plan', o.plan, 'role', m.role) order by o.slug)
      from public.org_members m join public.orgs o on o.id = m.org_id where m.user_id = p.id), '[]'::jsonb),
    'created_at', p.created_at)
  from public.profiles p where p.id = (select auth.uid())
$$;
comment on function public.me() is 'The caller''s profile, personal balance, plan, memberships and default org.';
revoke all on function public.me() from public, anon, authenticated, service_role;
grant execute on function public.me() to authenticated;

-- set_default_org is defined before me(): plpgsql resolves names at run time, so that is fine.
comment on function public.set_default_org(text) is 'Select the default org (null clears it).';

-- RLS policies -------------------------------------------------------------------------------

create policy api_keys_select_own_or_admin on public.api_keys for select to authenticated
  using (
    (kind = 'personal' and user_id = (select auth.uid()))
    or (kind = 'service' and (select private.has_role_on_org(org_id, array['admin'])))
  );
create policy org_invites_select_admin on public.org_invites for select to authenticated
  using ((select private.has_role_on_org(org_id, array['admin'])));

