-- Creating, listing and revoking API keys (the table and authentication: the api_keys migration).
--
-- A personal key belongs to its user (bound to an org, it gives that org as the default
-- context); an org's service key is created by an org admin and dies with their admin rights
-- (the members migration). The secret is returned once and never stored.

create function private.api_key_json(k public.api_keys) returns jsonb
language sql stable set search_path = '' as $$
  select jsonb_build_object('id', k.id, 'name', k.name, 'kind', k.kind, 'prefix', k.key_prefix,
    'user_id', k.user_id, 'org_id', k.org_id, 'created_at', k.created_at, 'last_used_at', k.last_used_at,
    'expires_at', k.expires_at, 'revoked_at', k.revoked_at)
$$;
comment on function private.api_key_json(public.api_keys) is 'An API key as the API answers it (never the hash).';
revoke all on function private.api_key_json(public.api_keys) from public, anon, authenticated, service_role;

create function private.issue_api_key(p_user uuid, p_name text, p_kind text, p_org uuid, p_expires timestamptz)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_secret text;
  v_key public.api_keys;
begin
  perform private.check_in(p_kind, private.api_key_kinds(), 'kind');
  if p_name is null or length(btrim(p_name)) not between 1 and 100 then
    perform private.err(400, 'invalid_name', 'A key name is 1-100 characters.', '{"field": "name"}');
  end if;
  if p_expires is not null and p_expires <= now() then
    perform private.err(400, 'invalid_expires_at', 'expires_at must be in the future.', '{"field": "expires_at"}');
  end if;
  if p_kind = 'service' and p_org is null then
    perform private.err(400, 'org_required', 'A service key belongs to an org.', '{"field": "org"}');
  end if;
  v_secret := private.new_secret(case p_kind when 'service' then 'ups_' else 'upk_' end);
  insert into public.api_keys (user_id, org_id, kind, name, key_hash, key_prefix, expires_at)
  values (p_user, p_org, p_kind, btrim(p_name), private.sha256_hex(v_secret), left(v_secret, 12), p_expires)
  returning * into v_key;
  perform private.audit_append(coalesce(p_org, p_user), p_org, 'api_key_created', 'api_key', v_key.id::text,
    jsonb_build_object('name', v_key.name, 'kind', v_key.kind, 'prefix', v_key.key_prefix, 'owner', p_user,
                       'expires_at', v_key.expires_at));
  return private.api_key_json(v_key) || jsonb_build_object('secret', v_secret);
end $$;
comment on function private.issue_api_key(uuid, text, text, uuid, timestamptz) is
  'Create a key for p_user (checked arguments; audited); returns it with its secret, once.';
revoke all on function private.issue_api_key(uuid, text, text, uuid, timestamptz)
  from public, anon, authenticated, service_role;

create function private.revoke_key(p_key_id uuid, p_via text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_key public.api_keys;
begin
  -- A service key spends its org's pool: take the lock spends take, so a spend in flight either
  -- finishes before the revocation or sees it.
  perform private.lock_account(k.org_id) from public.api_keys k where k.id = p_key_id and k.kind = 'service';
  update public.api_keys k set revoked_at = coalesce(k.revoked_at, clock_timestamp())  -- when it took effect
  where k.id = p_key_id
    and (p_via is not null  -- the operator, or the platform on a member's removal
         or (k.kind = 'personal' and k.user_id = (select auth.uid()))
         or (k.kind = 'service' and private.has_role_on_org(k.org_id, array['admin'])))
  returning * into v_key;
  if v_key.id is null then
    perform private.err(404, 'api_key_not_found', 'No API key with that id that you can manage.');
  end if;
  perform private.audit_append(coalesce(v_key.org_id, v_key.user_id), v_key.org_id, 'api_key_revoked', 'api_key',
    v_key.id::text, jsonb_strip_nulls(jsonb_build_object('name', v_key.name, 'kind', v_key.kind,
      'prefix', v_key.key_prefix, 'owner', v_key.user_id, 'via', p_via)));
  return private.api_key_json(v_key);
end $$;
comment on function private.revoke_key(uuid, text) is
  'Revoke a key at once and audit it: the caller''s own or, as an admin, an org''s service key (p_via null), or any '
  'key for p_via (operator, member_removed, member_demoted).';
revoke all on function private.revoke_key(uuid, text) from public, anon, authenticated, service_role;

create function public.create_api_key(name text, kind text default 'personal', org text default null,
                                      expires_at timestamptz default null) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_uid uuid := private.require_user();
  v_org uuid;
begin
  if create_api_key.org is not null or create_api_key.kind = 'service' then
    v_org := (private.context(create_api_key.org,
      case when create_api_key.kind = 'service' then array['admin'] end, 'forbidden', 'create its service keys',
      true)).org_id;
  end if;
  if create_api_key.kind = 'service' then
    -- Under the lock membership changes take, and with the admin role read again: a key created while its
    -- creator is being demoted or removed either exists before that change (which then revokes it) or not at all.
    perform private.lock_membership(v_org, 'admin');
  end if;
  return private.issue_api_key(v_uid, create_api_key.name, create_api_key.kind, v_org, create_api_key.expires_at);
end $$;
comment on function public.create_api_key(text, text, text, timestamptz) is
  'Create an API key: personal (acts as you; org binds a default org) or service (an org''s CI key; admin). '
  'Returns the secret once.';
revoke all on function public.create_api_key(text, text, text, timestamptz) from public, anon, authenticated, service_role;
grant execute on function public.create_api_key(text, text, text, timestamptz) to authenticated;

create function public.list_api_keys() returns jsonb
language sql stable security definer set search_path = '' as $$
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
language plpgsql security definer set search_path = '' as $$
begin
  return private.revoke_key(revoke_api_key.key_id, null);
end $$;
comment on function public.revoke_api_key(uuid) is 'Revoke an API key at once (its owner, or an admin for service keys).';
revoke all on function public.revoke_api_key(uuid) from public, anon, authenticated, service_role;
grant execute on function public.revoke_api_key(uuid) to authenticated;
