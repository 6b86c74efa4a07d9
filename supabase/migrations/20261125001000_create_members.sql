-- Members: listing them, changing roles, removing (or leaving).
--
-- Every change locks the org first (private.lock_org: the lock spends from the pool take), then
-- re-reads what it depends on: the caller's admin role and the number of admins, so that two
-- admins demoting each other cannot leave the org without one, and a spend in flight either
-- finishes before a removal or sees it. A member who stops being an admin loses what they handed
-- out as one: the org's service keys they created and their pending invites.

create function public.list_members(org text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(list_members.org, p_need_org => true);
begin
  return (
    select coalesce(jsonb_agg(jsonb_build_object(
      'user_id', m.user_id, 'email', u.email, 'role', m.role, 'created_at', m.created_at)
      order by m.created_at, m.user_id), '[]'::jsonb)
    from public.org_members m join auth.users u on u.id = m.user_id
    where m.org_id = c.org_id);
end $$;
comment on function public.list_members(text) is 'Members of an org the caller belongs to.';
revoke all on function public.list_members(text) from public, anon, authenticated, service_role;
grant execute on function public.list_members(text) to authenticated;

create function private.lock_membership(p_org uuid, p_via text) returns integer
language plpgsql volatile security definer set search_path = '' as $$
begin
  perform private.lock_account(p_org);
  -- Read after the lock (each statement of a volatile function takes a new snapshot): the caller's
  -- role as it is now, not as it was when the request started, and the number of admins left.
  if p_via = 'admin' and not exists (
      select 1 from public.org_members m
      where m.org_id = p_org and m.user_id = (select auth.uid()) and m.role = 'admin') then
    perform private.err(403, 'forbidden', 'You are no longer an admin of this org.',
                        jsonb_build_object('org_id', p_org));
  end if;
  return (select count(*)::integer from public.org_members m where m.org_id = p_org and m.role = 'admin');
end $$;
comment on function private.lock_membership(uuid, text) is
  'Lock the org for a membership change, re-check an admin caller (p_via = admin) and count the admins.';
revoke all on function private.lock_membership(uuid, text) from public, anon, authenticated, service_role;

create function private.revoke_member_grants(p_org uuid, p_user uuid, p_via text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  return jsonb_build_object(
    'revoked_api_keys', coalesce((
      select jsonb_agg(private.revoke_key(k.id, p_via) order by k.created_at) from public.api_keys k
      where k.org_id = p_org and k.kind = 'service' and k.user_id = p_user and k.revoked_at is null), '[]'::jsonb),
    'revoked_invites', coalesce((
      select jsonb_agg(private.revoke_invite_row(i.id, p_org, p_via) order by i.created_at) from public.org_invites i
      where i.org_id = p_org and i.invited_by = p_user and i.accepted_at is null and i.revoked_at is null),
      '[]'::jsonb));
end $$;
comment on function private.revoke_member_grants(uuid, uuid, text) is
  'Revoke the org''s service keys a member created and their pending invites (on removal or demotion from admin).';
revoke all on function private.revoke_member_grants(uuid, uuid, text) from public, anon, authenticated, service_role;

create function private.change_member_role(p_org uuid, p_user uuid, p_role text, p_via text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_new text := private.check_in(p_role, private.member_roles(), 'role');
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
end $$;
comment on function private.change_member_role(uuid, uuid, text, text) is
  'Set a member''s role (never demoting the last admin); audited. p_via: admin, operator.';
revoke all on function private.change_member_role(uuid, uuid, text, text) from public, anon, authenticated, service_role;

create function private.delete_member(p_org uuid, p_user uuid, p_via text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
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
end $$;
comment on function private.delete_member(uuid, uuid, text) is
  'Remove a member (never the last admin), clear it as their default org, revoke what they handed out; audited.';
revoke all on function private.delete_member(uuid, uuid, text) from public, anon, authenticated, service_role;

create function public.set_member_role(org text, user_id uuid, role text) returns jsonb
language plpgsql security definer set search_path = '' as $$
begin
  return private.change_member_role(
    (private.context(set_member_role.org, array['admin'], 'forbidden', 'change roles', true)).org_id,
    set_member_role.user_id, set_member_role.role, 'admin');
end $$;
comment on function public.set_member_role(text, uuid, text) is 'Change a member''s role (admin; never the last admin).';
revoke all on function public.set_member_role(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.set_member_role(text, uuid, text) to authenticated;

create function public.remove_member(org text, user_id uuid) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_self boolean := remove_member.user_id = (select auth.uid());
begin
  return private.delete_member(
    (private.context(remove_member.org, case when v_self then null else array['admin'] end, 'forbidden',
                     'remove members', true)).org_id,
    remove_member.user_id, case when v_self then 'left' else 'admin' end);
end $$;
comment on function public.remove_member(text, uuid) is 'Remove a member (admin), or leave (the member); never the last admin.';
revoke all on function public.remove_member(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.remove_member(text, uuid) to authenticated;
