-- API keys (UPSHIFT_API_TOKEN): the table, and how a request authenticates with one.
--
-- A personal key (upk_...) acts as its user; an org service key (ups_...) acts for its org as a
-- service actor, not as a user: that is how CI spends the pool and records events. Only the
-- SHA-256 of a key is stored. Creating, listing and revoking keys: the api_key_management
-- migration.

create function private.api_key_kinds() returns text[]
language sql immutable set search_path = '' as $$ select array['personal', 'service'] $$;
comment on function private.api_key_kinds() is 'personal (acts as its user) or service (an org''s CI key).';
revoke all on function private.api_key_kinds() from public, anon, authenticated, service_role;

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
  constraint api_keys_kind_check check (kind = any (private.api_key_kinds())),
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
-- Direct reads for PostgREST clients (never the hash); writes only through RPCs.
grant select (id, user_id, org_id, kind, name, key_prefix, created_at, last_used_at, expires_at, revoked_at)
  on table public.api_keys to authenticated;

create policy api_keys_select_own_or_admin on public.api_keys for select to authenticated
  using (
    (kind = 'personal' and user_id = (select auth.uid()))
    or (kind = 'service' and (select private.has_role_on_org(org_id, array['admin'])))
  );

create function public.authenticate_api_key(p_key_hash text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
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
end $$;
comment on function public.authenticate_api_key(text) is
  'Backend only (service_role): look a key up by its SHA-256; touches last_used_at at most once a minute.';
revoke all on function public.authenticate_api_key(text) from public, anon, authenticated, service_role;
grant execute on function public.authenticate_api_key(text) to service_role;  -- backend only

-- Hot-path helpers are plpgsql: their plans are cached per session, while a SQL function with a
-- SET clause is neither inlined nor plan-cached (it is planned again on every call).
create function private.service_key() returns table (key_id uuid, org_id uuid)
language plpgsql stable security definer set search_path = '' as $$
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
end $$;
comment on function private.service_key() is
  'The active org service key the caller acts as (claims set after the key was verified), if any.';
revoke all on function private.service_key() from public, anon, authenticated, service_role;
