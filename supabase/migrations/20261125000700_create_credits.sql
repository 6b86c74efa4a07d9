-- Spending and granting credits, the balance a request would draw from, and the ledger as a
-- caller may read it. Every change goes through private.apply_credit_change (the ledger
-- migration); what is decided here is who may do it, from which account, and at what price.

-- Spending: the common case in a few statements, the rest through apply_credit_change ---------------

create function private.spend_fast(p_uid uuid, p_org text, p_amount bigint, p_reason text, p_key text,
                                   p_metadata jsonb, p_roles text[])
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_claims jsonb := auth.jwt();
  v_key_id uuid;
  v_org uuid;
  v_slug text;
  v_slices integer;
  v_version bigint;
  v_price integer;
  v_role text;
  v_tx uuid := gen_random_uuid();
  v_event bigint;
  v_balance bigint;
begin
  -- A member (or the org's service key) spending from an org's pool that can pay, with a new idempotency key or
  -- none: what the CLI does all day. Everything else returns null, having written nothing, and debit_credits
  -- takes the full path (apply_credit_change), which also gives every refusal its error.
  -- 1. Before any lock: the org (explicit, the API key's, the default), the price, the pool, the caller's role
  -- and the version of the pool's rights it was read at; the audit event.
  if p_uid is null then
    v_key_id := nullif(v_claims -> 'upshift' ->> 'key_id', '')::uuid;
  end if;
  if (p_uid is null and v_key_id is null) or private.is_backend() then
    return null;  -- no actor, or the operator (whose explicit org is the 'operator' role: the full path refuses it)
  end if;
  if p_org is not null and btrim(p_org) <> '' then
    v_org := private.find_org(p_org);
  else
    v_org := coalesce(nullif(v_claims -> 'upshift' ->> 'org_id', '')::uuid,
                      (select p.default_org_id from public.profiles p where p.id = p_uid));
  end if;
  select o.slug, a.slices, a.access_version, pr.credits, coalesce(m.role, case when k.id is not null then 'service' end)
  into v_slug, v_slices, v_version, v_price, v_role
  from public.orgs o
  join public.credit_accounts a on a.id = o.id
  left join public.credit_prices pr on pr.action = p_reason
  left join public.org_members m on m.org_id = o.id and m.user_id = p_uid
  left join public.api_keys k on k.id = v_key_id and k.org_id = o.id and k.kind = 'service' and k.revoked_at is null
                              and (k.expires_at is null or k.expires_at > now())
  where o.id = v_org;
  if v_role is null or not v_role = any (p_roles) or v_price is null or p_amount < v_price then
    return null;
  end if;
  if p_key is not null then
    perform private.lock_idempotency_key(v_org, false, p_key);
    if exists (select 1 from public.credit_transactions t where t.account_id = v_org and t.idempotency_key = p_key) then
      return null;  -- a replay (or a conflict): the full path answers it
    end if;
  end if;
  v_event := private.write_spend_event(v_org, true, v_tx, p_amount, p_reason, p_key);

  -- 2. The balance: its one row while the rights are still those read above (a removal, demotion or key
  -- revocation bumps access_version, and takes this row's lock to do it: whichever of the two comes second sees
  -- the other), or a free slice that can pay.
  if v_slices = 1 then
    update public.credit_accounts a set balance = a.balance - p_amount
    where a.id = v_org and a.slices = 1 and a.access_version = v_version and a.balance >= p_amount
    returning a.balance into v_balance;
  else
    v_balance := private.take_slice(v_org, p_amount, hashtext(coalesce(p_uid, v_key_id)::text) & 65535);
    -- A slice is not the row a removal bumps: re-read the caller's right now that the slice is held (a new
    -- snapshot). Removals lock every slice first, so one of the two still sees the other.
    if v_balance is not null and not coalesce(private.actor_role(v_org) = any (p_roles), false) then
      perform private.err(403, 'cannot_spend',
        'Your right to spend this org''s credits was withdrawn while the request was in flight.',
        jsonb_build_object('org_id', v_org, 'role', private.actor_role(v_org)));
    end if;
  end if;
  if v_balance is null then
    -- Short, its rights changed meanwhile, or every slice busy or short: the full path decides, from scratch.
    delete from private.audit_outbox o where o.id = v_event;
    return null;
  end if;

  -- 3. The ledger row: the only write while a one-row pool is held.
  return private.record_spend(v_tx, v_org, p_uid, v_key_id, p_amount, v_balance, p_reason, p_key, p_metadata, v_slug);
end $$;
comment on function private.spend_fast(uuid, text, bigint, text, text, jsonb, text[]) is
  'debit_credits'' common case (a member or service key, an org pool that can pay, no replay): one conditional '
  'UPDATE and one ledger row under the lock; null, having written nothing, when the full path must answer.';
revoke all on function private.spend_fast(uuid, text, bigint, text, text, jsonb, text[])
  from public, anon, authenticated, service_role;

create function public.debit_credits(amount bigint, reason text, org text default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := auth.uid();
  v_meta jsonb := coalesce(debit_credits.metadata, '{}'::jsonb);
  v_price integer;
  v_roles text[] := array['admin', 'member', 'service'];
  v_result jsonb;
  c private.org_context;
begin
  perform private.check_credit_args(debit_credits.amount, debit_credits.reason, debit_credits.idempotency_key,
                                    v_meta, 1000000);
  v_result := private.spend_fast(v_uid, debit_credits.org, debit_credits.amount, debit_credits.reason,
                                 debit_credits.idempotency_key, v_meta, v_roles);
  if v_result is not null then
    return v_result;
  end if;
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
  c := private.context(debit_credits.org, v_roles, 'cannot_spend', 'spend its credits');
  if c.org_id is null and v_uid is null then
    perform private.err(403, 'org_required', 'A service key spends its org''s credits only.');
  end if;
  return private.apply_credit_change(coalesce(c.org_id, v_uid), -debit_credits.amount, debit_credits.reason,
    debit_credits.idempotency_key, false, v_meta,
    p_spend_roles => case when c.org_id is not null then v_roles end);
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
