-- The credit ledger: one account model, pgledger-style.
--
-- Every balance belongs to a row of credit_accounts: an org's pool (id = the org's id) or a user's
-- personal credits (id = the user's id). Every change to a balance goes through one function,
-- private.apply_credit_change, which applies a signed amount with conditional UPDATEs (never
-- read-then-write), writes the ledger row and the audit event in the same transaction, and makes
-- a replay with the same idempotency key return the first result. Invariant: for every account,
-- the sum of its ledger amounts equals its balance, and no balance is ever negative.
--
-- A hot pool can be sliced: its balance then lives in K rows of credit_slices (K = slices, up to
-- 64), so that concurrent spends take different rows instead of queueing on one. A spend takes an
-- unlocked slice that can pay, starting at the one its actor prefers; only when none can (all are
-- busy, or each is short) does it lock the whole pool, pay from its total, spread the rest evenly
-- again, and grow K when contention was the cause. The account's balance is the sum of its slices;
-- refusal still happens only when the whole pool cannot pay. Small accounts keep one slice: the
-- balance on their credit_accounts row, read and changed with one statement.

create table public.credit_accounts (
  id uuid primary key,
  org_id uuid references public.orgs (id) on delete restrict,
  balance bigint not null default 0,
  slices integer not null default 1,
  access_version bigint not null default 0,
  stripe_customer_id text,
  created_at timestamptz not null default now(),
  constraint credit_accounts_balance_nonnegative check (balance >= 0),
  constraint credit_accounts_slices_range check (slices between 1 and 64),
  constraint credit_accounts_sliced_balance check (slices = 1 or balance = 0),
  constraint credit_accounts_org_is_id check (org_id is null or org_id = id),
  constraint credit_accounts_stripe_customer_id_key unique (stripe_customer_id)
);
comment on table public.credit_accounts is
  'One credit account per org (id = org_id = the org''s id) or per user (id = the user''s id, org_id null). Its '
  'balance: the balance column when slices = 1, else the sum of its credit_slices (private.account_balance). '
  'Changed only by private.apply_credit_change; never negative.';
comment on column public.credit_accounts.slices is
  'How many rows the balance is spread over (1: this row''s balance; more: credit_slices, for a hot pool).';
comment on column public.credit_accounts.access_version is
  'Bumped whenever someone''s right to spend from the pool shrinks (a member removed or demoted, a service key '
  'revoked, expired early or deleted): a spend that read the rights at version v updates the balance only while it '
  'is still v, so it needs no second look at them once the row is locked.';
comment on column public.credit_accounts.stripe_customer_id is 'The Stripe customer that pays for this account.';
alter table public.credit_accounts enable row level security;
revoke all on table public.credit_accounts from anon, authenticated, service_role;
grant select on table public.credit_accounts to authenticated, service_role;
create policy credit_accounts_select on public.credit_accounts for select to authenticated
  using (id = (select auth.uid()) or id in (select private.user_org_ids()));

create function private.bump_access_version() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- Any change that can take a right to spend away, by whatever path (our RPCs, a cascade from auth.users, the
  -- dashboard): spends that read the old rights then miss the balance row and re-check on the full path.
  -- (api_keys: service keys only, by the trigger's when clause)
  update public.credit_accounts a set access_version = a.access_version + 1 where a.id = old.org_id;
  return null;
end $$;
comment on function private.bump_access_version() is
  'Trigger: a member removed or their role changed, or a service key changed or deleted, bumps their org pool''s '
  'access_version.';
revoke all on function private.bump_access_version() from public, anon, authenticated, service_role;
create trigger org_members_bump_access_version after update of role or delete on public.org_members
  for each row execute function private.bump_access_version();
create trigger api_keys_bump_access_version after update of revoked_at, expires_at, org_id, kind or delete
  on public.api_keys for each row when (old.kind = 'service') execute function private.bump_access_version();

create table public.credit_slices (
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  slice integer not null,
  balance bigint not null,
  primary key (account_id, slice),
  constraint credit_slices_balance_nonnegative check (balance >= 0),
  constraint credit_slices_slice_range check (slice between 0 and 63)
);
comment on table public.credit_slices is
  'A sliced pool''s balance, spread over slices 0..K-1 (K = credit_accounts.slices > 1). Never negative.';
alter table public.credit_slices enable row level security;
revoke all on table public.credit_slices from anon, authenticated, service_role;
grant select on table public.credit_slices to authenticated, service_role;
create policy credit_slices_select on public.credit_slices for select to authenticated
  using (account_id = (select auth.uid()) or account_id in (select private.user_org_ids()));

create table public.credit_prices (
  action text primary key,
  credits integer not null,
  updated_at timestamptz not null default now(),
  constraint credit_prices_action_format check (action ~ '^[a-z][a-z0-9_.]{0,39}$'),
  constraint credit_prices_credits_range check (credits between 1 and 1000000)
);
comment on table public.credit_prices is
  'What each action costs (explain, fix, audit, ...). debit_credits refuses an unknown action or less than its '
  'price. The operator changes it (upshift-platform prices set, or UPSHIFT_PRICES at startup).';
alter table public.credit_prices enable row level security;
revoke all on table public.credit_prices from anon, authenticated, service_role;
grant select on table public.credit_prices to authenticated, service_role;
create policy credit_prices_select on public.credit_prices for select to authenticated using (true);
insert into public.credit_prices (action, credits) values ('explain', 1), ('fix', 3), ('audit', 2);

create table public.credit_transactions (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  actor_user_id uuid,
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
  constraint credit_transactions_reason_format check (reason ~ '^[a-z][a-z0-9_.]{0,39}$'),
  constraint credit_transactions_idempotency_key_length check (length(idempotency_key) between 1 and 200),
  constraint credit_transactions_system_key_length check (length(system_key) between 1 and 300),
  constraint credit_transactions_one_key check (idempotency_key is null or system_key is null),
  constraint credit_transactions_metadata_object check (jsonb_typeof(metadata) = 'object')
);
create unique index credit_transactions_idempotency_key on public.credit_transactions (account_id, idempotency_key)
  where idempotency_key is not null;
create unique index credit_transactions_system_key on public.credit_transactions (account_id, system_key)
  where system_key is not null;
create index credit_transactions_account_created_idx on public.credit_transactions (account_id, created_at desc, id desc);
comment on table public.credit_transactions is
  'The credit ledger. Sum of amounts per account = its balance. Written only by private.apply_credit_change.';
comment on column public.credit_transactions.actor_user_id is
  'The user who acted (null for a service key or the system). No foreign key: history outlives a deleted user.';
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
-- Personal rows: their owner. An org's rows: its admins and viewers; a member sees the spends they made.
create policy credit_transactions_select on public.credit_transactions for select to authenticated
  using (
    account_id = (select auth.uid())
    or (select private.has_role_on_org(account_id, array['admin', 'viewer']))
    or (actor_user_id = (select auth.uid()) and account_id in (select private.user_org_ids()))
  );

-- Applying a change ----------------------------------------------------------------------------

create function private.check_credit_args(p_amount bigint, p_reason text, p_key text, p_metadata jsonb,
                                          p_max bigint)
returns void
language plpgsql immutable set search_path = '' as $$
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
end $$;
comment on function private.check_credit_args(bigint, text, text, jsonb, bigint) is
  'The arguments every money RPC shares: amount 1..p_max, reason format, key length, metadata object <= 4 KB.';
revoke all on function private.check_credit_args(bigint, text, text, jsonb, bigint)
  from public, anon, authenticated, service_role;

create function private.tx_json(t public.credit_transactions, p_replayed boolean, p_slug text) returns jsonb
language plpgsql immutable set search_path = '' as $$
begin
  return jsonb_build_object(
    'transaction_id', t.id,
    'source', case when p_slug is null then 'user' else 'org' end,
    'org_id', case when p_slug is not null then t.account_id end,
    'org_slug', p_slug,
    'user_id', case when p_slug is null then t.account_id end,
    'amount', t.amount,
    'balance', t.balance_after,
    'reason', t.reason,
    'replayed', p_replayed);
end $$;
comment on function private.tx_json(public.credit_transactions, boolean, text) is
  'A ledger row as the money RPCs answer it: {transaction_id, source, org_id, org_slug, balance, replayed, ...}.';
revoke all on function private.tx_json(public.credit_transactions, boolean, text)
  from public, anon, authenticated, service_role;

-- Balances and pools ---------------------------------------------------------------------------

create function private.account_balance(p_account uuid) returns bigint
language plpgsql stable security definer set search_path = '' as $$
begin
  return (select a.balance + coalesce((select sum(s.balance) from public.credit_slices s where s.account_id = a.id), 0)
          from public.credit_accounts a where a.id = p_account);
end $$;
comment on function private.account_balance(uuid) is 'An account''s balance: its own, or the sum of its slices.';
revoke all on function private.account_balance(uuid) from public, anon, authenticated, service_role;

create function private.lock_account(p_account uuid) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- Every spend locks the row it takes from (the account, or one of its slices), so whatever changes who
  -- may spend from a pool (members, keys, invites) locks them all: it then serializes with spends in
  -- flight, one of the two sees the other. Stripe paths lock it before the rows that reference it.
  -- Always in this order (the account, then its slices by number), so two lockers cannot deadlock; and the
  -- account row only FOR NO KEY UPDATE, which a spend's ledger row (a foreign key to it: KEY SHARE) never waits
  -- for, while it holds a slice that this locker waits for.
  perform 1 from public.credit_accounts a where a.id = p_account for no key update;
  perform 1 from public.credit_slices s where s.account_id = p_account order by s.slice for update;
  return private.account_balance(p_account);
end $$;
comment on function private.lock_account(uuid) is
  'Lock an account and all its slices (the locks spends take), in a fixed order; returns its balance.';
revoke all on function private.lock_account(uuid) from public, anon, authenticated, service_role;

create function private.spread_pool(p_account uuid, p_total bigint, p_slices integer, p_cause text) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_before integer := (select a.slices from public.credit_accounts a where a.id = p_account);
  v_slices integer := least(greatest(p_slices, 1), 64);
begin
  -- The caller holds the pool (private.lock_account). Ledger-neutral: the total does not change here.
  delete from public.credit_slices s where s.account_id = p_account and (v_slices = 1 or s.slice >= v_slices);
  if v_slices = 1 then
    update public.credit_accounts a set balance = p_total, slices = 1 where a.id = p_account;
  else
    update public.credit_accounts a set balance = 0, slices = v_slices where a.id = p_account;
    insert into public.credit_slices as s (account_id, slice, balance)
    select p_account, g, p_total / v_slices + case when g < p_total % v_slices then 1 else 0 end
    from generate_series(0, v_slices - 1) g
    on conflict (account_id, slice) do update set balance = excluded.balance;
  end if;
  if p_cause is not null then
    perform private.audit_append(p_account, (select a.org_id from public.credit_accounts a where a.id = p_account),
      'credit_pool_rebalanced', 'credit_account', p_account::text,
      jsonb_build_object('slices_before', v_before, 'slices', v_slices, 'balance', p_total, 'cause', p_cause));
  end if;
  return p_total;
end $$;
comment on function private.spread_pool(uuid, bigint, integer, text) is
  'Set a locked pool''s total and spread it evenly over p_slices rows (1: the account row). With p_cause, audited as '
  'credit_pool_rebalanced. Ledger-neutral when the total is unchanged.';
revoke all on function private.spread_pool(uuid, bigint, integer, text) from public, anon, authenticated, service_role;

create function private.take_slice(p_account uuid, p_amount bigint, p_prefer integer) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_slices integer := (select a.slices from public.credit_accounts a where a.id = p_account);
  v_slice integer;
begin
  -- An unlocked slice that can pay, starting at the one this actor prefers: concurrent spends take different
  -- slices; none waits for another. In a subtransaction: a slice that another spend emptied between this
  -- statement's snapshot and its lock is locked but skipped, and a caller that goes on to lock the whole pool
  -- (account, then every slice) while holding it would deadlock with a whole-pool locker waiting for it. When
  -- no slice can pay, the rollback releases whatever was locked.
  begin
    with s as (
      select x.slice from public.credit_slices x
      where x.account_id = p_account and x.balance >= p_amount
      order by (x.slice - p_prefer % v_slices + v_slices) % v_slices
      for update skip locked limit 1)
    update public.credit_slices x set balance = x.balance - p_amount from s
    where x.account_id = p_account and x.slice = s.slice and x.balance >= p_amount
    returning x.slice into v_slice;
    if v_slice is null then
      raise exception using errcode = 'UPNSL';
    end if;
  exception when sqlstate 'UPNSL' then
    return null;
  end;
  return private.account_balance(p_account);
end $$;
comment on function private.take_slice(uuid, bigint, integer) is
  'Take p_amount from a free slice of a sliced pool that can pay (null, holding no slice, when none can); returns '
  'the pool''s balance after.';
revoke all on function private.take_slice(uuid, bigint, integer) from public, anon, authenticated, service_role;

create function private.spend_from_slices(p_account uuid, p_amount bigint, p_prefer integer) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_slices integer;
  v_total bigint := private.take_slice(p_account, p_amount, p_prefer);
begin
  if v_total is not null then
    return v_total;
  end if;
  -- No free slice can pay: every slice is busy, or each is short. Hold the whole pool; refuse only when its
  -- total cannot pay; otherwise pay from the total and spread the rest again (more slices when they were busy).
  v_total := private.lock_account(p_account);
  if v_total < p_amount then
    return null;
  end if;
  v_slices := (select a.slices from public.credit_accounts a where a.id = p_account);
  if exists (select 1 from public.credit_slices s where s.account_id = p_account and s.balance >= p_amount) then
    return private.spread_pool(p_account, v_total - p_amount, least(v_slices * 2, 64), 'contention');
  end if;
  return private.spread_pool(p_account, v_total - p_amount, v_slices, 'shortage');
end $$;
comment on function private.spend_from_slices(uuid, bigint, integer) is
  'Take p_amount from a sliced pool: a free slice that can pay, else the whole pool (spread again, or grown when it '
  'was contention); returns the pool''s balance after, or null when the whole pool cannot pay.';
revoke all on function private.spend_from_slices(uuid, bigint, integer) from public, anon, authenticated, service_role;

create function private.write_spend_event(p_account uuid, p_org boolean, p_tx uuid, p_amount bigint, p_reason text,
                                          p_key text) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  -- Written before the balance is taken (and rolled back with the spend if it is refused), so that the only work
  -- done while a hot balance row is held is the ledger row. Its balance_after comes from that ledger row when the
  -- sealer moves the event into the chain (private.seal_audit_scope), which every reader of the log waits for.
  insert into private.audit_outbox (event)
  values (private.audit_row(p_account, case when p_org then p_account end, 'credit_debit', 'credit_transaction',
            p_tx::text, jsonb_build_object('amount', p_amount, 'reason', p_reason,
                                           'source', case when p_org then 'org' else 'user' end,
                                           'idempotency_key', p_key), null))
  returning id into v_id;
  return v_id;
end $$;
comment on function private.write_spend_event(uuid, boolean, uuid, bigint, text, text) is
  'A spend''s credit_debit event, into the outbox before its balance is taken (balance_after is added at sealing); '
  'returns its outbox id.';
revoke all on function private.write_spend_event(uuid, boolean, uuid, bigint, text, text)
  from public, anon, authenticated, service_role;

create function private.record_spend(p_tx uuid, p_account uuid, p_uid uuid, p_key_id uuid, p_amount bigint,
                                     p_balance bigint, p_reason text, p_key text, p_metadata jsonb, p_slug text)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_tx public.credit_transactions;
begin
  -- The spend's ledger row, once its balance is taken (its event is already written: write_spend_event).
  insert into public.credit_transactions
    (id, account_id, actor_user_id, service_key_id, amount, balance_after, reason, idempotency_key, metadata)
  values (p_tx, p_account, p_uid, p_key_id, -p_amount, p_balance, p_reason, p_key, p_metadata)
  returning * into v_tx;
  return private.tx_json(v_tx, false, p_slug);
end $$;
comment on function private.record_spend(uuid, uuid, uuid, uuid, bigint, bigint, text, text, jsonb, text) is
  'A client spend''s ledger row, once its balance is taken; its answer.';
revoke all on function private.record_spend(uuid, uuid, uuid, uuid, bigint, bigint, text, text, jsonb, text)
  from public, anon, authenticated, service_role;

create function private.lock_idempotency_key(p_account uuid, p_system boolean, p_key text) returns void
language plpgsql volatile set search_path = '' as $$
begin
  perform pg_advisory_xact_lock(hashtextextended(
    p_account::text || case when p_system then '/system/' else '/client/' end || p_key, 0));
end $$;
comment on function private.lock_idempotency_key(uuid, boolean, text) is
  'Serialize the transactions that use one idempotency key on one account (client and system keys apart).';
revoke all on function private.lock_idempotency_key(uuid, boolean, text) from public, anon, authenticated, service_role;

create function private.apply_credit_change(
  p_account uuid, p_amount bigint, p_reason text, p_key text, p_system boolean, p_metadata jsonb,
  p_spend_roles text[] default null, p_partial boolean default false, p_audit boolean default true)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := (select auth.uid());
  v_key_id uuid;
  v_slices integer;
  v_org boolean;
  v_slug text;
  v_balance bigint;
  v_amount bigint := p_amount;
  v_role text;
  v_prev public.credit_transactions;
  v_tx public.credit_transactions;
  v_spend boolean;
begin
  if v_uid is null then
    v_key_id := (select s.key_id from private.service_key() s);
  end if;
  -- What the account is (and the org's slug, for the answer): read before any lock.
  select a.slices, a.org_id is not null, o.slug into v_slices, v_org, v_slug
  from public.credit_accounts a left join public.orgs o on o.id = a.org_id where a.id = p_account;
  if v_slices is null then
    perform private.err(404, 'account_not_found', 'No such credit account.', jsonb_build_object('account_id', p_account));
  end if;

  -- 1. A key seen before returns the first result (client keys and system keys are separate
  -- namespaces); concurrent calls with one key serialize on the advisory lock.
  if p_key is not null then
    perform private.lock_idempotency_key(p_account, p_system, p_key);
    if p_system then
      select * into v_prev from public.credit_transactions t where t.account_id = p_account and t.system_key = p_key;
    else
      select * into v_prev from public.credit_transactions t
      where t.account_id = p_account and t.idempotency_key = p_key;
    end if;
    if v_prev.id is not null then
      -- (A take-back records what it could take: its amount and metadata are not the request's.)
      if (not p_partial and (v_prev.amount <> p_amount or v_prev.metadata <> p_metadata)) or v_prev.reason <> p_reason
         or v_prev.actor_user_id is distinct from v_uid or v_prev.service_key_id is distinct from v_key_id then
        -- Only the actor who made the first transaction learns which one it was.
        perform private.err(409, 'idempotency_conflict',
          format('Idempotency key %s was already used with different arguments.', p_key),
          jsonb_build_object('idempotency_key', p_key) || case
            when v_prev.actor_user_id is not distinct from v_uid and v_prev.service_key_id is not distinct from v_key_id
            then jsonb_build_object('transaction_id', v_prev.id) else '{}'::jsonb end);
      end if;
      return private.tx_json(v_prev, true, v_slug);
    end if;
  end if;
  v_tx.id := gen_random_uuid();
  v_spend := p_audit and p_amount < 0 and not p_system and not p_partial;
  if v_spend then
    -- A client's spend: its event (actor, address, user agent, time) is written before the lock, too.
    perform private.write_spend_event(p_account, v_org, v_tx.id, -p_amount, p_reason, p_key);
  end if;

  -- 2. The balance, with conditional UPDATEs: never below zero.
  if p_amount < 0 and not p_partial then
    if v_slices = 1 then
      update public.credit_accounts a set balance = a.balance + p_amount
      where a.id = p_account and a.slices = 1 and a.balance + p_amount >= 0
      returning a.balance into v_balance;
    end if;
    if v_balance is null and (v_slices > 1 or (select a.slices from public.credit_accounts a where a.id = p_account) > 1)
    then
      v_balance := private.spend_from_slices(p_account, -p_amount, hashtext(coalesce(v_uid, v_key_id)::text) & 65535);
    end if;
    if v_balance is null then
      v_balance := private.account_balance(p_account);
      perform private.err(402, 'insufficient_credits',
        format('%s has %s credits, %s needed.', case when v_org then 'The org' else 'Your personal balance' end,
               v_balance, -p_amount),
        jsonb_build_object('balance', v_balance, 'needed', -p_amount, 'source', case when v_org then 'org' else 'user' end,
                           'org_id', case when v_org then p_account end));
    end if;
  elsif p_amount > 0 and v_slices = 1 then
    update public.credit_accounts a set balance = a.balance + p_amount where a.id = p_account and a.slices = 1
    returning a.balance into v_balance;
  end if;
  if v_balance is null then
    -- A grant to a sliced pool, or a take-back (refund, dispute: it takes what is there, and the caller records
    -- any shortfall): the whole pool, locked.
    v_balance := private.lock_account(p_account);
    v_amount := case when p_amount > 0 then p_amount else -least(v_balance, -p_amount) end;
    if v_amount = 0 then
      return null;
    end if;
    v_slices := (select a.slices from public.credit_accounts a where a.id = p_account);
    v_balance := private.spread_pool(p_account, v_balance + v_amount, v_slices, null);
  end if;

  -- 3. A spend re-reads the caller's right now that its row is locked: membership changes and key
  -- revocations lock the whole pool, so one of a spend and a concurrent removal loses.
  if p_spend_roles is not null and v_org then
    v_role := private.actor_role(p_account);
    if v_role is null or not v_role = any (p_spend_roles) then
      perform private.err(403, 'cannot_spend',
        'Your right to spend this org''s credits was withdrawn while the request was in flight.',
        jsonb_build_object('org_id', p_account, 'role', v_role));
    end if;
  end if;

  -- 4. The ledger row and the audit event, in the same transaction.
  if v_spend then
    return private.record_spend(v_tx.id, p_account, v_uid, v_key_id, -p_amount, v_balance, p_reason, p_key,
                                p_metadata, v_slug);
  end if;
  insert into public.credit_transactions
    (id, account_id, actor_user_id, service_key_id, amount, balance_after, reason, idempotency_key, system_key, metadata)
  values (v_tx.id, p_account, v_uid, v_key_id, v_amount, v_balance, p_reason,
          case when not p_system then p_key end, case when p_system then p_key end,
          p_metadata || case when p_partial then jsonb_build_object('requested', -p_amount,
                                                                    'shortfall', v_amount - p_amount) else '{}' end)
  returning * into v_tx;
  if p_audit then
    perform private.audit_append(p_account, case when v_org then p_account end,
      case when v_amount < 0 then 'credit_debit' else 'credits_granted' end, 'credit_transaction', v_tx.id::text,
      jsonb_build_object('amount', abs(v_amount), 'reason', p_reason, 'balance_after', v_balance,
                         'idempotency_key', p_key, 'metadata', p_metadata));
  end if;
  return private.tx_json(v_tx, false, v_slug);
end $$;
comment on function private.apply_credit_change(uuid, bigint, text, text, boolean, jsonb, text[], boolean, boolean) is
  'The one way a balance changes: apply a signed amount to an account or its pool (PT402 below zero, or with '
  'p_partial take what is there), write the ledger row and (p_audit) the credit_debit / credits_granted event. A '
  'replayed key (p_system: the platform''s namespace) returns the first result. p_spend_roles: re-check the caller''s '
  'role once its row is locked.';
revoke all on function private.apply_credit_change(uuid, bigint, text, text, boolean, jsonb, text[], boolean, boolean)
  from public, anon, authenticated, service_role;
