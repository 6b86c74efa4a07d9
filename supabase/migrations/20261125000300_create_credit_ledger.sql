-- Credit pools: the ledger, debit_credits (what members, CI and the CLI spend with) and
-- grant_credits (backend only: purchases, plan credits, operator grants).
--
-- Invariant: for every account (an org, or a user's personal balance) the sum of its ledger
-- amounts equals its balance. Balances change only here, with one conditional UPDATE (never
-- read-then-write) and the ledger row in the same transaction.

create table public.credit_transactions (
  id uuid primary key default gen_random_uuid(),
  org_id uuid references public.orgs (id) on delete restrict,
  user_id uuid,
  service_key_id uuid references public.api_keys (id) on delete restrict,
  amount bigint not null,
  balance_after bigint not null,
  reason text not null,
  idempotency_key text,
  system_key text,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint credit_transactions_amount_nonzero check (amount <> 0),
  constraint credit_transactions_balance_after_nonnegative check (balance_after >= 0),
  constraint credit_transactions_has_account check (org_id is not null or user_id is not null),
  constraint credit_transactions_reason_format check (reason ~ '^[a-z][a-z0-9_.]{0,39}$'),
  constraint credit_transactions_idempotency_key_length check (length(idempotency_key) between 1 and 200),
  constraint credit_transactions_system_key_length check (length(system_key) between 1 and 300),
  constraint credit_transactions_one_key check (idempotency_key is null or system_key is null),
  constraint credit_transactions_metadata_object check (jsonb_typeof(metadata) = 'object')
);
create unique index credit_transactions_idempotency_key
  on public.credit_transactions ((coalesce(org_id, user_id)), idempotency_key)
  where idempotency_key is not null;
create unique index credit_transactions_system_key
  on public.credit_transactions ((coalesce(org_id, user_id)), system_key)
  where system_key is not null;
create index credit_transactions_org_created_idx
  on public.credit_transactions (org_id, created_at desc, id desc) where org_id is not null;
create index credit_transactions_user_created_idx
  on public.credit_transactions (user_id, created_at desc, id desc);
comment on table public.credit_transactions is
  'The credit ledger. Account = org_id, or user_id when org_id is null (personal). '
  'Sum of amounts per account = its balance. Written only by debit_credits / grant_credits.';
comment on column public.credit_transactions.user_id is
  'Personal rows: the account owner. Org rows: the user who acted (null for a service key or the system). '
  'No foreign key: history outlives a deleted user.';
comment on column public.credit_transactions.service_key_id is 'The org service key that acted (CI), if any.';
comment on column public.credit_transactions.amount is 'Negative = debit, positive = grant.';
comment on column public.credit_transactions.idempotency_key is
  'A client''s key (Idempotency-Key), unique per account. A replay with the same arguments returns the first '
  'result; different arguments: PT409.';
comment on column public.credit_transactions.system_key is
  'A key the platform derived (Stripe object id, reversal step, signup), unique per account. A namespace of its '
  'own: no client key can collide with it.';

alter table public.credit_transactions enable row level security;
revoke all on table public.credit_transactions from anon, authenticated, service_role;
grant select on table public.credit_transactions to authenticated, service_role;

create policy credit_transactions_select on public.credit_transactions for select to authenticated
  using (
    case when org_id is null
      then user_id = (select auth.uid())
      else (select private.has_role_on_org(org_id, array['admin', 'viewer']))
           or (user_id = (select auth.uid()) and org_id in (select private.user_org_ids()))
    end
  );

-- Shared checks --------------------------------------------------------------------------------

create function private.check_credit_args(p_amount bigint, p_reason text, p_key text, p_metadata jsonb,
                                          p_max bigint)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_amount is null or p_amount <= 0 or p_amount > p_max then
    perform private.err(400, 'invalid_amount', format('amount must be a whole number from 1 to %s.', p_max),
                        jsonb_build_object('field', 'amount'));
  end if;
  if p_reason is null or p_reason !~ '^[a-z][a-z0-9_.]{0,39}$' then
    perform private.err(400, 'invalid_reason',
      'reason is 1-40 characters: a lower-case letter, then a-z, 0-9, "_" or ".".',
      jsonb_build_object('field', 'reason'));
  end if;
  if p_key is not null and length(p_key) not between 1 and 200 then
    perform private.err(400, 'invalid_idempotency_key', 'idempotency_key is 1-200 characters.',
                        jsonb_build_object('field', 'idempotency_key'));
  end if;
  if p_metadata is null or jsonb_typeof(p_metadata) <> 'object' or length(p_metadata::text) > 4096 then
    perform private.err(400, 'invalid_metadata', 'metadata is a JSON object of at most 4 KB.',
                        jsonb_build_object('field', 'metadata'));
  end if;
end
$$;
revoke all on function private.check_credit_args(bigint, text, text, jsonb, bigint) from public, anon, authenticated, service_role;

create function private.tx_json(t public.credit_transactions, p_replayed boolean) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
begin
  return jsonb_build_object(
    'transaction_id', t.id,
    'source', case when t.org_id is null then 'user' else 'org' end,
    'org_id', t.org_id,
    'org_slug', (select o.slug from public.orgs o where o.id = t.org_id),
    'user_id', case when t.org_id is null then t.user_id end,
    'amount', t.amount,
    'balance', t.balance_after,
    'reason', t.reason,
    'replayed', p_replayed);
end
$$;
revoke all on function private.tx_json(public.credit_transactions, boolean) from public, anon, authenticated, service_role;

-- Returns the earlier row for this account and key, or raises PT409 when it differs. Client keys
-- (p_system = false) and the platform's own keys (p_system = true) are separate namespaces.
create function private.idempotent_replay(p_account uuid, p_key text, p_system boolean, p_amount bigint,
                                          p_reason text, p_metadata jsonb, p_user uuid, p_service_key uuid)
returns public.credit_transactions
language plpgsql volatile
set search_path = ''
as $$
declare
  v_prev public.credit_transactions;
begin
  if p_key is null then
    return null;
  end if;
  -- Concurrent calls with one key serialize here; the loser then sees the winner's row.
  perform pg_advisory_xact_lock(hashtextextended(
    p_account::text || case when p_system then '/system/' else '/client/' end || p_key, 0));
  if p_system then
    select * into v_prev from public.credit_transactions t
    where coalesce(t.org_id, t.user_id) = p_account and t.system_key = p_key;
  else
    select * into v_prev from public.credit_transactions t
    where coalesce(t.org_id, t.user_id) = p_account and t.idempotency_key = p_key;
  end if;
  if v_prev.id is null then
    return null;
  end if;
  if v_prev.amount <> p_amount or v_prev.reason <> p_reason or v_prev.metadata <> p_metadata
     or v_prev.user_id is distinct from p_user or v_prev.service_key_id is distinct from p_service_key then
    -- Only the actor who made the first transaction learns which one it was.
    perform private.err(409, 'idempotency_conflict',
      format('Idempotency key %s was already used with different arguments.', p_key),
      jsonb_build_object('idempotency_key', p_key) || case
        when v_prev.user_id is not distinct from p_user and v_prev.service_key_id is not distinct from p_service_key
        then jsonb_build_object('transaction_id', v_prev.id) else '{}'::jsonb end);
  end if;
  return v_prev;
end
$$;
revoke all on function private.idempotent_replay(uuid, text, boolean, bigint, text, jsonb, uuid, uuid) from public, anon, authenticated, service_role;

-- debit_credits ------------------------------------------------------------------------------

create function public.debit_credits(amount bigint, reason text, org text default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_uid uuid := (select auth.uid());
  v_key_id uuid;
  v_key_org uuid;
  v_org uuid;
  v_role text;
  v_balance bigint;
  v_have bigint;
  v_meta jsonb := coalesce(debit_credits.metadata, '{}'::jsonb);
  v_prev public.credit_transactions;
  v_tx public.credit_transactions;
begin
  perform private.check_credit_args(debit_credits.amount, debit_credits.reason, debit_credits.idempotency_key,
                                    v_meta, 1000000);
  if v_uid is null then
    select s.key_id, s.org_id into v_key_id, v_key_org from private.service_key() s;
    if v_key_id is null then
      perform private.err(403, 'no_actor', 'Spending needs a signed-in user or an active org service key.');
    end if;
  end if;

  if debit_credits.org is not null and btrim(debit_credits.org) <> '' then
    v_org := private.find_org(debit_credits.org);
  elsif v_key_id is not null then
    v_org := v_key_org;  -- a service key has no personal balance: it spends its org's
  end if;
  if v_org is not null or (debit_credits.org is not null and btrim(debit_credits.org) <> '') then
    v_role := case when v_org is not null then private.actor_org_role(v_org) end;
    if v_role is null then
      perform private.err(403, 'org_forbidden',
        format('You are not a member of org %s (or it does not exist).', coalesce(debit_credits.org, v_org::text)),
        jsonb_build_object('org', coalesce(debit_credits.org, v_org::text)));
    elsif v_role not in ('admin', 'member', 'service') then
      perform private.err(403, 'cannot_spend',
        format('Your role in this org (%s) cannot spend its credits.', v_role),
        jsonb_build_object('org_id', v_org, 'role', v_role));
    end if;
  end if;

  v_prev := private.idempotent_replay(coalesce(v_org, v_uid), debit_credits.idempotency_key, false,
                                      -debit_credits.amount, debit_credits.reason, v_meta, v_uid, v_key_id);
  if v_prev.id is not null then
    return private.tx_json(v_prev, true);
  end if;

  if v_org is not null then
    update public.orgs o set credit_balance = o.credit_balance - debit_credits.amount
    where o.id = v_org and o.credit_balance >= debit_credits.amount
    returning o.credit_balance into v_balance;
    if v_balance is null then
      select o.credit_balance into v_have from public.orgs o where o.id = v_org;
    else
      -- The org row is now locked, and membership changes and key revocations take that lock too:
      -- read the caller's right to spend again, as of now. One of a spend and a concurrent removal
      -- loses; a removal that committed while this spend waited is seen here.
      v_role := private.actor_org_role(v_org);
      if v_role is null or v_role not in ('admin', 'member', 'service') then
        perform private.err(403, 'cannot_spend',
          'Your right to spend this org''s credits was withdrawn while the request was in flight.',
          jsonb_build_object('org_id', v_org, 'role', v_role));
      end if;
    end if;
  else
    update public.profiles p set credit_balance = p.credit_balance - debit_credits.amount
    where p.id = v_uid and p.credit_balance >= debit_credits.amount
    returning p.credit_balance into v_balance;
    if v_balance is null then
      select p.credit_balance into v_have from public.profiles p where p.id = v_uid;
    end if;
  end if;
  if v_balance is null then
    perform private.err(402, 'insufficient_credits',
      format('%s has %s credits, %s needed.',
             case when v_org is null then 'Your personal balance' else 'The org' end,
             coalesce(v_have, 0), debit_credits.amount),
      jsonb_build_object('balance', coalesce(v_have, 0), 'needed', debit_credits.amount,
                         'source', case when v_org is null then 'user' else 'org' end, 'org_id', v_org));
  end if;

  insert into public.credit_transactions
    (org_id, user_id, service_key_id, amount, balance_after, reason, idempotency_key, metadata)
  values (v_org, v_uid, v_key_id, -debit_credits.amount, v_balance, debit_credits.reason,
          debit_credits.idempotency_key, v_meta)
  returning * into v_tx;
  perform private.audit_append(coalesce(v_org, v_uid), v_org, 'credit_debit', 'credit_transaction', v_tx.id::text,
    jsonb_build_object('amount', debit_credits.amount, 'reason', debit_credits.reason,
      'source', case when v_org is null then 'user' else 'org' end, 'balance_after', v_balance,
      'idempotency_key', debit_credits.idempotency_key));
  return private.tx_json(v_tx, false);
end
$$;
comment on function public.debit_credits(bigint, text, text, text, jsonb) is
  'Spend credits: from org (id or slug; admin/member/service key) or, without org, the caller''s personal '
  'balance. PT402 when short, PT403 when not allowed, PT409 on an idempotency key reused with other arguments. '
  'Returns {transaction_id, source, org_id, org_slug, balance, replayed, ...}.';
revoke all on function public.debit_credits(bigint, text, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.debit_credits(bigint, text, text, text, jsonb) to authenticated;

-- grant_credits ------------------------------------------------------------------------------

create function public.grant_credits(amount bigint, reason text, org text default null, user_id uuid default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_org uuid;
  v_meta jsonb := coalesce(grant_credits.metadata, '{}'::jsonb);
  v_balance bigint;
  v_prev public.credit_transactions;
  v_tx public.credit_transactions;
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
    v_org := private.require_org(grant_credits.org);
  elsif not exists (select 1 from public.profiles p where p.id = grant_credits.user_id) then
    perform private.err(404, 'user_not_found', 'No such user.');
  end if;

  v_prev := private.idempotent_replay(coalesce(v_org, grant_credits.user_id), grant_credits.idempotency_key, true,
                                      grant_credits.amount, grant_credits.reason, v_meta,
                                      case when v_org is null then grant_credits.user_id end, null);
  if v_prev.id is not null then
    return private.tx_json(v_prev, true);
  end if;

  if v_org is not null then
    update public.orgs o set credit_balance = o.credit_balance + grant_credits.amount where o.id = v_org
    returning o.credit_balance into v_balance;
  else
    update public.profiles p set credit_balance = p.credit_balance + grant_credits.amount
    where p.id = grant_credits.user_id
    returning p.credit_balance into v_balance;
  end if;
  insert into public.credit_transactions (org_id, user_id, amount, balance_after, reason, system_key, metadata)
  values (v_org, case when v_org is null then grant_credits.user_id end, grant_credits.amount, v_balance,
          grant_credits.reason, grant_credits.idempotency_key, v_meta)
  returning * into v_tx;
  perform private.audit_append(coalesce(v_org, grant_credits.user_id), v_org, 'credits_granted', 'credit_transaction',
    v_tx.id::text, jsonb_build_object('amount', grant_credits.amount, 'reason', grant_credits.reason,
      'balance_after', v_balance, 'idempotency_key', grant_credits.idempotency_key, 'metadata', v_meta));
  return private.tx_json(v_tx, false);
end
$$;
comment on function public.grant_credits(bigint, text, text, uuid, text, jsonb) is
  'Backend only (service_role): add credits to an org or a user (purchase, plan_grant, admin_grant, ...). '
  'The idempotency key (a Stripe object id, say) makes a repeat a no-op; it is a system key, which no client '
  'key can collide with.';
revoke all on function public.grant_credits(bigint, text, text, uuid, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.grant_credits(bigint, text, text, uuid, text, jsonb) to service_role;  -- backend only

-- Billing status ---------------------------------------------------------------------------

create function public.billing_status(org text default null) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_ctx jsonb := public.resolve_org(billing_status.org);
  v_profile public.profiles;
begin
  select * into v_profile from public.profiles p where p.id = (select auth.uid());
  return jsonb_build_object(
    'tier', case
      when v_ctx ->> 'plan' = 'team' then 'team'
      when v_profile.plan = 'pro' then 'pro'
      else 'free' end,
    'balance', coalesce((v_ctx ->> 'credit_balance')::bigint, v_profile.credit_balance, 0),
    'source', case when v_ctx is null then 'user' else 'org' end,
    'org', case when v_ctx is not null then jsonb_build_object(
      'id', v_ctx -> 'id', 'slug', v_ctx -> 'slug', 'name', v_ctx -> 'name', 'role', v_ctx -> 'role',
      'plan', v_ctx -> 'plan') end,
    'personal_balance', v_profile.credit_balance,
    'plan', v_profile.plan);
end
$$;
comment on function public.billing_status(text) is
  'What the next consume would draw from: tier, balance, source, org and the personal balance.';
revoke all on function public.billing_status(text) from public, anon, authenticated, service_role;
grant execute on function public.billing_status(text) to authenticated;

-- Invariant check ----------------------------------------------------------------------------

create function public.ledger_mismatches() returns table (account_kind text, account_id uuid, balance bigint,
                                                          ledger_sum bigint)
language plpgsql stable security definer
set search_path = ''
as $$
begin
  perform private.require_backend('ledger_mismatches');
  return query
    select 'org'::text, o.id, o.credit_balance, coalesce(sum(t.amount), 0)::bigint
    from public.orgs o left join public.credit_transactions t on t.org_id = o.id
    group by o.id having o.credit_balance <> coalesce(sum(t.amount), 0)
    union all
    select 'user'::text, p.id, p.credit_balance, coalesce(sum(t.amount), 0)::bigint
    from public.profiles p left join public.credit_transactions t on t.user_id = p.id and t.org_id is null
    group by p.id having p.credit_balance <> coalesce(sum(t.amount), 0);
end
$$;
comment on function public.ledger_mismatches() is
  'Accounts whose balance differs from the sum of their ledger (should always be empty). Operator only.';
revoke all on function public.ledger_mismatches() from public, anon, authenticated, service_role;
grant execute on function public.ledger_mismatches() to service_role;  -- backend only

-- New users' 10 credits are a ledger row; existing balances get an opening row. --------------

create or replace function private.handle_new_user() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  v_balance bigint;
begin
  insert into public.profiles (id, email) values (new.id, new.email)
  on conflict (id) do nothing
  returning credit_balance into v_balance;
  if v_balance is not null and v_balance > 0 then
    insert into public.credit_transactions (user_id, amount, balance_after, reason, system_key)
    values (new.id, v_balance, v_balance, 'signup_bonus', 'signup:' || new.id::text);
  end if;
  return new;
end
$$;
revoke all on function private.handle_new_user() from public, anon, authenticated, service_role;

insert into public.credit_transactions (org_id, amount, balance_after, reason, system_key)
select o.id, o.credit_balance, o.credit_balance, 'opening_balance', 'opening:' || o.id::text
from public.orgs o
where o.credit_balance > 0 and not exists (select 1 from public.credit_transactions t where t.org_id = o.id);
insert into public.credit_transactions (user_id, amount, balance_after, reason, system_key)
select p.id, p.credit_balance, p.credit_balance, 'opening_balance', 'opening:' || p.id::text
from public.profiles p
where p.credit_balance > 0
  and not exists (select 1 from public.credit_transactions t where t.user_id = p.id and t.org_id is null);

