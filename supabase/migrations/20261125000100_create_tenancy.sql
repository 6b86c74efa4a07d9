-- Tenancy: profiles (one per auth.users row), orgs and their members, with RLS.
--
-- Balances and plans are never writable by an API role: only the security-definer RPCs of
-- later migrations change them. Helpers that policies call live in schema private, which
-- PostgREST does not expose.

-- Grants: on Supabase every table and function created in public starts out granted to anon,
-- authenticated and service_role (the project's default privileges; sql/supabase_compat.sql
-- reproduces them locally), on top of PostgreSQL's own EXECUTE for PUBLIC on every function. So
-- every object here revokes all of that right after it is created and grants back exactly what
-- its callers need. tests/test_privileges.py keeps the resulting list (tests/api_privileges.txt).

create schema if not exists private;
revoke all on schema private from public;
-- authenticated evaluates RLS policies that call private helpers; nothing else in private is granted.
grant usage on schema private to authenticated;
comment on schema private is 'Helpers for RLS policies and RPCs; not exposed through the API.';

-- Orgs ---------------------------------------------------------------------------------------

create table public.orgs (
  id uuid primary key default gen_random_uuid(),
  slug text not null,
  name text not null,
  plan text not null default 'pro',
  credit_balance bigint not null default 0,
  stripe_customer_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint orgs_slug_key unique (slug),
  constraint orgs_slug_format check (slug ~ '^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$'),
  constraint orgs_slug_not_uuid check (slug !~ '^[0-9a-f]{8}-[0-9a-f]{4}-'),
  constraint orgs_name_length check (length(btrim(name)) between 1 and 100),
  constraint orgs_plan_check check (plan in ('pro', 'team')),
  constraint orgs_credit_balance_nonnegative check (credit_balance >= 0),
  constraint orgs_stripe_customer_id_key unique (stripe_customer_id)
);
comment on table public.orgs is 'A team: members share one credit pool (credit_balance).';
comment on column public.orgs.slug is 'Unique short name; what UPSHIFT_ORG usually holds.';
comment on column public.orgs.plan is 'pro or team; team unlocks org audit log queries.';
comment on column public.orgs.credit_balance is
  'Shared credit pool. Changed only by debit_credits / grant_credits; never negative.';
alter table public.orgs enable row level security;
-- Read through RLS; every change goes through an RPC that checks the caller and audits it.
revoke all on table public.orgs from anon, authenticated, service_role;
grant select on table public.orgs to authenticated, service_role;

create table public.org_members (
  org_id uuid not null references public.orgs (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null,
  created_at timestamptz not null default now(),
  primary key (org_id, user_id),
  constraint org_members_role_check check (role in ('admin', 'member', 'viewer'))
);
create index org_members_user_id_idx on public.org_members (user_id);
comment on table public.org_members is
  'Membership. admin: manage members, keys, billing, read audit logs; member: spend the pool; '
  'viewer: read audit logs and balances, cannot spend.';
alter table public.org_members enable row level security;
revoke all on table public.org_members from anon, authenticated, service_role;
grant select on table public.org_members to authenticated, service_role;

-- Profiles -----------------------------------------------------------------------------------

create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  email text,
  credit_balance bigint not null default 10,
  plan text not null default 'free',
  default_org_id uuid references public.orgs (id) on delete set null,
  stripe_customer_id text,
  stripe_subscription_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint profiles_credit_balance_nonnegative check (credit_balance >= 0),
  constraint profiles_plan_check check (plan in ('free', 'pro')),
  constraint profiles_stripe_customer_id_key unique (stripe_customer_id)
);
comment on table public.profiles is 'One per auth.users row (created by trigger): personal balance and plan.';
comment on column public.profiles.credit_balance is
  'Personal credits (new users start with 10). Changed only by RPCs; never negative.';
comment on column public.profiles.default_org_id is
  'The selected org: the credit pool used when a request names no org. Set with set_default_org().';
alter table public.profiles enable row level security;
revoke all on table public.profiles from anon, authenticated, service_role;
grant select on table public.profiles to authenticated, service_role;

-- Helpers ------------------------------------------------------------------------------------

create function private.set_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;
revoke all on function private.set_updated_at() from public, anon, authenticated, service_role;

create trigger orgs_set_updated_at before update on public.orgs
  for each row execute function private.set_updated_at();
create trigger profiles_set_updated_at before update on public.profiles
  for each row execute function private.set_updated_at();

create function private.user_org_ids() returns setof uuid
language sql stable security definer
set search_path = ''
as $$
  select m.org_id from public.org_members m where m.user_id = (select auth.uid())
$$;
comment on function private.user_org_ids() is 'Orgs the calling user belongs to (any role).';
revoke all on function private.user_org_ids() from public, anon, authenticated, service_role;
grant execute on function private.user_org_ids() to authenticated;  -- RLS policies

create function private.has_role_on_org(p_org_id uuid, p_roles text[]) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select exists (
    select 1 from public.org_members m
    where m.org_id = p_org_id and m.user_id = (select auth.uid()) and m.role = any (p_roles)
  )
$$;
comment on function private.has_role_on_org(uuid, text[]) is
  'Does the calling user hold one of p_roles in the org?';
revoke all on function private.has_role_on_org(uuid, text[]) from public, anon, authenticated, service_role;
grant execute on function private.has_role_on_org(uuid, text[]) to authenticated;  -- RLS policies

create function private.handle_new_user() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into public.profiles (id, email) values (new.id, new.email)
  on conflict (id) do nothing;
  return new;
end
$$;
comment on function private.handle_new_user() is 'Trigger on auth.users: create the profile of a new user.';
revoke all on function private.handle_new_user() from public, anon, authenticated, service_role;

create trigger on_auth_user_created after insert on auth.users
  for each row execute function private.handle_new_user();

create function private.handle_user_email_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  update public.profiles set email = new.email where id = new.id;
  return new;
end
$$;
comment on function private.handle_user_email_change() is 'Trigger on auth.users: keep profiles.email current.';
revoke all on function private.handle_user_email_change() from public, anon, authenticated, service_role;

create trigger on_auth_user_email_changed after update of email on auth.users
  for each row when (old.email is distinct from new.email)
  execute function private.handle_user_email_change();

-- RLS policies -------------------------------------------------------------------------------

create policy orgs_select_member on public.orgs for select to authenticated
  using (id in (select private.user_org_ids()));

create policy org_members_select_same_org on public.org_members for select to authenticated
  using (org_id in (select private.user_org_ids()));

create policy profiles_select_own on public.profiles for select to authenticated
  using (id = (select auth.uid()));
