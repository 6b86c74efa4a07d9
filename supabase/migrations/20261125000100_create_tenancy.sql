-- Tenancy: profiles (one per auth.users row), orgs and their members, with RLS.
--
-- Balances and plans are never writable by an API role: only the security-definer RPCs of
-- later migrations change them. Helpers that policies call live in schema private, which
-- PostgREST does not expose.

create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;
comment on schema private is 'Helpers for RLS policies and RPCs; not exposed through the API.';

alter default privileges in schema public revoke execute on functions from public;
alter default privileges in schema private revoke execute on functions from public;

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
  'The selected org: the credit pool used when a request names no org.';

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

revoke all on function private.set_updated_at(), private.user_org_ids(),
  private.has_role_on_org(uuid, text[]) from public;
grant execute on function private.user_org_ids(), private.has_role_on_org(uuid, text[])
  to authenticated, service_role;

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
revoke all on function private.handle_new_user() from public;

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
revoke all on function private.handle_user_email_change() from public;

create trigger on_auth_user_email_changed after update of email on auth.users
  for each row when (old.email is distinct from new.email)
  execute function private.handle_user_email_change();

-- RLS and grants -----------------------------------------------------------------------------

alter table public.orgs enable row level security;
alter table public.org_members enable row level security;
alter table public.profiles enable row level security;

revoke all on table public.orgs, public.org_members, public.profiles from anon, authenticated, service_role;
grant select on table public.orgs, public.org_members, public.profiles to authenticated, service_role;
-- Column grants: a role can only ever write these columns; RLS says which rows.
grant update (name, slug) on table public.orgs to authenticated;
grant update (default_org_id) on table public.profiles to authenticated;

create policy orgs_select_member on public.orgs for select to authenticated
  using (id in (select private.user_org_ids()));
create policy orgs_update_admin on public.orgs for update to authenticated
  using ((select private.has_role_on_org(id, array['admin'])))
  with check ((select private.has_role_on_org(id, array['admin'])));

create policy org_members_select_same_org on public.org_members for select to authenticated
  using (org_id in (select private.user_org_ids()));

create policy profiles_select_own on public.profiles for select to authenticated
  using (id = (select auth.uid()));
create policy profiles_update_own on public.profiles for update to authenticated
  using (id = (select auth.uid()))
  with check (
    id = (select auth.uid())
    and (default_org_id is null or default_org_id in (select private.user_org_ids()))
  );
