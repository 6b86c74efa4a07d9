-- Invites: an org admin invites an email; the person with that email accepts with the token.
--
-- Only the SHA-256 of a token is stored; a token is single-use and valid 7 days. An invite dies
-- with the admin's rights: removing or demoting the admin who sent it revokes it (the members
-- migration), and accepting one whose sender is no longer an admin is refused.

create table public.org_invites (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.orgs (id) on delete cascade,
  email text not null,
  role public.member_role not null,
  token_hash text not null,
  invited_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null default now() + interval '7 days',
  accepted_at timestamptz,
  accepted_by uuid references auth.users (id) on delete set null,
  revoked_at timestamptz,
  constraint org_invites_token_hash_key unique (token_hash),
  constraint org_invites_email_format check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320)
);
create index org_invites_org_id_idx on public.org_invites (org_id);
alter table public.org_invites enable row level security;
revoke all on table public.org_invites from anon, authenticated, service_role;
-- Admins read their org's invites directly (never the token's hash); writes only through RPCs.
create policy org_invites_select_admin on public.org_invites for select to authenticated
  using ((select private.has_role_on_org(org_id, array['admin'])));
grant select on table public.org_invites to service_role;
grant select (id, org_id, email, role, invited_by, created_at, expires_at, accepted_at, accepted_by, revoked_at)
  on table public.org_invites to authenticated;
comment on table public.org_invites is 'Single-use invitations (7 days); only the SHA-256 of the token is stored.';

create function private.invite_json(i public.org_invites) returns jsonb
language sql stable set search_path = '' as $$
  select jsonb_build_object('id', i.id, 'org_id', i.org_id, 'email', i.email, 'role', i.role,
    'invited_by', i.invited_by, 'created_at', i.created_at, 'expires_at', i.expires_at)
$$;
comment on function private.invite_json(public.org_invites) is 'An invite as the API answers it (never the token).';
revoke all on function private.invite_json(public.org_invites) from public, anon, authenticated, service_role;

create function public.create_invite(org text, email text, role text) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_org uuid := (private.context(create_invite.org, array['admin'], 'forbidden', 'invite', true)).org_id;
  v_token text := private.new_secret('upi_');
  v_email text := lower(btrim(create_invite.email));
  v_inv public.org_invites;
begin
  if v_email is null or v_email !~ '^[^@\s]+@[^@\s]+$' or length(v_email) > 320 then
    perform private.err(400, 'invalid_email', 'email is not an email address.', '{"field": "email"}');
  end if;
  insert into public.org_invites (org_id, email, role, token_hash, invited_by)
  values (v_org, v_email, private.check_in(create_invite.role, private.member_roles(), 'role'), private.sha256_hex(v_token), (select auth.uid()))
  returning * into v_inv;
  perform private.audit_append(v_org, v_org, 'invite_created', 'invite', v_inv.id::text,
    jsonb_build_object('email', v_inv.email, 'role', v_inv.role, 'expires_at', v_inv.expires_at));
  return private.invite_json(v_inv) || jsonb_build_object('token', v_token);
end $$;
comment on function public.create_invite(text, text, text) is
  'Invite an email to an org (admin). Returns the token once; valid 7 days, single use.';
revoke all on function public.create_invite(text, text, text) from public, anon, authenticated, service_role;
grant execute on function public.create_invite(text, text, text) to authenticated;

create function public.list_invites(org text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  v_org uuid := (private.context(list_invites.org, array['admin'], 'forbidden', 'see its invites', true)).org_id;
begin
  return (select coalesce(jsonb_agg(private.invite_json(i) order by i.created_at), '[]'::jsonb)
          from public.org_invites i
          where i.org_id = v_org and i.accepted_at is null and i.revoked_at is null and i.expires_at > now());
end $$;
comment on function public.list_invites(text) is 'Pending invites of an org (admin).';
revoke all on function public.list_invites(text) from public, anon, authenticated, service_role;
grant execute on function public.list_invites(text) to authenticated;

create function private.revoke_invite_row(p_invite uuid, p_org uuid, p_via text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_inv public.org_invites;
begin
  update public.org_invites i set revoked_at = now()
  where i.id = p_invite and i.org_id = p_org and i.accepted_at is null and i.revoked_at is null
  returning * into v_inv;
  if v_inv.id is null then
    perform private.err(404, 'invite_not_found', 'No pending invite with that id in this org.');
  end if;
  perform private.audit_append(p_org, p_org, 'invite_revoked', 'invite', v_inv.id::text,
    jsonb_strip_nulls(jsonb_build_object('email', v_inv.email, 'role', v_inv.role, 'invited_by', v_inv.invited_by,
                                         'via', p_via)));
  return private.invite_json(v_inv) || '{"revoked": true}'::jsonb;
end $$;
comment on function private.revoke_invite_row(uuid, uuid, text) is
  'Revoke a pending invite of the org and audit it (p_via: why, when the platform does it).';
revoke all on function private.revoke_invite_row(uuid, uuid, text) from public, anon, authenticated, service_role;

create function public.revoke_invite(org text, invite_id uuid) returns jsonb
language plpgsql security definer set search_path = '' as $$
begin
  return private.revoke_invite_row(revoke_invite.invite_id,
    (private.context(revoke_invite.org, array['admin'], 'forbidden', 'revoke its invites', true)).org_id, null);
end $$;
comment on function public.revoke_invite(text, uuid) is 'Revoke a pending invite (admin).';
revoke all on function public.revoke_invite(text, uuid) from public, anon, authenticated, service_role;
grant execute on function public.revoke_invite(text, uuid) to authenticated;

create function public.accept_invite(token text) returns jsonb
language plpgsql security definer set search_path = '' as $$
declare
  v_uid uuid := private.require_user();
  v_inv public.org_invites;
  v_email text;
begin
  -- Lock order as for every membership change: the org, then the invite.
  perform private.lock_account(i.org_id) from public.org_invites i
  where i.token_hash = private.sha256_hex(btrim(accept_invite.token));
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
  -- Invites are sent by an org admin (create_invite); no sender left (their account was deleted) is no admin.
  if v_inv.invited_by is null or not exists (
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
end $$;
comment on function public.accept_invite(text) is 'Join an org with an invite token sent to the caller''s email.';
revoke all on function public.accept_invite(text) from public, anon, authenticated, service_role;
grant execute on function public.accept_invite(text) to authenticated;
