-- Spending and granting credits, the balance a request would draw from, and the ledger as a
-- caller may read it. Every change goes through private.apply_credit_change (the ledger
-- migration); what is decided here is who may do it, from which account, and at what price.

create function public.debit_credits(amount bigint, reason text, org text default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := (select auth.uid());
  v_meta jsonb := coalesce(debit_credits.metadata, '{}'::jsonb);
  v_price integer;
  c private.org_context;
begin
  perform private.check_credit_args(debit_credits.amount, debit_credits.reason, debit_credits.idempotency_key,
                                    v_meta, 1000000);
  if v_uid is null and not exists (select 1 from private.service_key()) then
    perform private.err(403, 'no_actor', 'Spending needs a signed-in user or an active org service key.');
  end if;
  select p.credits into v_price from public.credit_prices p where p.action = debit_credits.reason;
  if v_price is null then
    perform private.err(400, 'unknown_action',
      format('Unknown action %L; known actions: %s.', debit_credits.reason,
             (select string_agg(p.action, ', ' order by p.action) from public.credit_prices p)),
      jsonb_build_object('field', 'reason',
                         'known_actions', (select jsonb_agg(p.action order by p.action) from public.credit_prices p)));
  elsif debit_credits.amount < v_price then
    perform private.err(400, 'count_below_price',
      format('%s costs %s credit(s); %s is below that.', debit_credits.reason, v_price, debit_credits.amount),
      jsonb_build_object('field', 'amount', 'price', v_price));
  end if;
  c := private.context(debit_credits.org, array['admin', 'member', 'service'], 'cannot_spend', 'spend its credits');
  if c.org_id is null and v_uid is null then
    perform private.err(403, 'org_required', 'A service key spends its org''s credits only.');
  end if;
  return private.apply_credit_change(coalesce(c.org_id, v_uid), -debit_credits.amount, debit_credits.reason,
    debit_credits.idempotency_key, false, v_meta,
    p_spend_roles => case when c.org_id is not null then array['admin', 'member', 'service'] end);
end $$;
comment on function public.debit_credits(bigint, text, text, text, jsonb) is
  'Spend credits for an action (reason) at no less than its price (credit_prices): from the org context (org, '
  'else the API key''s org, else the default org; admin/member/service key) or the caller''s personal balance. '
  'PT402 when short, PT403 when not allowed, PT409 on an idempotency key reused with other arguments. '
  'Returns {transaction_id, source, org_id, org_slug, balance, replayed, ...}.';
revoke all on function public.debit_credits(bigint, text, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.debit_credits(bigint, text, text, text, jsonb) to authenticated;

create function public.grant_credits(amount bigint, reason text, org text default null, user_id uuid default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_meta jsonb := coalesce(grant_credits.metadata, '{}'::jsonb);
  v_account uuid;
begin
  perform private.require_backend('grant_credits');
  perform private.check_credit_args(grant_credits.amount, grant_credits.reason, grant_credits.idempotency_key,
                                    v_meta, 100000000);
  if grant_credits.idempotency_key is null then
    perform private.err(400, 'idempotency_key_required',
      'grant_credits needs an idempotency key (e.g. the Stripe object id).', '{"field": "idempotency_key"}');
  end if;
  if (grant_credits.org is null) = (grant_credits.user_id is null) then
    perform private.err(400, 'invalid_account', 'Give exactly one of org and user_id.', '{"field": "org"}');
  end if;
  if grant_credits.org is not null then
    v_account := (private.context(grant_credits.org, array['operator'])).org_id;
  else
    select a.id into v_account from public.credit_accounts a where a.id = grant_credits.user_id and a.org_id is null;
    if v_account is null then
      perform private.err(404, 'user_not_found', 'No such user.');
    end if;
  end if;
  return private.apply_credit_change(v_account, grant_credits.amount, grant_credits.reason,
                                     grant_credits.idempotency_key, true, v_meta);
end $$;
comment on function public.grant_credits(bigint, text, text, uuid, text, jsonb) is
  'Backend only (service_role): add credits to an org or a user (purchase, plan_grant, admin_grant, ...). '
  'The idempotency key (a Stripe object id, say) makes a repeat a no-op; it is a system key, which no client '
  'key can collide with.';
revoke all on function public.grant_credits(bigint, text, text, uuid, text, jsonb)
  from public, anon, authenticated, service_role;
grant execute on function public.grant_credits(bigint, text, text, uuid, text, jsonb) to service_role;  -- backend only

create function public.billing_status(org text default null) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(billing_status.org);
  v_profile public.profiles;
  v_org public.orgs;
begin
  select * into v_profile from public.profiles p where p.id = (select auth.uid());
  select * into v_org from public.orgs o where o.id = c.org_id;
  return jsonb_build_object(
    'tier', case when v_org.plan = 'team' then 'team' when v_profile.plan = 'pro' then 'pro' else 'free' end,
    'balance', coalesce(private.account_balance(coalesce(c.org_id, v_profile.id)), 0),
    'source', case when c.org_id is null then 'user' else 'org' end,
    'org', case when c.org_id is not null then jsonb_build_object(
      'id', v_org.id, 'slug', v_org.slug, 'name', v_org.name, 'role', c.role, 'plan', v_org.plan) end,
    'personal_balance', private.account_balance(v_profile.id),
    'plan', v_profile.plan);
end $$;
comment on function public.billing_status(text) is
  'What the next consume would draw from: tier, balance, source, org and the personal balance.';
revoke all on function public.billing_status(text) from public, anon, authenticated, service_role;
grant execute on function public.billing_status(text) to authenticated;

create function public.list_credit_transactions(org text default null, since timestamptz default null,
                                                until timestamptz default null, after_created_at timestamptz default null,
                                                after_id uuid default null, page_size integer default 100)
returns jsonb
language plpgsql stable security invoker set search_path = '' as $$
declare
  -- Runs as the caller: RLS on credit_transactions decides which rows they see.
  v_account uuid := coalesce((public.resolve_org(list_credit_transactions.org) ->> 'id')::uuid, (select auth.uid()));
begin
  return (
    select coalesce(jsonb_agg(jsonb_build_object(
      'id', t.id, 'org_id', a.org_id, 'user_id', coalesce(t.actor_user_id, case when a.org_id is null then a.id end),
      'service_key_id', t.service_key_id, 'amount', t.amount, 'balance_after', t.balance_after, 'reason', t.reason,
      'idempotency_key', coalesce(t.idempotency_key, t.system_key), 'metadata', t.metadata, 'created_at', t.created_at)
      order by t.created_at desc, t.id desc), '[]'::jsonb)
    from (select * from public.credit_transactions t
          where t.account_id = v_account
            and (list_credit_transactions.since is null or t.created_at >= list_credit_transactions.since)
            and (list_credit_transactions.until is null or t.created_at < list_credit_transactions.until)
            and (list_credit_transactions.after_created_at is null
                 or (t.created_at, t.id) < (list_credit_transactions.after_created_at, list_credit_transactions.after_id))
          order by t.created_at desc, t.id desc
          limit least(greatest(coalesce(list_credit_transactions.page_size, 100), 1), 1001)) t
    join public.credit_accounts a on a.id = t.account_id);
end $$;
comment on function public.list_credit_transactions(text, timestamptz, timestamptz, timestamptz, uuid, integer) is
  'The ledger of the org context (or the caller''s personal account), newest first, keyset-paged after '
  '(after_created_at, after_id), at most page_size (1-1001) rows, as RLS lets the caller see it: an org''s admins and viewers see all, a member '
  'the spends they made.';
revoke all on function public.list_credit_transactions(text, timestamptz, timestamptz, timestamptz, uuid, integer)
  from public, anon, authenticated, service_role;
grant execute on function public.list_credit_transactions(text, timestamptz, timestamptz, timestamptz, uuid, integer)
  to authenticated;

create function public.ledger_mismatches() returns table (account_kind text, account_id uuid, balance bigint,
                                                          ledger_sum bigint)
language plpgsql stable security definer set search_path = '' as $$
begin
  perform private.require_backend('ledger_mismatches');
  return query
    select case when a.org_id is null then 'user' else 'org' end, a.id, private.account_balance(a.id),
           coalesce(sum(t.amount), 0)::bigint
    from public.credit_accounts a left join public.credit_transactions t on t.account_id = a.id
    group by a.id having private.account_balance(a.id) <> coalesce(sum(t.amount), 0);
end $$;
comment on function public.ledger_mismatches() is
  'Accounts whose balance differs from the sum of their ledger (should always be empty). Operator only.';
revoke all on function public.ledger_mismatches() from public, anon, authenticated, service_role;
grant execute on function public.ledger_mismatches() to service_role;  -- backend only
