-- Operator RPCs (service_role only): what `upshift-platform` does, so that nobody writes SQL by
-- hand against a hosted database. Each goes through the same private functions as the
-- user-facing RPCs (the same rules, the same audit events, with via = operator), and each
-- refuses an API role even if EXECUTE were granted by mistake.

create function private.operator_org(p_function text, p_org text) returns uuid
language plpgsql stable security definer set search_path = '' as $$
begin
  perform private.require_backend(p_function);
  return (private.context(p_org, array['operator'], 'backend_only', 'do that', true)).org_id;
end $$;
comment on function private.operator_org(text, text) is
  'For an operator RPC: refuse API roles, then resolve the org it names (by id or slug) through private.context.';
revoke all on function private.operator_org(text, text) from public, anon, authenticated, service_role;

create function public.admin_get_org(org text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
begin
  return private.org_json(private.operator_org('admin_get_org', admin_get_org.org), null);
end $$;
comment on function public.admin_get_org(text) is 'Operator: an org by id or slug, with its balance.';
revoke all on function public.admin_get_org(text) from public, anon, authenticated, service_role;
grant execute on function public.admin_get_org(text) to service_role;  -- backend only

create function public.admin_find_user(email text, create_missing boolean default false) returns uuid
language plpgsql volatile security definer set search_path = '' as $$
-- Emails compare case-insensitively, as Supabase Auth treats them.
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
end $$;
comment on function public.admin_find_user(text, boolean) is
  'Operator: a user''s id by email (create_missing adds the auth.users row, for local development).';
revoke all on function public.admin_find_user(text, boolean) from public, anon, authenticated, service_role;
grant execute on function public.admin_find_user(text, boolean) to service_role;  -- backend only

create function public.admin_create_org(name text, slug text, plan text default 'pro', admin_user_id uuid default null)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_id uuid;
begin
  perform private.require_backend('admin_create_org');
  if admin_create_org.admin_user_id is not null
     and not exists (select 1 from auth.users u where u.id = admin_create_org.admin_user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;
  v_id := private.new_org(admin_create_org.name, admin_create_org.slug, admin_create_org.plan,
                          admin_create_org.admin_user_id, 'operator');
  return private.org_json(v_id, null);  -- a statement of its own: a stable function sees the new org
end $$;
comment on function public.admin_create_org(text, text, text, uuid) is 'Operator: create an org (optionally with its first admin).';
revoke all on function public.admin_create_org(text, text, text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_create_org(text, text, text, uuid) to service_role;  -- backend only

create function public.admin_add_member(org text, user_id uuid, role text) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_org uuid := private.operator_org('admin_add_member', admin_add_member.org);
  v_role text := private.check_in(admin_add_member.role, private.member_roles(), 'role');
begin
  if not exists (select 1 from auth.users u where u.id = admin_add_member.user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;
  perform private.lock_membership(v_org, 'operator');
  if exists (select 1 from public.org_members m where m.org_id = v_org and m.user_id = admin_add_member.user_id) then
    return private.change_member_role(v_org, admin_add_member.user_id, v_role, 'operator');
  end if;
  insert into public.org_members (org_id, user_id, role) values (v_org, admin_add_member.user_id, v_role);
  perform private.audit_append(v_org, v_org, 'member_added', 'user', admin_add_member.user_id::text,
    jsonb_build_object('user_id', admin_add_member.user_id, 'role', v_role, 'via', 'operator'));
  return jsonb_build_object('org_id', v_org, 'user_id', admin_add_member.user_id, 'role', v_role);
end $$;
comment on function public.admin_add_member(text, uuid, text) is 'Operator: add a user to an org or set their role.';
revoke all on function public.admin_add_member(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_add_member(text, uuid, text) to service_role;  -- backend only

create function public.admin_set_member_role(org text, user_id uuid, role text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  return private.change_member_role(private.operator_org('admin_set_member_role', admin_set_member_role.org),
                                    admin_set_member_role.user_id, admin_set_member_role.role, 'operator');
end $$;
comment on function public.admin_set_member_role(text, uuid, text) is 'Operator: change a member''s role.';
revoke all on function public.admin_set_member_role(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_member_role(text, uuid, text) to service_role;  -- backend only

create function public.admin_remove_member(org text, user_id uuid) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  return private.delete_member(private.operator_org('admin_remove_member', admin_remove_member.org),
                               admin_remove_member.user_id, 'operator');
end $$;
comment on function public.admin_remove_member(text, uuid) is 'Operator: remove a member (never the last admin).';
revoke all on function public.admin_remove_member(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_remove_member(text, uuid) to service_role;  -- backend only

create function public.admin_create_api_key(user_id uuid, name text, kind text default 'personal',
                                            org text default null, expires_at timestamptz default null)
returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_org uuid;
begin
  perform private.require_backend('admin_create_api_key');
  if admin_create_api_key.org is not null then
    v_org := private.operator_org('admin_create_api_key', admin_create_api_key.org);
  end if;
  if not exists (select 1 from auth.users u where u.id = admin_create_api_key.user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;
  if v_org is not null and not exists (
    select 1 from public.org_members m where m.org_id = v_org and m.user_id = admin_create_api_key.user_id
      and (admin_create_api_key.kind = 'personal' or m.role = 'admin')) then
    perform private.err(403, 'forbidden', 'The key owner must be a member (an admin, for a service key) of the org.');
  end if;
  return private.issue_api_key(admin_create_api_key.user_id, admin_create_api_key.name,
                               admin_create_api_key.kind, v_org, admin_create_api_key.expires_at);
end $$;
comment on function public.admin_create_api_key(uuid, text, text, text, timestamptz) is
  'Operator: create an API key for a user (for a service key, an admin of the org). Returns the secret once.';
revoke all on function public.admin_create_api_key(uuid, text, text, text, timestamptz)
  from public, anon, authenticated, service_role;
grant execute on function public.admin_create_api_key(uuid, text, text, text, timestamptz) to service_role;  -- backend only

create function public.admin_revoke_api_key(key_id uuid) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  perform private.require_backend('admin_revoke_api_key');
  return private.revoke_key(admin_revoke_api_key.key_id, 'operator');
end $$;
comment on function public.admin_revoke_api_key(uuid) is 'Operator: revoke any API key at once.';
revoke all on function public.admin_revoke_api_key(uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_revoke_api_key(uuid) to service_role;  -- backend only

create function public.admin_set_org_plan(org text, plan text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_org uuid := private.operator_org('admin_set_org_plan', admin_set_org_plan.org);
  v_old text;
begin
  perform private.check_in(admin_set_org_plan.plan, private.org_plans(), 'plan');
  select o.plan into v_old from public.orgs o where o.id = v_org for update;
  if v_old <> admin_set_org_plan.plan then
    update public.orgs o set plan = admin_set_org_plan.plan where o.id = v_org;
    perform private.audit_append(v_org, v_org, 'plan_changed', 'org', v_org::text,
      jsonb_build_object('from', v_old, 'to', admin_set_org_plan.plan, 'via', 'operator'));
  end if;
  return private.org_json(v_org, null);
end $$;
comment on function public.admin_set_org_plan(text, text) is
  'Operator: set an org''s plan by hand (a comped account); Stripe subscriptions set it otherwise.';
revoke all on function public.admin_set_org_plan(text, text) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_org_plan(text, text) to service_role;  -- backend only

create function public.admin_set_slices(org text, slices integer) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_org uuid := private.operator_org('admin_set_slices', admin_set_slices.org);
  v_total bigint;
begin
  if admin_set_slices.slices is null or admin_set_slices.slices not between 1 and 64 then
    perform private.err(400, 'invalid_slices', 'slices is 1-64 (1: one balance row).', '{"field": "slices"}');
  end if;
  v_total := private.lock_account(v_org);
  perform private.spread_pool(v_org, v_total, admin_set_slices.slices, 'operator');
  return jsonb_build_object('org_id', v_org, 'slices', admin_set_slices.slices, 'balance', v_total);
end $$;
comment on function public.admin_set_slices(text, integer) is
  'Operator: spread an org''s pool over this many rows (a hot org''s spends then take different rows); '
  'ledger-neutral, audited as credit_pool_rebalanced.';
revoke all on function public.admin_set_slices(text, integer) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_slices(text, integer) to service_role;  -- backend only

create function public.admin_set_prices(prices jsonb, replace_all boolean default false) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
-- Each price is checked before it is written; with replace_all, actions not named are dropped afterwards.
declare
  r record;
begin
  perform private.require_backend('admin_set_prices');
  if jsonb_typeof(admin_set_prices.prices) is distinct from 'object' or admin_set_prices.prices = '{}'::jsonb then
    perform private.err(400, 'invalid_prices', 'prices is a JSON object of action -> credits, e.g. {"explain": 1}.',
                        '{"field": "prices"}');
  end if;
  for r in select key, value from jsonb_each(admin_set_prices.prices) loop
    if r.key !~ '^[a-z][a-z0-9_.]{0,39}$' or jsonb_typeof(r.value) <> 'number' or r.value::text !~ '^\d+$'
       or (r.value::text)::numeric not between 1 and 1000000 then
      perform private.err(400, 'invalid_prices',
        format('%s: an action is a-z0-9_. (1-40 characters) and costs 1-1000000 credits.', r.key),
        jsonb_build_object('field', 'prices.' || r.key));
    end if;
    insert into public.credit_prices as p (action, credits) values (r.key, (r.value::text)::integer)
    on conflict (action) do update set credits = excluded.credits, updated_at = now()
      where p.credits <> excluded.credits;
  end loop;
  if admin_set_prices.replace_all then
    delete from public.credit_prices p where not admin_set_prices.prices ? p.action;
  end if;
  return (select jsonb_object_agg(p.action, p.credits order by p.action) from public.credit_prices p);
end $$;
comment on function public.admin_set_prices(jsonb, boolean) is
  'Operator: set what actions cost ({"explain": 1, ...}); replace_all drops the actions not named. Returns all.';
revoke all on function public.admin_set_prices(jsonb, boolean) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_prices(jsonb, boolean) to service_role;  -- backend only

create function public.admin_verify_audit_log(org text default null, user_id uuid default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_scope uuid;
begin
  perform private.require_backend('admin_verify_audit_log');
  if (admin_verify_audit_log.org is null) = (admin_verify_audit_log.user_id is null) then
    perform private.err(400, 'invalid_account', 'Give exactly one of org and user_id.');
  end if;
  v_scope := coalesce(admin_verify_audit_log.user_id,
                      private.operator_org('admin_verify_audit_log', admin_verify_audit_log.org));
  perform private.seal_audit_scope(v_scope);
  return private.verify_audit_scope(v_scope);
end $$;
comment on function public.admin_verify_audit_log(text, uuid) is 'Operator: verify any scope''s chain.';
revoke all on function public.admin_verify_audit_log(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.admin_verify_audit_log(text, uuid) to service_role;  -- backend only

create function public.admin_set_audit_retention(org text, days integer) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_org uuid := private.operator_org('admin_set_audit_retention', admin_set_audit_retention.org);
begin
  if admin_set_audit_retention.days is not null and admin_set_audit_retention.days not between 1 and 3650 then
    perform private.err(400, 'invalid_days', 'days is 1-3650, or null for the plan default.', '{"field": "days"}');
  end if;
  update public.orgs o set audit_retention_days = admin_set_audit_retention.days where o.id = v_org;
  return jsonb_build_object('org_id', v_org, 'audit_retention_days', admin_set_audit_retention.days,
                            'effective_days', private.audit_retention_days(v_org));
end $$;
comment on function public.admin_set_audit_retention(text, integer) is
  'Operator: set an org''s audit retention in days (null: by plan).';
revoke all on function public.admin_set_audit_retention(text, integer) from public, anon, authenticated, service_role;
grant execute on function public.admin_set_audit_retention(text, integer) to service_role;  -- backend only
