-- Operator RPCs (service_role only): what `upshift-platform` does so that nobody writes SQL by
-- hand against a hosted database. Each keeps the same rules as the user-facing RPCs.

create function public.admin_find_user(email text, create_missing boolean default false) returns uuid
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v uuid;
begin
  perform private.require_backend('admin_find_user');
  if admin_find_user.email is null or admin_find_user.email !~ '^[^@\s]+@[^@\s]+$' then
    perform private.err(400, 'invalid_email', 'email is not an email address.', '{"field": "email"}');
  end if;
  select u.id into v from auth.users u where lower(u.email) = lower(btrim(admin_find_user.email));
  if v is null and admin_find_user.create_missing then
    insert into auth.users (email) values (lower(btrim(admin_find_user.email))) returning id into v;
  end if;
  if v is null then
    perform private.err(404, 'user_not_found', format('No user with email %s.', admin_find_user.email));
  end if;
  return v;
end
$$;
comment on function public.admin_find_user(text, boolean) is
  'Operator: a user''s id by email (create_missing adds the auth.users row, for local development).';
revoke all on function public.admin_find_user(text, boolean) from public, anon, authenticated, service_role;
grant execute on function public.admin_find_user(text, boolean) to service_role;  -- backend only

create function public.admin_create_org(name text, slug text, plan text default 'pro', admin_user_id uuid default null)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  perform private.require_backend('admin_create_org');
  if admin_create_org.plan not in ('pro', 'team') then
    perform private.err(400, 'invalid_plan', 'plan is pro or team.', '{"field": "plan"}');
  end if;
  insert into public.orgs (slug, name, plan)
  values (private.check_slug(coalesce(admin_create_org.slug, '')), private.check_name(coalesce(admin_create_org.name, '')),
          admin_create_org.plan)
  on conflict on constraint orgs_slug_key do nothing
  returning id into v_id;
  if v_id is null then
    perform private.err(409, 'slug_taken', format('The slug %s is taken.', lower(btrim(admin_create_org.slug))),
                        '{"field": "slug"}');
  end if;
  perform private.audit_append(v_id, v_id, 'org_created', 'org', v_id::text,
    jsonb_build_object('slug', lower(btrim(admin_create_org.slug)), 'name', btrim(admin_create_org.name),
                       'plan', admin_create_org.plan, 'via', 'operator'));
  if admin_create_org.admin_user_id is not null then
    perform public.admin_add_member(v_id::text, admin_create_org.admin_user_id, 'admin');
  end if;
  return private.org_json(v_id, null);
end
$$;
comment on function public.admin_create_org(text, text, text, uuid) is 'Operator: create an org (optionally with its first admin).';
revoke all on function public.admin_create_org(text, text, text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_create_org(text, text, text, uuid) to service_role;  -- backend only

create function public.admin_set_member_role(org text, user_id uuid, role text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_org uuid;
begin
  perform private.require_backend('admin_set_member_role');
  v_org := private.require_org(admin_set_member_role.org);
  return private.change_member_role(v_org, admin_set_member_role.user_id, admin_set_member_role.role, 'operator');
end
$$;
revoke all on function public.admin_set_member_role(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_member_role(text, uuid, text) to service_role;  -- backend only

create function public.admin_remove_member(org text, user_id uuid) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_org uuid;
begin
  perform private.require_backend('admin_remove_member');
  v_org := private.require_org(admin_remove_member.org);
  return private.delete_member(v_org, admin_remove_member.user_id, 'operator');
end
$$;
revoke all on function public.admin_remove_member(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_remove_member(text, uuid) to service_role;  -- backend only

create function public.admin_revoke_api_key(key_id uuid) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_key public.api_keys;
begin
  perform private.require_backend('admin_revoke_api_key');
  perform 1 from public.orgs o
  where o.id = (select k.org_id from public.api_keys k where k.id = admin_revoke_api_key.key_id and k.kind = 'service')
  for update;
  update public.api_keys k set revoked_at = coalesce(k.revoked_at, now()) where k.id = admin_revoke_api_key.key_id
  returning * into v_key;
  if v_key.id is null then
    perform private.err(404, 'api_key_not_found', 'No API key with that id.');
  end if;
  perform private.audit_append(coalesce(v_key.org_id, v_key.user_id), v_key.org_id, 'api_key_revoked', 'api_key',
    v_key.id::text, jsonb_build_object('name', v_key.name, 'kind', v_key.kind, 'prefix', v_key.key_prefix,
                                       'via', 'operator'));
  return private.api_key_json(v_key);
end
$$;
revoke all on function public.admin_revoke_api_key(uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_revoke_api_key(uuid) to service_role;  -- backend only

create function public.admin_set_org_plan(org text, plan text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_org uuid;
  v_old text;
begin
  perform private.require_backend('admin_set_org_plan');
  v_org := private.require_org(admin_set_org_plan.org);
  if admin_set_org_plan.plan not in ('pro', 'team') then
    perform private.err(400, 'invalid_plan', 'plan is pro or team.', '{"field": "plan"}');
  end if;
  select o.plan into v_old from public.orgs o where o.id = v_org for update;
  if v_old <> admin_set_org_plan.plan then
    update public.orgs o set plan = admin_set_org_plan.plan where o.id = v_org;
    perform private.audit_append(v_org, v_org, 'plan_changed', 'org', v_org::text,
      jsonb_build_object('from', v_old, 'to', admin_set_org_plan.plan, 'via', 'operator'));
  end if;
  return private.org_json(v_org, null);
end
$$;
comment on function public.admin_set_org_plan(text, text) is
  'Operator: set an org''s plan by hand (a comped account); Stripe subscriptions set it otherwise.';
revoke all on function public.admin_set_org_plan(text, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_org_plan(text, text) to service_role;  -- backend only

