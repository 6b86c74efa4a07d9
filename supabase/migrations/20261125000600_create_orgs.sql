-- Org context: which org a request is about, and the caller's role there. One resolver,
-- private.context(), used by every RPC that takes an org, so that every path (spending, audit,
-- billing, org management, the operator CLI) reads the context in the same order:
--
--   the org named in the request (id or slug; the functions pass org_id or X-Upshift-Org)
--   -> the org the API key is bound to -> the caller's default org -> none (personal).
--
-- An org named explicitly that the caller does not belong to (or that does not exist) is PT403
-- org_forbidden, never a silent fallback to personal credits.

create function private.find_org(p_org text) returns uuid
language plpgsql stable security definer set search_path = '' as $$
begin
  -- Two separate indexed lookups (a single predicate mixing id and slug could not use either index).
  if btrim(p_org) ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    return (select o.id from public.orgs o where o.id = btrim(p_org)::uuid);
  end if;
  return (select o.id from public.orgs o where o.slug = lower(btrim(p_org)));
end $$;
comment on function private.find_org(text) is 'An org by id or slug (no access check; private.context checks).';
revoke all on function private.find_org(text) from public, anon, authenticated, service_role;

create function private.actor_role(p_org_id uuid) returns text
language plpgsql stable security definer set search_path = '' as $$
declare
  v_uid uuid := (select auth.uid());
begin
  if v_uid is not null then
    return (select m.role from public.org_members m where m.org_id = p_org_id and m.user_id = v_uid);
  end if;
  return (select 'service' from private.service_key() s where s.org_id = p_org_id);
end $$;
comment on function private.actor_role(uuid) is
  'The caller''s role in the org, read now: admin, member, viewer, service (an active org service key) or null.';
revoke all on function private.actor_role(uuid) from public, anon, authenticated, service_role;

create type private.org_context as (
  org_id uuid,    -- null: personal (no org)
  slug text,
  role text,      -- admin, member, viewer, service, or operator (the backend naming an org)
  source text     -- explicit, api_key, default_org, personal
);
comment on type private.org_context is 'What private.context() resolved: the org, the caller''s role there, and why.';

create function private.context(p_org text, p_roles text[] default null, p_code text default 'forbidden',
                                p_what text default 'do that', p_need_org boolean default false)
returns private.org_context
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context;
  v_explicit boolean := p_org is not null and btrim(p_org) <> '';
  v_key_org uuid;
begin
  if v_explicit then
    c.org_id := private.find_org(p_org);
    c.source := 'explicit';
  else
    v_key_org := nullif((select auth.jwt()) -> 'upshift' ->> 'org_id', '')::uuid;
    if v_key_org is not null then
      c.org_id := v_key_org;
      c.source := 'api_key';
    elsif (select auth.uid()) is not null then
      select p.default_org_id into c.org_id from public.profiles p where p.id = (select auth.uid());
      c.source := 'default_org';
    end if;
  end if;
  if c.org_id is not null then
    -- The operator (service_role, or a direct connection) may name any org; everyone else is
    -- whatever their membership (or service key) says, read now.
    c.role := case when v_explicit and private.is_backend() then 'operator' else private.actor_role(c.org_id) end;
    if c.role is null and c.source = 'default_org' then
      c.org_id := null;  -- a stale default (the caller left that org): personal
    end if;
  end if;
  if c.org_id is null and not v_explicit then
    if p_need_org then
      perform private.err(400, 'org_required', 'Name an org (its id or slug).', '{"field": "org_id"}');
    end if;
    c.source := 'personal';
    return c;
  end if;
  if c.org_id is null and private.is_backend() then
    perform private.err(404, 'org_not_found', format('No org %s.', btrim(p_org)), jsonb_build_object('org', btrim(p_org)));
  end if;
  if c.role is null then
    perform private.err(403, 'org_forbidden',
      format('You are not a member of org %s (or it does not exist).', coalesce(btrim(p_org), c.org_id::text)),
      jsonb_build_object('org', coalesce(btrim(p_org), c.org_id::text)));
  end if;
  select o.slug into c.slug from public.orgs o where o.id = c.org_id;
  if p_roles is not null and not c.role = any (p_roles) then
    perform private.err(403, p_code,
      format('Your role in org %s is %s, which cannot %s (needs %s).', c.slug, c.role, p_what,
             array_to_string(p_roles, ' or ')),
      jsonb_build_object('org', c.slug, 'org_id', c.org_id, 'role', c.role, 'required', to_jsonb(p_roles)));
  end if;
  return c;
end $$;
comment on function private.context(text, text[], text, text, boolean) is
  'Resolve a request''s org (explicit -> API key''s -> default -> personal), the caller''s role there (PT403 '
  'org_forbidden if none), and, with p_roles, that the role is one of them (PT403 p_code). p_need_org: personal '
  'is PT400 org_required.';
revoke all on function private.context(text, text[], text, text, boolean) from public, anon, authenticated, service_role;

-- Orgs -----------------------------------------------------------------------------------------

create function private.org_json(p_org_id uuid, p_role text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
begin
  return (select jsonb_build_object(
    'id', o.id, 'slug', o.slug, 'name', o.name, 'plan', o.plan,
    'credit_balance', private.account_balance(a.id), 'role', p_role,
    'created_at', o.created_at, 'updated_at', o.updated_at)
  from public.orgs o join public.credit_accounts a on a.id = o.id where o.id = p_org_id);
end $$;
comment on function private.org_json(uuid, text) is 'An org as the API answers it, with its balance and the caller''s role.';
revoke all on function private.org_json(uuid, text) from public, anon, authenticated, service_role;

create function public.resolve_org(org text default null) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(resolve_org.org);
begin
  if c.org_id is null then
    return null;
  end if;
  return private.org_json(c.org_id, c.role) || jsonb_build_object('source', c.source);
end $$;
comment on function public.resolve_org(text) is
  'The org context of a request: explicit org (id or slug) -> the API key''s org -> the default org -> '
  'null (personal). An explicit org the caller does not belong to is PT403 org_forbidden.';
revoke all on function public.resolve_org(text) from public, anon, authenticated, service_role;
grant execute on function public.resolve_org(text) to authenticated;

create function private.new_org(p_name text, p_slug text, p_plan text, p_admin uuid, p_via text) returns uuid
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_id uuid;
begin
  insert into public.orgs (slug, name, plan)
  values (private.check_slug(coalesce(p_slug, '')), private.check_name(coalesce(p_name, '')),
          private.check_in(p_plan, private.org_plans(), 'plan'))
  on conflict on constraint orgs_slug_key do nothing
  returning id into v_id;
  if v_id is null then
    perform private.err(409, 'slug_taken', format('The slug %s is taken.', lower(btrim(p_slug))), '{"field": "slug"}');
  end if;
  perform private.audit_append(v_id, v_id, 'org_created', 'org', v_id::text,
    jsonb_strip_nulls(jsonb_build_object('slug', lower(btrim(p_slug)), 'name', btrim(p_name), 'plan', p_plan,
                                         'via', p_via)));
  if p_admin is not null then
    insert into public.org_members (org_id, user_id, role) values (v_id, p_admin, 'admin');
    perform private.audit_append(v_id, v_id, 'member_added', 'user', p_admin::text,
      jsonb_build_object('user_id', p_admin, 'role', 'admin', 'via', coalesce(p_via, 'create_org')));
  end if;
  return v_id;
end $$;
comment on function private.new_org(text, text, text, uuid, text) is
  'Create an org (and its credit account, by trigger) with its first admin; audited.';
revoke all on function private.new_org(text, text, text, uuid, text) from public, anon, authenticated, service_role;

create function public.create_org(name text, slug text) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_id uuid := private.new_org(create_org.name, create_org.slug, 'pro', private.require_user(), null);
begin
  return private.org_json(v_id, 'admin');  -- a statement of its own: a stable function sees the new org
end $$;
comment on function public.create_org(text, text) is 'Create an org; the caller becomes its admin.';
revoke all on function public.create_org(text, text) from public, anon, authenticated, service_role;
grant execute on function public.create_org(text, text) to authenticated;

create function public.get_org(org text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(get_org.org, p_need_org => true);
begin
  return private.org_json(c.org_id, c.role);
end $$;
comment on function public.get_org(text) is 'An org the caller belongs to, with the caller''s role.';
revoke all on function public.get_org(text) from public, anon, authenticated, service_role;
grant execute on function public.get_org(text) to authenticated;

create function public.list_my_orgs() returns jsonb
language sql stable security definer set search_path = '' as $$
  select coalesce(jsonb_agg(private.org_json(m.org_id, m.role) order by o.slug), '[]'::jsonb)
  from public.org_members m join public.orgs o on o.id = m.org_id
  where m.user_id = (select auth.uid())
$$;
comment on function public.list_my_orgs() is 'The caller''s orgs with their role in each.';
revoke all on function public.list_my_orgs() from public, anon, authenticated, service_role;
grant execute on function public.list_my_orgs() to authenticated;

create function public.update_org(org text, name text default null, slug text default null) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  c private.org_context := private.context(update_org.org, array['admin'], 'forbidden', 'change the org', true);
begin
  begin
    update public.orgs o set
      name = coalesce(private.check_name(update_org.name), o.name),
      slug = coalesce(private.check_slug(update_org.slug), o.slug)
    where o.id = c.org_id;
    perform private.audit_append(c.org_id, c.org_id, 'org_updated', 'org', c.org_id::text,
      jsonb_strip_nulls(jsonb_build_object('name', btrim(update_org.name), 'slug', lower(btrim(update_org.slug)))));
  exception when unique_violation then
    perform private.err(409, 'slug_taken', format('The slug %s is taken.', lower(btrim(update_org.slug))),
                        '{"field": "slug"}');
  end;
  return private.org_json(c.org_id, c.role);
end $$;
comment on function public.update_org(text, text, text) is 'Rename an org or change its slug (admin); audited.';
revoke all on function public.update_org(text, text, text) from public, anon, authenticated, service_role;
grant execute on function public.update_org(text, text, text) to authenticated;

-- The caller -------------------------------------------------------------------------------------

create function public.me() returns jsonb
language sql stable security definer set search_path = '' as $$
  select jsonb_build_object(
    'id', p.id, 'email', p.email, 'credit_balance', private.account_balance(a.id), 'plan', p.plan,
    'default_org', (select jsonb_build_object('id', o.id, 'slug', o.slug, 'name', o.name)
                    from public.orgs o where o.id = p.default_org_id),
    'memberships', coalesce((select jsonb_agg(jsonb_build_object(
        'org_id', o.id, 'slug', o.slug, 'name', o.name, 'plan', o.plan, 'role', m.role) order by o.slug)
      from public.org_members m join public.orgs o on o.id = m.org_id where m.user_id = p.id), '[]'::jsonb),
    'created_at', p.created_at)
  from public.profiles p join public.credit_accounts a on a.id = p.id where p.id = (select auth.uid())
$$;
comment on function public.me() is 'The caller''s profile, personal balance, plan, memberships and default org.';
revoke all on function public.me() from public, anon, authenticated, service_role;
grant execute on function public.me() to authenticated;

create function public.set_default_org(org text) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_uid uuid := private.require_user();
  v_org uuid;
begin
  if set_default_org.org is not null then
    v_org := (private.context(set_default_org.org, p_need_org => true)).org_id;
  end if;
  update public.profiles p set default_org_id = v_org where p.id = v_uid;
  return public.me();
end $$;
comment on function public.set_default_org(text) is 'Select the default org (null clears it).';
revoke all on function public.set_default_org(text) from public, anon, authenticated, service_role;
grant execute on function public.set_default_org(text) to authenticated;
