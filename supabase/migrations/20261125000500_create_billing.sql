-- Stripe billing: customers, checkout authorization, and the one RPC that applies a verified
-- webhook event (deduplicated by event id, in the same transaction as its effect).
--
-- Purchases are tracked per payment (payment intent) and reconciled: whatever order Stripe
-- delivers checkout completion, refunds and disputes in, the credits granted minus the credits
-- taken back always match the payment's current state, and each transition happens once.

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
  org_id uuid references public.orgs (id) on delete restrict,
  user_id uuid,
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
comment on table public.stripe_payments is
  'Credit-pack payments (key: payment intent, else checkout session) and how much of them was refunded or disputed.';
alter table public.stripe_payments enable row level security;
revoke all on table public.stripe_payments from anon, authenticated, service_role;
grant select on table public.stripe_payments to service_role;

create table public.subscriptions (
  id text primary key,
  org_id uuid references public.orgs (id) on delete restrict,
  user_id uuid,
  tier text not null,
  status text not null,
  customer text,
  current_period_end timestamptz,
  last_event_at timestamptz not null,
  updated_at timestamptz not null default now(),
  constraint subscriptions_tier_check check (tier in ('pro', 'team')),
  constraint subscriptions_account check ((org_id is null) <> (user_id is null))
);
create index subscriptions_org_idx on public.subscriptions (org_id) where org_id is not null;
create index subscriptions_user_idx on public.subscriptions (user_id) where user_id is not null;
comment on table public.subscriptions is 'Stripe subscriptions (Pro for a user, Team for an org) as last reported by Stripe.';
alter table public.subscriptions enable row level security;
revoke all on table public.subscriptions from anon, authenticated, service_role;
grant select on table public.subscriptions to authenticated, service_role;

create policy subscriptions_select on public.subscriptions for select to authenticated
  using (user_id = (select auth.uid()) or (select private.has_role_on_org(org_id, array['admin', 'viewer'])));

-- Checkout ---------------------------------------------------------------------------------

create function public.begin_checkout(kind text, org text default null) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_uid uuid := (select auth.uid());
  v_ctx jsonb;
  v_profile public.profiles;
  v_org public.orgs;
  v_email text;
begin
  if begin_checkout.kind is null or begin_checkout.kind not in ('credits', 'pro', 'team') then
    perform private.err(400, 'invalid_kind', 'kind is credits, pro or team.', '{"field": "kind"}');
  end if;
  if v_uid is null then
    perform private.err(403, 'user_required', 'Buying needs a signed-in user (service keys cannot buy).');
  end if;
  select * into v_profile from public.profiles p where p.id = v_uid;
  select u.email into v_email from auth.users u where u.id = v_uid;
  v_ctx := case when begin_checkout.kind <> 'pro' then public.resolve_org(begin_checkout.org) end;
  if begin_checkout.kind = 'team' and v_ctx is null then
    perform private.err(400, 'org_required', 'A Team subscription is for an org: pass org_id.', '{"field": "org_id"}');
  end if;
  if v_ctx is not null then
    if v_ctx ->> 'role' <> 'admin' then
      perform private.err(403, 'admin_required',
        format('Buying for org %s needs its admin role; you are %s.', v_ctx ->> 'slug', v_ctx ->> 'role'),
        jsonb_build_object('org', v_ctx ->> 'slug', 'role', v_ctx ->> 'role'));
    end if;
    select * into v_org from public.orgs o where o.id = (v_ctx ->> 'id')::uuid;
    if begin_checkout.kind = 'team' and exists (select 1 from public.subscriptions s where s.org_id = v_org.id
        and s.status in ('active', 'trialing', 'past_due')) then
      perform private.err(409, 'already_subscribed', format('Org %s already has a Team subscription.', v_org.slug));
    end if;
    return jsonb_build_object('account_kind', 'org', 'account_id', v_org.id, 'org_id', v_org.id, 'org_slug', v_org.slug,
      'name', v_org.name, 'email', v_email, 'purchaser_id', v_uid, 'stripe_customer_id', v_org.stripe_customer_id,
      'tier', case when v_org.plan = 'team' then 'team' else 'free' end);
  end if;
  if begin_checkout.kind = 'pro' and exists (select 1 from public.subscriptions s where s.user_id = v_uid
      and s.status in ('active', 'trialing', 'past_due')) then
    perform private.err(409, 'already_subscribed', 'You already have a Pro subscription.');
  end if;
  return jsonb_build_object('account_kind', 'user', 'account_id', v_uid, 'org_id', null, 'org_slug', null,
    'name', v_email, 'email', v_email, 'purchaser_id', v_uid, 'stripe_customer_id', v_profile.stripe_customer_id,
    'tier', v_profile.plan);
end
$$;
comment on function public.begin_checkout(text, text) is
  'Who a checkout is for: credits for the org context (admin) or the caller; pro for the caller; team for an org '
  '(admin). Returns the account and its Stripe customer, if any.';
revoke all on function public.begin_checkout(text, text) from public, anon, authenticated, service_role;
grant execute on function public.begin_checkout(text, text) to authenticated;

create function public.set_stripe_customer(account_kind text, account_id uuid, customer_id text) returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v text;
begin
  perform private.require_backend('set_stripe_customer');
  if set_stripe_customer.customer_id is null or set_stripe_customer.customer_id !~ '^cus_[A-Za-z0-9]+$' then
    perform private.err(400, 'invalid_customer', 'customer_id is a Stripe customer id (cus_...).');
  end if;
  if set_stripe_customer.account_kind = 'org' then
    update public.orgs o set stripe_customer_id = coalesce(o.stripe_customer_id, set_stripe_customer.customer_id)
    where o.id = set_stripe_customer.account_id returning o.stripe_customer_id into v;
  elsif set_stripe_customer.account_kind = 'user' then
    update public.profiles p set stripe_customer_id = coalesce(p.stripe_customer_id, set_stripe_customer.customer_id)
    where p.id = set_stripe_customer.account_id returning p.stripe_customer_id into v;
  end if;
  if v is null then
    perform private.err(404, 'account_not_found', 'No such account.');
  end if;
  return v;  -- the first customer stored wins; a concurrent second one is not used
end
$$;
comment on function public.set_stripe_customer(text, uuid, text) is
  'Backend only: remember an account''s Stripe customer (once); returns the one in use.';
revoke all on function public.set_stripe_customer(text, uuid, text) from public, anon, authenticated, service_role;
grant execute on function public.set_stripe_customer(text, uuid, text) to service_role;  -- backend only

-- Applying events --------------------------------------------------------------------------

create function private.stripe_account(p_meta jsonb, p_customer text, out org_id uuid, out user_id uuid)
language plpgsql stable security definer
set search_path = ''
as $$
begin
  if p_meta ->> 'account_kind' = 'org' and p_meta ->> 'account_id' ~* '^[0-9a-f-]{36}$' then
    select o.id into org_id from public.orgs o where o.id = (p_meta ->> 'account_id')::uuid;
  elsif p_meta ->> 'account_kind' = 'user' and p_meta ->> 'account_id' ~* '^[0-9a-f-]{36}$' then
    select p.id into user_id from public.profiles p where p.id = (p_meta ->> 'account_id')::uuid;
  end if;
  if org_id is null and user_id is null and p_customer is not null then
    select o.id into org_id from public.orgs o where o.stripe_customer_id = p_customer;
    if org_id is null then
      select p.id into user_id from public.profiles p where p.stripe_customer_id = p_customer;
    end if;
  end if;
end
$$;
revoke all on function private.stripe_account(jsonb, text) from public, anon, authenticated, service_role;

-- Lock order for every Stripe path: an advisory lock on the Stripe object, then the account row
-- (FOR UPDATE), then the rows that reference it. Taking the account row first matters: inserting a
-- row whose foreign key points at it takes a KEY SHARE lock, and upgrading that later to FOR
-- UPDATE while another transaction queues for the same row is a deadlock.
create function private.lock_account(p_org uuid, p_user uuid) returns void
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  if p_org is not null then
    perform 1 from public.orgs o where o.id = p_org for update;
  elsif p_user is not null then
    perform 1 from public.profiles p where p.id = p_user for update;
  end if;
end
$$;
revoke all on function private.lock_account(uuid, uuid) from public, anon, authenticated, service_role;

create function private.take_back_credits(p_org uuid, p_user uuid, p_amount bigint, p_key text, p_meta jsonb)
returns bigint
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_old bigint;
  v_take bigint;
begin
  -- Never below zero: take what is there; the caller records any shortfall.
  if p_org is not null then
    select o.credit_balance into v_old from public.orgs o where o.id = p_org for update;
  else
    select p.credit_balance into v_old from public.profiles p where p.id = p_user for update;
  end if;
  v_take := least(coalesce(v_old, 0), p_amount);
  if v_take > 0 then
    if p_org is not null then
      update public.orgs o set credit_balance = o.credit_balance - v_take where o.id = p_org;
    else
      update public.profiles p set credit_balance = p.credit_balance - v_take where p.id = p_user;
    end if;
    insert into public.credit_transactions (org_id, user_id, amount, balance_after, reason, system_key, metadata)
    values (p_org, case when p_org is null then p_user end, -v_take, v_old - v_take, 'refund', p_key,
            p_meta || jsonb_build_object('requested', p_amount, 'shortfall', p_amount - v_take));
  end if;
  return v_take;
end
$$;
revoke all on function private.take_back_credits(uuid, uuid, bigint, text, jsonb) from public, anon, authenticated, service_role;

create function private.reconcile_payment(p_key text, p_cause text) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v public.stripe_payments;
  v_target bigint;
  v_delta bigint;
  v_taken bigint;
  v_idem text;
begin
  select * into v from public.stripe_payments s where s.payment_key = p_key for update;
  if v.payment_key is null or v.granted_at is null then
    return jsonb_build_object('reconciled', false, 'reason', 'not_granted_yet');
  end if;
  v_target := case when v.disputed then v.credits
                   when coalesce(v.amount, 0) <= 0 then 0
                   else least(v.credits, (v.credits * v.amount_refunded) / v.amount) end;
  v_delta := v_target - v.credits_reversed;
  if v_delta = 0 then
    return jsonb_build_object('reconciled', true, 'delta', 0);
  end if;
  v_idem := format('reversal:%s:%s->%s', p_key, v.credits_reversed, v_target);
  if v_delta > 0 then
    v_taken := private.take_back_credits(v.org_id, v.user_id, v_delta, v_idem,
      jsonb_build_object('payment', p_key, 'cause', p_cause));
    perform private.audit_append(coalesce(v.org_id, v.user_id), v.org_id, 'credits_refunded', 'stripe_payment', p_key,
      jsonb_build_object('credits', v_delta, 'taken', v_taken, 'shortfall', v_delta - v_taken, 'cause', p_cause,
                         'amount_refunded', v.amount_refunded, 'disputed', v.disputed));
  else
    perform public.grant_credits(-v_delta, 'refund_reversal', v.org_id::text,
      case when v.org_id is null then v.user_id end, v_idem, jsonb_build_object('payment', p_key, 'cause', p_cause));
    perform private.audit_append(coalesce(v.org_id, v.user_id), v.org_id, 'credits_restored', 'stripe_payment', p_key,
      jsonb_build_object('credits', -v_delta, 'cause', p_cause));
  end if;
  update public.stripe_payments s set credits_reversed = v_target, updated_at = now() where s.payment_key = p_key;
  return jsonb_build_object('reconciled', true, 'delta', v_delta, 'taken', v_taken);
end
$$;
revoke all on function private.reconcile_payment(text, text) from public, anon, authenticated, service_role;

create function private.apply_plan(p_org uuid, p_user uuid) returns void
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_old text;
  v_new text;
begin
  if p_org is not null then
    select o.plan into v_old from public.orgs o where o.id = p_org for update;
    v_new := case when exists (select 1 from public.subscriptions s where s.org_id = p_org and s.tier = 'team'
                                 and s.status in ('active', 'trialing', 'past_due')) then 'team' else 'pro' end;
    if v_new is distinct from v_old then
      update public.orgs o set plan = v_new where o.id = p_org;
    end if;
  else
    select p.plan into v_old from public.profiles p where p.id = p_user for update;
    v_new := case when exists (select 1 from public.subscriptions s where s.user_id = p_user and s.tier = 'pro'
                                 and s.status in ('active', 'trialing', 'past_due')) then 'pro' else 'free' end;
    if v_new is distinct from v_old then
      update public.profiles p set plan = v_new where p.id = p_user;
    end if;
  end if;
  if v_new is distinct from v_old then
    perform private.audit_append(coalesce(p_org, p_user), p_org, 'plan_changed', case when p_org is null then 'user'
      else 'org' end, coalesce(p_org, p_user)::text, jsonb_build_object('from', v_old, 'to', v_new));
  end if;
end
$$;
revoke all on function private.apply_plan(uuid, uuid) from public, anon, authenticated, service_role;

create function private.stripe_payment_paid(o jsonb, p_config jsonb) returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_meta jsonb := coalesce(o -> 'metadata', '{}'::jsonb);
  v_acc record;
  v_key text := coalesce(o ->> 'payment_intent', o ->> 'id');
  v_credits bigint;
  v_pay public.stripe_payments;
begin
  perform pg_advisory_xact_lock(hashtextextended('stripe-payment:' || v_key, 0));
  select * into v_acc from private.stripe_account(v_meta, o ->> 'customer');
  if v_acc.org_id is null and v_acc.user_id is null then
    raise exception 'checkout session % names no known account', o ->> 'id';
  end if;
  perform private.lock_account(v_acc.org_id, v_acc.user_id);
  v_credits := coalesce(nullif(v_meta ->> 'credits', '')::bigint, (p_config -> 'pack_credits' ->> (v_meta ->> 'pack'))::bigint);
  if v_credits is null or v_credits <= 0 then
    raise exception 'checkout session % has no credit amount', o ->> 'id';
  end if;
  insert into public.stripe_payments as s (payment_key, checkout_session, org_id, user_id, purchaser_id, pack, credits,
                                           amount, currency)
  values (v_key, o ->> 'id', v_acc.org_id, v_acc.user_id, nullif(v_meta ->> 'purchaser_id', '')::uuid,
          v_meta ->> 'pack', v_credits, (o ->> 'amount_total')::bigint, o ->> 'currency')
  on conflict (payment_key) do update set
    checkout_session = excluded.checkout_session, org_id = excluded.org_id, user_id = excluded.user_id,
    purchaser_id = excluded.purchaser_id, pack = excluded.pack, credits = excluded.credits,
    amount = coalesce(s.amount, excluded.amount), currency = excluded.currency, updated_at = now();
  select * into v_pay from public.stripe_payments s where s.payment_key = v_key for update;
  if v_pay.granted_at is not null then
    return 'already_granted';
  end if;
  perform public.grant_credits(v_credits, 'purchase', v_acc.org_id::text,
    case when v_acc.org_id is null then v_acc.user_id end, o ->> 'id',
    jsonb_build_object('checkout_session', o ->> 'id', 'payment', v_key, 'pack', v_meta ->> 'pack'));
  update public.stripe_payments s set granted_at = now() where s.payment_key = v_key;
  perform private.audit_append(coalesce(v_acc.org_id, v_acc.user_id), v_acc.org_id, 'credits_purchased',
    'stripe_checkout_session', o ->> 'id', jsonb_build_object('credits', v_credits, 'pack', v_meta ->> 'pack',
      'amount_total', o -> 'amount_total', 'currency', o ->> 'currency', 'purchaser_id', v_meta ->> 'purchaser_id'));
  perform private.reconcile_payment(v_key, 'late_checkout');
  return 'credits_granted';
end
$$;
revoke all on function private.stripe_payment_paid(jsonb, jsonb) from public, anon, authenticated, service_role;

-- Stripe often sends several events for one subscription within the same second; on a tie the
-- status later in the lifecycle wins, so delivery order cannot matter.
create function private.subscription_rank(p_status text) returns integer
language sql immutable
set search_path = ''
as $$
  select case p_status when 'incomplete' then 0 when 'trialing' then 1 when 'active' then 2 when 'paused' then 3
    when 'past_due' then 4 when 'unpaid' then 5 else 6 end  -- canceled, incomplete_expired: final
$$;
revoke all on function private.subscription_rank(text) from public, anon, authenticated, service_role;

create function private.stripe_subscription(o jsonb, p_created timestamptz, p_deleted boolean, p_config jsonb)
returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_meta jsonb := coalesce(o -> 'metadata', '{}'::jsonb);
  v_prev public.subscriptions;
  v_acc record;
  v_tier text;
  v_status text := case when p_deleted then 'canceled' else o ->> 'status' end;
  v_price text := o #>> '{items,data,0,price,id}';
  v_end timestamptz := to_timestamp(coalesce(o #>> '{items,data,0,current_period_end}',
                                             o ->> 'current_period_end')::double precision);
begin
  -- One event per subscription at a time: the first two deliveries cannot both miss the row.
  perform pg_advisory_xact_lock(hashtextextended('stripe-subscription:' || (o ->> 'id'), 0));
  select * into v_prev from public.subscriptions s where s.id = o ->> 'id' for update;
  if v_prev.id is not null then
    if p_created < v_prev.last_event_at or v_prev.status in ('canceled', 'incomplete_expired')
       or (p_created = v_prev.last_event_at
           and private.subscription_rank(v_status) < private.subscription_rank(v_prev.status)) then
      return 'stale_ignored';
    end if;
  end if;
  select * into v_acc from private.stripe_account(v_meta, o ->> 'customer');
  v_tier := coalesce(v_meta ->> 'tier', v_prev.tier, p_config -> 'price_tiers' ->> v_price);
  if v_prev.id is not null then
    v_acc.org_id := coalesce(v_prev.org_id, v_acc.org_id);
    v_acc.user_id := case when v_prev.org_id is null then coalesce(v_prev.user_id, v_acc.user_id) end;
  end if;
  if (v_acc.org_id is null and v_acc.user_id is null) or v_tier is null then
    raise exception 'subscription % names no known account or tier', o ->> 'id';
  end if;
  if (v_tier = 'team') <> (v_acc.org_id is not null) then
    raise exception 'subscription %: tier % does not fit the account', o ->> 'id', v_tier;
  end if;
  perform private.lock_account(v_acc.org_id, case when v_acc.org_id is null then v_acc.user_id end);
  insert into public.subscriptions as s (id, org_id, user_id, tier, status, customer, current_period_end, last_event_at)
  values (o ->> 'id', v_acc.org_id, case when v_acc.org_id is null then v_acc.user_id end, v_tier, v_status,
          o ->> 'customer', v_end, p_created)
  on conflict (id) do update set status = excluded.status, current_period_end = excluded.current_period_end,
    last_event_at = excluded.last_event_at, updated_at = now();
  perform private.apply_plan(v_acc.org_id, case when v_acc.org_id is null then v_acc.user_id end);
  return 'subscription_' || v_status;
end
$$;
revoke all on function private.stripe_subscription(jsonb, timestamptz, boolean, jsonb) from public, anon, authenticated, service_role;

create function private.stripe_invoice_paid(o jsonb, p_config jsonb) returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_sub_id text := coalesce(o #>> '{parent,subscription_details,subscription}', o ->> 'subscription');
  v_meta jsonb := coalesce(o #> '{parent,subscription_details,metadata}', o -> 'subscription_details' -> 'metadata',
                           '{}'::jsonb);
  v_sub public.subscriptions;
  v_acc record;
  v_tier text;
  v_credits bigint;
begin
  if v_sub_id is null then
    return 'not_a_subscription_invoice';
  end if;
  if coalesce(o ->> 'billing_reason', '') not in ('subscription_create', 'subscription_cycle') then
    return 'no_grant_for_' || coalesce(o ->> 'billing_reason', 'unknown_reason');
  end if;
  select * into v_sub from public.subscriptions s where s.id = v_sub_id;
  select * into v_acc from private.stripe_account(v_meta, o ->> 'customer');
  v_acc.org_id := coalesce(v_sub.org_id, v_acc.org_id);
  v_acc.user_id := case when v_acc.org_id is null then coalesce(v_sub.user_id, v_acc.user_id) end;
  v_tier := coalesce(v_sub.tier, v_meta ->> 'tier',
                     p_config -> 'price_tiers' ->> (o #>> '{lines,data,0,pricing,price_details,price}'));
  if (v_acc.org_id is null and v_acc.user_id is null) or v_tier is null then
    raise exception 'invoice % (subscription %) names no known account or tier', o ->> 'id', v_sub_id;
  end if;
  v_credits := (p_config -> 'plan_credits' ->> v_tier)::bigint;
  if coalesce(v_credits, 0) <= 0 then
    return 'no_plan_credits';
  end if;
  perform public.grant_credits(v_credits, 'plan_grant', v_acc.org_id::text, v_acc.user_id, o ->> 'id',
    jsonb_build_object('invoice', o ->> 'id', 'subscription', v_sub_id, 'tier', v_tier,
                       'billing_reason', o ->> 'billing_reason'));
  perform private.audit_append(coalesce(v_acc.org_id, v_acc.user_id), v_acc.org_id, 'credits_purchased',
    'stripe_invoice', o ->> 'id', jsonb_build_object('credits', v_credits, 'tier', v_tier, 'subscription', v_sub_id,
      'billing_reason', o ->> 'billing_reason', 'amount_paid', o -> 'amount_paid'));
  return 'plan_credits_granted';
end
$$;
revoke all on function private.stripe_invoice_paid(jsonb, jsonb) from public, anon, authenticated, service_role;

create function private.stripe_dispute(p_key text, p_dispute_id text, p_closed boolean, p_won boolean) returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v public.stripe_payments;
begin
  if p_key is null then
    return 'no_payment_intent';
  end if;
  perform pg_advisory_xact_lock(hashtextextended('stripe-payment:' || p_key, 0));
  perform private.lock_account(s.org_id, s.user_id) from public.stripe_payments s where s.payment_key = p_key;
  insert into public.stripe_payments (payment_key) values (p_key) on conflict (payment_key) do nothing;
  select * into v from public.stripe_payments s where s.payment_key = p_key for update;
  -- A closed dispute stays closed: its "created" event arriving late changes nothing.
  if v.dispute_id is not distinct from p_dispute_id and v.dispute_closed and not p_closed then
    return 'dispute_already_closed';
  end if;
  update public.stripe_payments s set dispute_id = p_dispute_id, dispute_closed = p_closed,
    disputed = not (p_closed and p_won), updated_at = now()
  where s.payment_key = p_key;
  return private.stripe_payment_update(p_key, null, null, null,
                                       case when p_closed then 'dispute_closed' else 'dispute' end);
end
$$;
revoke all on function private.stripe_dispute(text, text, boolean, boolean) from public, anon, authenticated, service_role;

create function private.stripe_payment_update(p_key text, p_amount bigint, p_refunded bigint, p_disputed boolean,
                                              p_cause text) returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v jsonb;
begin
  if p_key is null then
    return 'no_payment_intent';
  end if;
  perform pg_advisory_xact_lock(hashtextextended('stripe-payment:' || p_key, 0));
  perform private.lock_account(s.org_id, s.user_id) from public.stripe_payments s where s.payment_key = p_key;
  insert into public.stripe_payments as s (payment_key, amount, amount_refunded, disputed)
  values (p_key, p_amount, coalesce(p_refunded, 0), coalesce(p_disputed, false))
  on conflict (payment_key) do update set
    amount = coalesce(excluded.amount, s.amount),  -- the charge's amount is what refunds are measured against
    amount_refunded = greatest(s.amount_refunded, coalesce(p_refunded, 0)),
    disputed = coalesce(p_disputed, s.disputed),
    updated_at = now();
  v := private.reconcile_payment(p_key, p_cause);
  return case when (v ->> 'reconciled')::boolean then p_cause || '_applied' else p_cause || '_pending' end;
end
$$;
revoke all on function private.stripe_payment_update(text, bigint, bigint, boolean, text) from public, anon, authenticated, service_role;

create function public.stripe_apply_event(event jsonb, config jsonb) returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_id text := stripe_apply_event.event ->> 'id';
  v_type text := stripe_apply_event.event ->> 'type';
  v_created timestamptz;
  o jsonb := stripe_apply_event.event #> '{data,object}';
  v_outcome text;
  v_new boolean;
begin
  perform private.require_backend('stripe_apply_event');
  if v_id is null or v_type is null or o is null or jsonb_typeof(o) <> 'object'
     or coalesce(stripe_apply_event.event ->> 'created', '') !~ '^\d+$' then
    perform private.err(400, 'invalid_event', 'Not a Stripe event (id, type, created, data.object).');
  end if;
  v_created := to_timestamp((stripe_apply_event.event ->> 'created')::bigint);
  insert into public.stripe_events (id, type, created, livemode, payload)
  values (v_id, v_type, v_created, coalesce((stripe_apply_event.event ->> 'livemode')::boolean, false),
          stripe_apply_event.event)
  on conflict (id) do nothing
  returning true into v_new;
  if v_new is null then
    return jsonb_build_object('event_id', v_id, 'duplicate', true,
      'outcome', (select e.outcome from public.stripe_events e where e.id = v_id));
  end if;

  v_outcome := case
    when v_type in ('checkout.session.completed', 'checkout.session.async_payment_succeeded') then
      case
        when o ->> 'mode' = 'subscription' then 'subscription_checkout_completed'
        when o ->> 'mode' <> 'payment' then 'ignored_mode'
        when o ->> 'payment_status' not in ('paid', 'no_payment_required') then 'awaiting_payment'
        else private.stripe_payment_paid(o, stripe_apply_event.config)
      end
    when v_type = 'checkout.session.async_payment_failed' then 'payment_failed'
    when v_type = 'invoice.paid' then private.stripe_invoice_paid(o, stripe_apply_event.config)
    when v_type in ('customer.subscription.created', 'customer.subscription.updated',
                    'customer.subscription.deleted') then
      private.stripe_subscription(o, v_created, v_type = 'customer.subscription.deleted', stripe_apply_event.config)
    when v_type = 'charge.refunded' then
      private.stripe_payment_update(o ->> 'payment_intent', (o ->> 'amount')::bigint,
                                    (o ->> 'amount_refunded')::bigint, null, 'refund')
    when v_type = 'charge.dispute.created' then
      private.stripe_dispute(o ->> 'payment_intent', o ->> 'id', false, false)
    when v_type = 'charge.dispute.closed' then
      private.stripe_dispute(o ->> 'payment_intent', o ->> 'id', true, o ->> 'status' = 'won')
    else 'ignored'
  end;
  update public.stripe_events e set outcome = v_outcome where e.id = v_id;
  return jsonb_build_object('event_id', v_id, 'duplicate', false, 'outcome', v_outcome);
end
$$;
comment on function public.stripe_apply_event(jsonb, jsonb) is
  'Backend only: apply one verified Stripe event exactly once (deduplicated by event id). config carries the '
  'server''s pack_credits, plan_credits and price_tiers. Raises on an event it cannot apply yet, so Stripe retries.';
revoke all on function public.stripe_apply_event(jsonb, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.stripe_apply_event(jsonb, jsonb) to service_role;  -- backend only

