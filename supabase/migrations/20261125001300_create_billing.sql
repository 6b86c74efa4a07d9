-- Stripe billing, part 1: what Stripe tells us is kept here, and who may start a checkout.
--
-- A checkout is for a credit account: an org's pool (its admin buys) or a user's personal
-- credits. Purchases are tracked per payment (payment intent) so that refunds and disputes can be
-- reconciled in any order; subscriptions as Stripe last reported them. Applying webhook events:
-- the stripe_events migration.

create table public.stripe_events (
  id text primary key,
  type text not null,
  created timestamptz not null,
  livemode boolean not null default false,
  received_at timestamptz not null default now(),
  outcome text not null default 'received',
  payload jsonb not null
);
comment on table public.stripe_events is
  'Every Stripe webhook event applied (by event id), with what applying it did. A repeat is a no-op.';
alter table public.stripe_events enable row level security;
revoke all on table public.stripe_events from anon, authenticated, service_role;
grant select on table public.stripe_events to service_role;

create table public.stripe_payments (
  payment_key text primary key,
  checkout_session text,
  account_id uuid references public.credit_accounts (id) on delete restrict,
  purchaser_id uuid,
  pack text,
  credits bigint,
  amount bigint,
  currency text,
  granted_at timestamptz,
  amount_refunded bigint not null default 0,
  disputed boolean not null default false,
  dispute_id text,
  dispute_closed boolean not null default false,
  credits_reversed bigint not null default 0,
  updated_at timestamptz not null default now(),
  constraint stripe_payments_checkout_session_key unique (checkout_session),
  constraint stripe_payments_credits_positive check (credits > 0),
  constraint stripe_payments_reversed_range check (credits_reversed >= 0)
);
alter table public.stripe_payments enable row level security;
revoke all on table public.stripe_payments from anon, authenticated, service_role;
grant select on table public.stripe_payments to service_role;
comment on table public.stripe_payments is
  'Credit-pack payments (key: payment intent, else checkout session) and how much of them was refunded or disputed.';

create table private.subscription_statuses (
  status text primary key,
  rank integer not null,
  live boolean not null
);
comment on table private.subscription_statuses is
  'Stripe''s subscription statuses: live ones grant the plan; on events with the same timestamp, the higher rank '
  '(later in the lifecycle) wins. An unknown status counts as final and not live.';
revoke all on table private.subscription_statuses from public, anon, authenticated, service_role;
insert into private.subscription_statuses (status, rank, live) values
  ('incomplete', 0, false), ('trialing', 1, true), ('active', 2, true), ('paused', 3, false),
  ('past_due', 4, true), ('unpaid', 5, false), ('canceled', 6, false), ('incomplete_expired', 6, false);

create table public.subscriptions (
  id text primary key,
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  tier public.subscription_tier not null,
  status text not null,
  customer text,
  current_period_end timestamptz,
  last_event_at timestamptz not null,
  updated_at timestamptz not null default now()
);
create index subscriptions_account_idx on public.subscriptions (account_id);
comment on table public.subscriptions is
  'Stripe subscriptions (Pro for a user''s account, Team for an org''s) as last reported by Stripe.';
alter table public.subscriptions enable row level security;
revoke all on table public.subscriptions from anon, authenticated, service_role;
grant select on table public.subscriptions to authenticated, service_role;
create policy subscriptions_select on public.subscriptions for select to authenticated
  using (account_id = (select auth.uid()) or (select private.has_role_on_org(account_id, array['admin', 'viewer'])));

create function private.live_subscription(p_account uuid, p_tier text) returns boolean
language sql stable security definer set search_path = '' as $$
  select exists (select 1 from public.subscriptions s join private.subscription_statuses st on st.status = s.status
                 where s.account_id = p_account and s.tier = p_tier and st.live)
$$;
comment on function private.live_subscription(uuid, text) is 'Does the account have a live subscription of that tier?';
revoke all on function private.live_subscription(uuid, text) from public, anon, authenticated, service_role;

-- Checkout ---------------------------------------------------------------------------------

create function public.begin_checkout(kind text, org text default null) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  v_uid uuid := private.require_user();
  c private.org_context;
  v_account uuid;
  v_email text := (select u.email from auth.users u where u.id = v_uid);
begin
  perform private.check_in(begin_checkout.kind, array['credits', 'pro', 'team'], 'kind');
  if begin_checkout.kind <> 'pro' then
    c := private.context(begin_checkout.org, array['admin'], 'admin_required', 'buy for it',
                         begin_checkout.kind = 'team');
  end if;
  v_account := coalesce(c.org_id, v_uid);
  if begin_checkout.kind <> 'credits'
     and private.live_subscription(v_account, case when c.org_id is null then 'pro' else 'team' end) then
    perform private.err(409, 'already_subscribed', case when c.org_id is null then 'You already have a Pro subscription.'
      else format('Org %s already has a Team subscription.', c.slug) end);
  end if;
  return (
    select jsonb_build_object('account_kind', case when c.org_id is null then 'user' else 'org' end,
      'account_id', a.id, 'org_id', c.org_id, 'org_slug', c.slug, 'name', coalesce(o.name, v_email), 'email', v_email,
      'purchaser_id', v_uid, 'stripe_customer_id', a.stripe_customer_id,
      'tier', case when o.plan = 'team' then 'team' when c.org_id is not null then 'free' else p.plan end)
    from public.credit_accounts a left join public.orgs o on o.id = a.org_id left join public.profiles p on p.id = v_uid
    where a.id = v_account);
end $$;
comment on function public.begin_checkout(text, text) is
  'Who a checkout is for: credits for the org context (admin) or the caller; pro for the caller; team for an org '
  '(admin). Returns the account and its Stripe customer, if any.';
revoke all on function public.begin_checkout(text, text) from public, anon, authenticated, service_role;
grant execute on function public.begin_checkout(text, text) to authenticated;

create function public.set_stripe_customer(account_kind text, account_id uuid, customer_id text) returns text
language plpgsql volatile security definer set search_path = '' as $$
-- Called by the functions after begin_checkout decided who pays: the account id is the database's own.
declare
  v text;
begin
  perform private.require_backend('set_stripe_customer');
  if set_stripe_customer.customer_id is null or set_stripe_customer.customer_id !~ '^cus_[A-Za-z0-9]+$' then
    perform private.err(400, 'invalid_customer', 'customer_id is a Stripe customer id (cus_...).');
  end if;
  update public.credit_accounts a set stripe_customer_id = coalesce(a.stripe_customer_id, set_stripe_customer.customer_id)
  where a.id = set_stripe_customer.account_id
    and (a.org_id is not null) = (set_stripe_customer.account_kind = 'org')
  returning a.stripe_customer_id into v;
  if v is null then
    perform private.err(404, 'account_not_found', 'No such account.');
  end if;
  return v;  -- the first customer stored wins; a concurrent second one is not used
end $$;
comment on function public.set_stripe_customer(text, uuid, text) is
  'Backend only: remember an account''s Stripe customer (once); returns the one in use.';
revoke all on function public.set_stripe_customer(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.set_stripe_customer(text, uuid, text) to service_role;  -- backend only
