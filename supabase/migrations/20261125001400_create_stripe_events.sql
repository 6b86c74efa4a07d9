-- Stripe billing, part 2: applying a verified webhook event, exactly once, in any order.
--
-- stripe_apply_event records the event id and applies it in the same transaction, so a repeat is a
-- no-op. Whatever order Stripe delivers checkout completion, refunds and disputes in, the credits
-- granted minus the credits taken back match the payment's current state, and each transition
-- happens once. Lock order on every path: an advisory lock on the Stripe object, then the credit
-- account (private.lock_account), then the rows that reference it. Taking the account first
-- matters: inserting a row whose foreign key points at it takes a KEY SHARE lock, and upgrading
-- that later to FOR UPDATE while another transaction queues for the same row is a deadlock.

create function private.stripe_account(p_meta jsonb, p_customer text) returns uuid
language plpgsql stable security definer set search_path = '' as $$
declare
  v uuid;
begin
  if p_meta ->> 'account_kind' in ('org', 'user') and p_meta ->> 'account_id' ~* '^[0-9a-f-]{36}$' then
    select a.id into v from public.credit_accounts a
    where a.id = (p_meta ->> 'account_id')::uuid and (a.org_id is not null) = (p_meta ->> 'account_kind' = 'org');
  end if;
  if v is null and p_customer is not null then
    select a.id into v from public.credit_accounts a where a.stripe_customer_id = p_customer;
  end if;
  return v;
end $$;
comment on function private.stripe_account(jsonb, text) is
  'The credit account an event is about: from our checkout metadata, else by its Stripe customer.';
revoke all on function private.stripe_account(jsonb, text) from public, anon, authenticated, service_role;

create function private.reconcile_payment(p_key text, p_cause text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.stripe_payments;
  v_target bigint;
  v_delta bigint;
  v_taken bigint;
  v_org uuid;
  v_idem text;
  v_meta jsonb := jsonb_build_object('payment', p_key, 'cause', p_cause);
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
  v_org := (select a.org_id from public.credit_accounts a where a.id = v.account_id);
  if v_delta > 0 then
    -- Never below zero: take what is there, and record the shortfall.
    v_taken := coalesce(-(private.apply_credit_change(v.account_id, -v_delta, 'refund', v_idem, true, v_meta,
                                                      p_partial => true, p_audit => false) ->> 'amount')::bigint, 0);
    perform private.audit_append(v.account_id, v_org, 'credits_refunded', 'stripe_payment', p_key,
      jsonb_build_object('credits', v_delta, 'taken', v_taken, 'shortfall', v_delta - v_taken, 'cause', p_cause,
                         'amount_refunded', v.amount_refunded, 'disputed', v.disputed));
  else
    perform private.apply_credit_change(v.account_id, -v_delta, 'refund_reversal', v_idem, true, v_meta);
    perform private.audit_append(v.account_id, v_org, 'credits_restored', 'stripe_payment', p_key,
      jsonb_build_object('credits', -v_delta, 'cause', p_cause));
  end if;
  update public.stripe_payments s set credits_reversed = v_target, updated_at = now() where s.payment_key = p_key;
  return jsonb_build_object('reconciled', true, 'delta', v_delta, 'taken', v_taken);
end $$;
comment on function private.reconcile_payment(text, text) is
  'Bring what was taken back from a payment''s credits in line with its refunds and disputes (take or restore).';
revoke all on function private.reconcile_payment(text, text) from public, anon, authenticated, service_role;

create function private.apply_plan(p_account uuid) returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_org boolean := exists (select 1 from public.orgs o where o.id = p_account);
  v_old text;
  v_new text;
begin
  -- An org is on team with a live Team subscription, else pro; a user on pro with a live Pro one, else free.
  v_new := case when v_org then case when private.live_subscription(p_account, 'team') then 'team' else 'pro' end
                else case when private.live_subscription(p_account, 'pro') then 'pro' else 'free' end end;
  if v_org then
    select o.plan into v_old from public.orgs o where o.id = p_account for update;
    update public.orgs o set plan = v_new where o.id = p_account and o.plan is distinct from v_new;
  else
    select p.plan into v_old from public.profiles p where p.id = p_account for update;
    update public.profiles p set plan = v_new where p.id = p_account and p.plan is distinct from v_new;
  end if;
  if v_new is distinct from v_old then
    perform private.audit_append(p_account, case when v_org then p_account end, 'plan_changed',
      case when v_org then 'org' else 'user' end, p_account::text, jsonb_build_object('from', v_old, 'to', v_new));
  end if;
end $$;
comment on function private.apply_plan(uuid) is 'Set the account owner''s plan from its live subscriptions; audited.';
revoke all on function private.apply_plan(uuid) from public, anon, authenticated, service_role;

create function private.stripe_payment_paid(o jsonb, p_config jsonb) returns text
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_meta jsonb := coalesce(o -> 'metadata', '{}'::jsonb);
  v_key text := coalesce(o ->> 'payment_intent', o ->> 'id');
  v_account uuid;
  v_credits bigint;
  v_pay public.stripe_payments;
begin
  perform pg_advisory_xact_lock(hashtextextended('stripe-payment:' || v_key, 0));
  v_account := private.stripe_account(v_meta, o ->> 'customer');
  if v_account is null then
    raise exception 'checkout session % names no known account', o ->> 'id';
  end if;
  perform private.lock_account(v_account);
  v_credits := coalesce(nullif(v_meta ->> 'credits', '')::bigint, (p_config -> 'pack_credits' ->> (v_meta ->> 'pack'))::bigint);
  if v_credits is null or v_credits <= 0 then
    raise exception 'checkout session % has no credit amount', o ->> 'id';
  end if;
  insert into public.stripe_payments as s (payment_key, checkout_session, account_id, purchaser_id, pack, credits,
                                           amount, currency)
  values (v_key, o ->> 'id', v_account, nullif(v_meta ->> 'purchaser_id', '')::uuid, v_meta ->> 'pack', v_credits,
          (o ->> 'amount_total')::bigint, o ->> 'currency')
  on conflict (payment_key) do update set
    checkout_session = excluded.checkout_session, account_id = excluded.account_id,
    purchaser_id = excluded.purchaser_id, pack = excluded.pack, credits = excluded.credits,
    amount = coalesce(s.amount, excluded.amount), currency = excluded.currency, updated_at = now();
  select * into v_pay from public.stripe_payments s where s.payment_key = v_key for update;
  if v_pay.granted_at is not null then
    return 'already_granted';
  end if;
  perform private.apply_credit_change(v_account, v_credits, 'purchase', o ->> 'id', true,
    jsonb_build_object('checkout_session', o ->> 'id', 'payment', v_key, 'pack', v_meta ->> 'pack'));
  update public.stripe_payments s set granted_at = now() where s.payment_key = v_key;
  perform private.audit_append(v_account, (select a.org_id from public.credit_accounts a where a.id = v_account),
    'credits_purchased', 'stripe_checkout_session', o ->> 'id', jsonb_build_object('credits', v_credits,
      'pack', v_meta ->> 'pack', 'amount_total', o -> 'amount_total', 'currency', o ->> 'currency',
      'purchaser_id', v_meta ->> 'purchaser_id'));
  perform private.reconcile_payment(v_key, 'late_checkout');
  return 'credits_granted';
end $$;
comment on function private.stripe_payment_paid(jsonb, jsonb) is
  'A paid credit-pack checkout: grant its credits once (then reconcile any refund or dispute that came first).';
revoke all on function private.stripe_payment_paid(jsonb, jsonb) from public, anon, authenticated, service_role;

create function private.stripe_subscription(o jsonb, p_created timestamptz, p_deleted boolean, p_config jsonb)
returns text
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_prev public.subscriptions;
  v_account uuid;
  v_tier text;
  v_status text := case when p_deleted then 'canceled' else o ->> 'status' end;
  v_end timestamptz := to_timestamp(coalesce(o #>> '{items,data,0,current_period_end}',
                                             o ->> 'current_period_end')::double precision);
  v_rank integer;
  v_prev_rank integer;
begin
  -- One event per subscription at a time: the first two deliveries cannot both miss the row.
  perform pg_advisory_xact_lock(hashtextextended('stripe-subscription:' || (o ->> 'id'), 0));
  select * into v_prev from public.subscriptions s where s.id = o ->> 'id' for update;
  if v_prev.id is not null then
    -- Stripe often sends several events for one subscription within the same second: on a tie the
    -- status later in the lifecycle wins, so delivery order cannot matter. Final stays final.
    v_rank := coalesce((select st.rank from private.subscription_statuses st where st.status = v_status), 6);
    v_prev_rank := coalesce((select st.rank from private.subscription_statuses st where st.status = v_prev.status), 6);
    if p_created < v_prev.last_event_at or v_prev_rank = 6 or (p_created = v_prev.last_event_at and v_rank < v_prev_rank)
    then
      return 'stale_ignored';
    end if;
  end if;
  v_account := coalesce(v_prev.account_id, private.stripe_account(coalesce(o -> 'metadata', '{}'::jsonb), o ->> 'customer'));
  v_tier := coalesce(o -> 'metadata' ->> 'tier', v_prev.tier, p_config -> 'price_tiers' ->> (o #>> '{items,data,0,price,id}'));
  if v_account is null or v_tier is null then
    raise exception 'subscription % names no known account or tier', o ->> 'id';
  end if;
  if (v_tier = 'team') <> exists (select 1 from public.orgs g where g.id = v_account) then
    raise exception 'subscription %: tier % does not fit the account', o ->> 'id', v_tier;
  end if;
  perform private.lock_account(v_account);
  insert into public.subscriptions as s (id, account_id, tier, status, customer, current_period_end, last_event_at)
  values (o ->> 'id', v_account, v_tier, v_status, o ->> 'customer', v_end, p_created)
  on conflict (id) do update set status = excluded.status, current_period_end = excluded.current_period_end,
    last_event_at = excluded.last_event_at, updated_at = now();
  perform private.apply_plan(v_account);
  return 'subscription_' || v_status;
end $$;
comment on function private.stripe_subscription(jsonb, timestamptz, boolean, jsonb) is
  'A subscription created, updated or deleted: keep Stripe''s latest state (stale events ignored), then the plan.';
revoke all on function private.stripe_subscription(jsonb, timestamptz, boolean, jsonb)
  from public, anon, authenticated, service_role;

create function private.stripe_invoice_paid(o jsonb, p_config jsonb) returns text
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_sub_id text := coalesce(o #>> '{parent,subscription_details,subscription}', o ->> 'subscription');
  v_meta jsonb := coalesce(o #> '{parent,subscription_details,metadata}', o -> 'subscription_details' -> 'metadata',
                           '{}'::jsonb);
  v_sub public.subscriptions;
  v_account uuid;
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
  v_account := coalesce(v_sub.account_id, private.stripe_account(v_meta, o ->> 'customer'));
  v_tier := coalesce(v_sub.tier, v_meta ->> 'tier',
                     p_config -> 'price_tiers' ->> (o #>> '{lines,data,0,pricing,price_details,price}'));
  if v_account is null or v_tier is null then
    raise exception 'invoice % (subscription %) names no known account or tier', o ->> 'id', v_sub_id;
  end if;
  v_credits := (p_config -> 'plan_credits' ->> v_tier)::bigint;
  if coalesce(v_credits, 0) <= 0 then
    return 'no_plan_credits';
  end if;
  perform private.apply_credit_change(v_account, v_credits, 'plan_grant', o ->> 'id', true,
    jsonb_build_object('invoice', o ->> 'id', 'subscription', v_sub_id, 'tier', v_tier,
                       'billing_reason', o ->> 'billing_reason'));
  perform private.audit_append(v_account, (select a.org_id from public.credit_accounts a where a.id = v_account),
    'credits_purchased', 'stripe_invoice', o ->> 'id', jsonb_build_object('credits', v_credits, 'tier', v_tier,
      'subscription', v_sub_id, 'billing_reason', o ->> 'billing_reason', 'amount_paid', o -> 'amount_paid'));
  return 'plan_credits_granted';
end $$;
comment on function private.stripe_invoice_paid(jsonb, jsonb) is
  'A paid subscription invoice (creation or renewal): grant the plan''s credits once per invoice.';
revoke all on function private.stripe_invoice_paid(jsonb, jsonb) from public, anon, authenticated, service_role;

create function private.stripe_payment_update(p_key text, p_amount bigint, p_refunded bigint, p_dispute_id text,
                                              p_closed boolean, p_won boolean, p_cause text) returns text
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.stripe_payments;
begin
  if p_key is null then
    return 'no_payment_intent';
  end if;
  perform pg_advisory_xact_lock(hashtextextended('stripe-payment:' || p_key, 0));
  perform private.lock_account(s.account_id) from public.stripe_payments s where s.payment_key = p_key;
  insert into public.stripe_payments (payment_key) values (p_key) on conflict (payment_key) do nothing;
  select * into v from public.stripe_payments s where s.payment_key = p_key for update;
  if p_dispute_id is not null then
    -- A closed dispute stays closed: its "created" event arriving late changes nothing.
    if v.dispute_id is not distinct from p_dispute_id and v.dispute_closed and not p_closed then
      return 'dispute_already_closed';
    end if;
    update public.stripe_payments s set dispute_id = p_dispute_id, dispute_closed = p_closed,
      disputed = not (p_closed and p_won), updated_at = now()
    where s.payment_key = p_key;
  else
    update public.stripe_payments s set
      amount = coalesce(p_amount, s.amount),  -- the charge's amount is what refunds are measured against
      amount_refunded = greatest(s.amount_refunded, coalesce(p_refunded, 0)),
      updated_at = now()
    where s.payment_key = p_key;
  end if;
  return p_cause || case when (private.reconcile_payment(p_key, p_cause) ->> 'reconciled')::boolean
                         then '_applied' else '_pending' end;
end $$;
comment on function private.stripe_payment_update(text, bigint, bigint, text, boolean, boolean, text) is
  'A refund (cumulative amount) or a dispute (created, closed won/lost) on a payment; then reconcile its credits.';
revoke all on function private.stripe_payment_update(text, bigint, bigint, text, boolean, boolean, text)
  from public, anon, authenticated, service_role;

create function public.stripe_apply_event(event jsonb, config jsonb) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
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
      private.stripe_payment_update(o ->> 'payment_intent', (o ->> 'amount')::bigint, (o ->> 'amount_refunded')::bigint,
                                    null, null, null, 'refund')
    when v_type = 'charge.dispute.created' then
      private.stripe_payment_update(o ->> 'payment_intent', null, null, o ->> 'id', false, false, 'dispute')
    when v_type = 'charge.dispute.closed' then
      private.stripe_payment_update(o ->> 'payment_intent', null, null, o ->> 'id', true, o ->> 'status' = 'won',
                                    'dispute_closed')
    else 'ignored'
  end;
  update public.stripe_events e set outcome = v_outcome where e.id = v_id;
  return jsonb_build_object('event_id', v_id, 'duplicate', false, 'outcome', v_outcome);
end $$;
comment on function public.stripe_apply_event(jsonb, jsonb) is
  'Backend only: apply one verified Stripe event exactly once (deduplicated by event id). config carries the '
  'server''s pack_credits, plan_credits and price_tiers. Raises on an event it cannot apply yet, so Stripe retries.';
revoke all on function public.stripe_apply_event(jsonb, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.stripe_apply_event(jsonb, jsonb) to service_role;  -- backend only
