-- Tenancy: orgs, their members, and a profile per auth.users row, with RLS.
--
-- Nothing here is writable by an API role: every change goes through a security-definer RPC
-- (later migrations) that checks the caller and records the change in the audit log. Balances
-- are not here: an org's pool and a user's personal credits are credit accounts (the ledger).

-- Orgs ---------------------------------------------------------------------------------------

create table public.orgs (
  id uuid primary key default gen_random_uuid(),
  slug public.org_slug not null,
  name text not null,
  plan public.org_plan not null default 'pro',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint orgs_slug_key unique (slug),
  constraint orgs_name_length check (length(btrim(name)) between 1 and 100)
);
comment on table public.orgs is 'A team: its members share one credit account (credit_accounts, id = the org''s id).';
comment on column public.orgs.slug is 'Unique short name; what UPSHIFT_ORG usually holds.';
comment on column public.orgs.plan is 'pro or team; team (a live Team subscription) unlocks org audit log queries.';
alter table public.orgs enable row level security;
revoke all on table public.orgs from anon, authenticated, service_role;
grant select on table public.orgs to authenticated, service_role;

create trigger orgs_set_updated_at before update on public.orgs
  for each row execute function private.set_updated_at();

create table public.org_members (
  org_id uuid not null references public.orgs (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role public.member_role not null,
  created_at timestamptz not null default now(),
  primary key (org_id, user_id)
);
create index org_members_user_id_idx on public.org_members (user_id);
comment on table public.org_members is 'Membership and role (private.member_roles()).';
alter table public.org_members enable row level security;
revoke all on table public.org_members from anon, authenticated, service_role;
grant select on table public.org_members to authenticated, service_role;

-- Profiles -----------------------------------------------------------------------------------

create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  email text,
  plan public.user_plan not null default 'free',
  default_org_id uuid references public.orgs (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on table public.profiles is 'One per auth.users row (created by trigger): plan and default org.';
comment on column public.profiles.default_org_id is
  'The selected org: the credit pool used when a request names no org. Set with set_default_org().';
alter table public.profiles enable row level security;
revoke all on table public.profiles from anon, authenticated, service_role;
grant select on table public.profiles to authenticated, service_role;

create trigger profiles_set_updated_at before update on public.profiles
  for each row execute function private.set_updated_at();

create function private.handle_new_user() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  insert into public.profiles (id, email) values (new.id, new.email)
  on conflict (id) do nothing;
  return new;
end $$;
comment on function private.handle_new_user() is 'Trigger on auth.users: create the profile of a new user.';
revoke all on function private.handle_new_user() from public, anon, authenticated, service_role;

create trigger on_auth_user_created after insert on auth.users
  for each row execute function private.handle_new_user();

create function private.handle_user_email_change() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  update public.profiles set email = new.email where id = new.id;
  return new;
end $$;
comment on function private.handle_user_email_change() is 'Trigger on auth.users: keep profiles.email current.';
revoke all on function private.handle_user_email_change() from public, anon, authenticated, service_role;

create trigger on_auth_user_email_changed after update of email on auth.users
  for each row when (old.email is distinct from new.email)
  execute function private.handle_user_email_change();

-- RLS ----------------------------------------------------------------------------------------

create function private.user_org_ids() returns setof uuid
language sql stable security definer set search_path = '' as $$
  select m.org_id from public.org_members m where m.user_id = (select auth.uid())
$$;
comment on function private.user_org_ids() is 'Orgs the calling user belongs to (any role).';
revoke all on function private.user_org_ids() from public, anon, authenticated, service_role;
grant execute on function private.user_org_ids() to authenticated;  -- RLS policies

create function private.has_role_on_org(p_org_id uuid, p_roles text[]) returns boolean
language sql stable security definer set search_path = '' as $$
  select exists (
    select 1 from public.org_members m
    where m.org_id = p_org_id and m.user_id = (select auth.uid()) and m.role = any (p_roles)
  )
$$;
comment on function private.has_role_on_org(uuid, text[]) is 'Does the calling user hold one of p_roles in the org?';
revoke all on function private.has_role_on_org(uuid, text[]) from public, anon, authenticated, service_role;
grant execute on function private.has_role_on_org(uuid, text[]) to authenticated;  -- RLS policies

create policy orgs_select_member on public.orgs for select to authenticated
  using (id in (select private.user_org_ids()));

create policy org_members_select_same_org on public.org_members for select to authenticated
  using (org_id in (select private.user_org_ids()));

create policy profiles_select_own on public.profiles for select to authenticated
  using (id = (select auth.uid()));
