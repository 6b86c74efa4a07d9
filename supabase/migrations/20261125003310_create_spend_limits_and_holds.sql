-- Spend controls, part 1: the tables and helpers of spend limits (per member and per service key inside an
-- org's shared pool) and of holds (credits reserved, then captured or released), and the sweep that expires
-- holds and lots. The spend path that enforces them is the next migration.
--
-- Cheap flags on credit_accounts let private.spend_fast decide in its one UPDATE whether it may go ahead:
-- has_limits (some member or key of the org has a limit), held (credits reserved by active holds) and
-- holds_expire_at (the earliest expiry among them), lots_expire_at (credit_lots). An org with none keeps the
-- fast path as it was.
--
-- Lock order, everywhere: an idempotency key's advisory lock, then the account row, then its slices, then a
-- limit row, then a hold row. Setting a limit or creating a hold bumps access_version, so that a spend that read
-- the account before takes the full path.

alter table public.credit_accounts
  add column has_limits boolean not null default false,
  add column held bigint not null default 0,
  add column holds_expire_at timestamptz,
  add constraint credit_accounts_held_nonnegative check (held >= 0);
comment on column public.credit_accounts.has_limits is
  'Some member or service key of this org has a spend limit (spend_limits): their spends take the full path.';
comment on column public.credit_accounts.held is
  'Credits reserved by active holds (credit_holds): available = balance - held.';
comment on column public.credit_accounts.holds_expire_at is 'When the next active hold expires (null: no hold).';

-- Holds are ledger rows of amount 0: visible in the ledger, neutral to its sum.
alter table public.credit_transactions drop constraint credit_transactions_amount_nonzero;
alter table public.credit_transactions add constraint credit_transactions_amount_nonzero
  check (amount <> 0 or reason in ('hold', 'hold_released', 'hold_expired'));

-- Limits ----------------------------------------------------------------------------------------

create function private.limit_periods() returns text[]
language sql immutable set search_path = '' as $$ select array['day', 'month', 'total'] $$;
comment on function private.limit_periods() is
  'Spend limit periods, in UTC: day (from 00:00 UTC), month (from the 1st, 00:00 UTC), total (never resets).';
revoke all on function private.limit_periods() from public, anon, authenticated, service_role;

create function private.period_start(p_period text, p_at timestamptz) returns timestamptz
language sql immutable set search_path = '' as $$
  select case p_period when 'day' then date_trunc('day', p_at, 'UTC') when 'month' then date_trunc('month', p_at, 'UTC')
              else '1970-01-01 00:00:00+00'::timestamptz end
$$;
comment on function private.period_start(text, timestamptz) is 'The start of the limit period that contains p_at (UTC).';
revoke all on function private.period_start(text, timestamptz) from public, anon, authenticated, service_role;

create function private.period_resets_at(p_period text, p_start timestamptz) returns timestamptz
language sql immutable set search_path = '' as $$
  select case p_period when 'day' then p_start + interval '1 day'
                       when 'month' then (p_start at time zone 'UTC' + interval '1 month') at time zone 'UTC' end
$$;
comment on function private.period_resets_at(text, timestamptz) is 'When a limit period ends (null for total).';
revoke all on function private.period_resets_at(text, timestamptz) from public, anon, authenticated, service_role;

create table public.spend_limits (
  org_id uuid not null references public.orgs (id) on delete cascade,
  subject text not null,
  credits bigint not null,
  period text not null,
  used bigint not null default 0,
  period_start timestamptz not null,
  reached_period timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (org_id, subject),
  constraint spend_limits_subject_format
    check (subject ~ '^((member|key):[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|default:(member|key))$'),
  constraint spend_limits_credits_range check (credits between 0 and 1000000000),
  constraint spend_limits_period check (period = any (private.limit_periods())),
  constraint spend_limits_used_nonnegative check (used >= 0)
);
comment on table public.spend_limits is
  'Spend limits inside an org''s pool: subject member:<user_id> or key:<service key id> may spend at most credits '
  'per period (day, month: UTC; total). used counts the spends and active holds of the period that began at '
  'period_start. default:member and default:key are copied to each new member and new service key.';
comment on column public.spend_limits.reached_period is
  'The period for which spend_limit_reached was recorded (at most one event per subject and period).';
alter table public.spend_limits enable row level security;
revoke all on table public.spend_limits from anon, authenticated, service_role;
grant select on table public.spend_limits to service_role;

create function private.limit_subject(p_uid uuid, p_key uuid) returns text
language sql immutable set search_path = '' as $$
  select case when p_uid is not null then 'member:' || p_uid::text when p_key is not null then 'key:' || p_key::text end
$$;
comment on function private.limit_subject(uuid, uuid) is 'The limit subject of an actor: member:<user id> or key:<key id>.';
revoke all on function private.limit_subject(uuid, uuid) from public, anon, authenticated, service_role;

create function private.limit_json(l public.spend_limits) returns jsonb
language plpgsql stable set search_path = '' as $$
declare
  v_start timestamptz := private.period_start(l.period, now());
  v_default boolean := l.subject like 'default:%';
begin
  return jsonb_build_object('subject', l.subject, 'credits', l.credits, 'period', l.period,
    'used', case when v_default then null when l.period_start = v_start then l.used else 0 end,
    'remaining', case when v_default then null
                      else greatest(l.credits - case when l.period_start = v_start then l.used else 0 end, 0) end,
    'period_start', case when not v_default then v_start end,
    'resets_at', case when not v_default then private.period_resets_at(l.period, v_start) end,
    'default', v_default, 'created_at', l.created_at, 'updated_at', l.updated_at);
end $$;
comment on function private.limit_json(public.spend_limits) is
  'A limit as the API answers it: used and remaining in the current period, resets_at (null for total).';
revoke all on function private.limit_json(public.spend_limits) from public, anon, authenticated, service_role;

create function private.refuse(p_error jsonb) returns jsonb
language plpgsql volatile set search_path = '' as $$
begin
  -- A refusal that must commit what it recorded (the spend_limit_reached event): PostgREST answers it with this
  -- status and commits; the platform's functions read the error field and answer 402 after committing.
  perform set_config('response.status', '402', true);
  return p_error;
end $$;
comment on function private.refuse(jsonb) is
  'Answer a refusal without rolling back (PostgREST: response.status 402); the body has error and message.';
revoke all on function private.refuse(jsonb) from public, anon, authenticated, service_role;

create function private.take_limit(p_org uuid, p_subject text, p_amount bigint) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v public.spend_limits;
  v_start timestamptz;
  v_used bigint;
  v_event boolean;
begin
  -- The caller holds the org's account row. One conditional UPDATE: the usage of the current period (0 when a new
  -- period began) plus p_amount must stay within the limit; concurrent spends of one subject queue on this row
  -- and each re-evaluates the condition on the row as the previous one left it.
  update public.spend_limits l
  set used = case when l.period_start = private.period_start(l.period, now()) then l.used else 0 end + p_amount,
      period_start = private.period_start(l.period, now())
  where l.org_id = p_org and l.subject = p_subject
    and case when l.period_start = private.period_start(l.period, now()) then l.used else 0 end + p_amount <= l.credits
  returning * into v;
  if v.org_id is not null then
    return null;
  end if;
  select * into v from public.spend_limits l where l.org_id = p_org and l.subject = p_subject;
  if v.org_id is null then
    return null;  -- no limit
  end if;
  v_start := private.period_start(v.period, now());
  v_used := case when v.period_start = v_start then v.used else 0 end;
  -- At most one event per subject and period: the first refusal of the period records it.
  update public.spend_limits l set reached_period = v_start
  where l.org_id = p_org and l.subject = p_subject and l.reached_period is distinct from v_start
  returning true into v_event;
  if v_event then
    perform private.audit_append(p_org, p_org, 'spend_limit_reached', 'spend_limit', p_subject,
      jsonb_build_object('subject', p_subject, 'limit', v.credits, 'used', v_used, 'requested', p_amount,
                         'period', v.period, 'period_start', v_start,
                         'resets_at', private.period_resets_at(v.period, v_start)));
  end if;
  return jsonb_build_object('error', 'spend_limit_reached',
    'message', format('Spend limit reached: %s of %s credits used this %s; %s more needed.', v_used, v.credits,
                      case v.period when 'total' then 'lifetime' else v.period end, p_amount),
    'limit', v.credits, 'used', v_used, 'needed', p_amount, 'period', v.period,
    'resets_at', private.period_resets_at(v.period, v_start), 'subject', p_subject, 'org_id', p_org);
end $$;
comment on function private.take_limit(uuid, text, bigint) is
  'Count p_amount against a subject''s limit in the org (null: counted, or no limit); else the refusal body, with '
  'spend_limit_reached recorded once per subject and period. The caller holds the org''s account row.';
revoke all on function private.take_limit(uuid, text, bigint) from public, anon, authenticated, service_role;

create function private.give_back_limit(p_org uuid, p_subject text, p_amount bigint, p_period_start timestamptz)
returns void
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- A hold released (in part) gives its credits back to the period it was counted in, if that period still runs.
  if p_subject is not null and p_amount > 0 then
    update public.spend_limits l set used = greatest(l.used - p_amount, 0)
    where l.org_id = p_org and l.subject = p_subject and l.period_start = p_period_start;
  end if;
end $$;
comment on function private.give_back_limit(uuid, text, bigint, timestamptz) is
  'Give released hold credits back to the limit period they were counted in (if it still runs).';
revoke all on function private.give_back_limit(uuid, text, bigint, timestamptz)
  from public, anon, authenticated, service_role;

-- Holds -------------------------------------------------------------------------------------------

create table public.credit_holds (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  actor_user_id uuid,
  service_key_id uuid references public.api_keys (id) on delete restrict,
  amount bigint not null,
  captured bigint,
  reason text not null,
  status text not null default 'active',
  expires_at timestamptz not null,
  idempotency_key text,
  limit_subject text,
  limit_period_start timestamptz,
  metadata jsonb not null default '{}'::jsonb,
  capture_transaction_id uuid references public.credit_transactions (id) on delete restrict,
  created_at timestamptz not null default now(),
  settled_at timestamptz,
  constraint credit_holds_amount_positive check (amount > 0),
  constraint credit_holds_captured_range check (captured is null or captured between 1 and amount),
  constraint credit_holds_status check (status in ('active', 'captured', 'released', 'expired')),
  constraint credit_holds_reason_format check (reason ~ '^[a-z][a-z0-9_.]{0,39}$'),
  constraint credit_holds_idempotency_key_length check (length(idempotency_key) between 1 and 200),
  constraint credit_holds_metadata_object check (jsonb_typeof(metadata) = 'object')
);
create unique index credit_holds_idempotency_key on public.credit_holds (account_id, idempotency_key)
  where idempotency_key is not null;
create index credit_holds_active_idx on public.credit_holds (account_id, expires_at) where status = 'active';
comment on table public.credit_holds is
  'Credits reserved before a call whose cost is known only afterwards: active until captured (at most amount is '
  'charged), released, or expired (expires_at passed: ignored by every balance check, swept by the job).';
alter table public.credit_holds enable row level security;
revoke all on table public.credit_holds from anon, authenticated, service_role;
grant select on table public.credit_holds to service_role;

create function private.hold_json(h public.credit_holds, p_replayed boolean) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  v_org boolean := exists (select 1 from public.orgs o where o.id = h.account_id);
  v_balance bigint := private.account_balance(h.account_id);
begin
  return jsonb_build_object('id', h.id, 'status', h.status, 'amount', h.amount, 'captured', h.captured,
    'reason', h.reason, 'expires_at', h.expires_at, 'source', case when v_org then 'org' else 'user' end,
    'org_id', case when v_org then h.account_id end, 'user_id', h.actor_user_id, 'service_key_id', h.service_key_id,
    'idempotency_key', h.idempotency_key, 'metadata', h.metadata, 'created_at', h.created_at,
    'settled_at', h.settled_at, 'transaction_id', h.capture_transaction_id, 'balance', v_balance,
    'available', v_balance - (select a.held from public.credit_accounts a where a.id = h.account_id),
    'replayed', p_replayed);
end $$;
comment on function private.hold_json(public.credit_holds, boolean) is
  'A hold as the API answers it, with the account''s balance and available credits.';
revoke all on function private.hold_json(public.credit_holds, boolean) from public, anon, authenticated, service_role;

create function private.hold_ledger_row(h public.credit_holds, p_reason text, p_key text) returns void
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- A hold's step in the ledger: amount 0 (neutral to the balance), visible in /api/credits/transactions.
  insert into public.credit_transactions
    (account_id, actor_user_id, service_key_id, amount, balance_after, reason, system_key, metadata)
  values (h.account_id, (select auth.uid()), (select s.key_id from private.service_key() s), 0,
          private.account_balance(h.account_id), p_reason, p_key,
          jsonb_build_object('hold_id', h.id, 'held', h.amount, 'hold_reason', h.reason, 'expires_at', h.expires_at));
end $$;
comment on function private.hold_ledger_row(public.credit_holds, text, text) is
  'Record a hold''s step (hold, hold_released, hold_expired) as a ledger row of amount 0.';
revoke all on function private.hold_ledger_row(public.credit_holds, text, text)
  from public, anon, authenticated, service_role;

create function private.refresh_holds(p_account uuid) returns void
language plpgsql volatile security definer set search_path = '' as $$
begin
  update public.credit_accounts a set
    held = coalesce((select sum(h.amount) from public.credit_holds h where h.account_id = p_account and h.status = 'active'), 0),
    holds_expire_at = (select min(h.expires_at) from public.credit_holds h where h.account_id = p_account and h.status = 'active')
  where a.id = p_account;
end $$;
comment on function private.refresh_holds(uuid) is 'Recompute an account''s held total and next hold expiry. The caller holds it.';
revoke all on function private.refresh_holds(uuid) from public, anon, authenticated, service_role;

create function private.subject_usage(p_org uuid, p_subject text, p_since timestamptz) returns bigint
language sql stable security definer set search_path = '' as $$
  -- What a subject spent in the org since p_since (client spends and hold captures), plus its active holds.
  select coalesce((select sum(-t.amount) from public.credit_transactions t
                   where t.account_id = p_org and t.amount < 0 and t.created_at >= p_since
                     and (t.system_key is null or t.system_key like 'hold:%')
                     and private.limit_subject(case when t.service_key_id is null then t.actor_user_id end,
                                               t.service_key_id) = p_subject), 0)::bigint
       + coalesce((select sum(h.amount) from public.credit_holds h
                   where h.account_id = p_org and h.status = 'active' and h.limit_subject = p_subject), 0)::bigint
$$;
comment on function private.subject_usage(uuid, text, timestamptz) is
  'What a limit subject spent in the org since p_since, plus its active holds: a new limit''s usage.';
revoke all on function private.subject_usage(uuid, text, timestamptz) from public, anon, authenticated, service_role;

-- The sweep: expired holds and lots, under the account's lock ------------------------------------

create function private.sweep_account(p_account uuid) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  h public.credit_holds;
  l public.credit_lots;
  v_org uuid := (select a.org_id from public.credit_accounts a where a.id = p_account);
  v_drawn bigint := private.drawn(p_account);
  v_remaining bigint;
  v_holds integer := 0;
  v_lots integer := 0;
  v_credits bigint := 0;
  v_relayout boolean := false;
begin
  -- The caller holds the whole account (private.lock_account). Holds past expires_at release themselves.
  for h in select * from public.credit_holds x where x.account_id = p_account and x.status = 'active'
           and x.expires_at <= now() order by x.expires_at for update loop
    update public.credit_holds x set status = 'expired', settled_at = now() where x.id = h.id;
    perform private.give_back_limit(p_account, h.limit_subject, h.amount, h.limit_period_start);
    perform private.hold_ledger_row(h, 'hold_expired', 'hold:' || h.id::text || ':expired');
    perform private.audit_append(p_account, v_org, 'hold_expired', 'credit_hold', h.id::text,
      jsonb_build_object('hold_id', h.id, 'amount', h.amount, 'reason', h.reason, 'expires_at', h.expires_at,
                         'user_id', h.actor_user_id, 'service_key_id', h.service_key_id));
    v_holds := v_holds + 1;
  end loop;
  if v_holds > 0 then
    perform private.refresh_holds(p_account);
  end if;
  -- Lots past expires_at: what is left of each expires (a ledger row, reason expired), then the line is laid out
  -- again without them.
  for l in select * from public.credit_lots x where x.account_id = p_account and x.expired_at is null
           and x.expires_at <= now() order by x.expires_at, x.created_at for update loop
    v_remaining := private.lot_remaining(l.id, v_drawn);
    update public.credit_lots x set expired = v_remaining, expired_at = now() where x.id = l.id;
    v_relayout := true;
    if v_remaining > 0 then
      perform private.apply_credit_change(p_account, -v_remaining, 'expired', 'expire:' || l.id::text, true,
        jsonb_build_object('lot_id', l.id, 'expires_at', l.expires_at, 'source', l.source),
        p_partial => true, p_audit => false);
      perform private.audit_append(p_account, v_org, 'credits_expired', 'credit_lot', l.id::text,
        jsonb_build_object('lot_id', l.id, 'credits', v_remaining, 'amount', l.amount, 'source', l.source,
                           'expires_at', l.expires_at, 'balance_after', private.account_balance(p_account)));
      v_lots := v_lots + 1;
      v_credits := v_credits + v_remaining;
    end if;
  end loop;
  if v_relayout or (select a.lots_expire_at <= now() from public.credit_accounts a where a.id = p_account) then
    perform private.relayout(p_account, v_drawn, private.account_balance(p_account));
  end if;
  return jsonb_build_object('holds_expired', v_holds, 'lots_expired', v_lots, 'credits_expired', v_credits);
end $$;
comment on function private.sweep_account(uuid) is
  'Expire an account''s holds and lots that are past expires_at (hold_expired, credits_expired events; an '
  'expired ledger row per lot with credits left). The caller holds the account (private.lock_account).';
revoke all on function private.sweep_account(uuid) from public, anon, authenticated, service_role;

create function private.spend_check(p_account uuid, p_subject text, p_amount bigint, p_whole boolean) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  a public.credit_accounts;
  v_balance bigint;
begin
  -- What a spend or a hold must pass beyond the balance, decided under the account's lock: expired holds and
  -- lots swept first (an expired credit is never spent, however late the job), then available credits (balance
  -- less active holds), then the subject's limit. Null: go ahead; else a refusal to answer (the limit's, which
  -- commits its event). p_whole locks every slice too (a hold: its available total must be exact).
  if p_whole then
    perform private.lock_account(p_account);
  end if;
  select * into a from public.credit_accounts x where x.id = p_account for no key update;
  if a.lots_expire_at <= now() or a.holds_expire_at <= now() then
    if not p_whole then
      perform private.lock_account(p_account);
    end if;
    perform private.sweep_account(p_account);
    select * into a from public.credit_accounts x where x.id = p_account;
  end if;
  v_balance := private.account_balance(p_account);
  if (p_whole or a.held > 0) and v_balance - a.held < p_amount then  -- (a spend with nothing held: apply_credit_change answers)
    perform private.err(402, 'insufficient_credits',
      format('%s has %s credits available (%s, %s of them held), %s needed.',
             case when a.org_id is not null then 'The org' else 'Your personal balance' end,
             v_balance - a.held, v_balance, a.held, p_amount),
      jsonb_build_object('balance', v_balance, 'available', v_balance - a.held, 'held', a.held, 'needed', p_amount,
                         'source', case when a.org_id is not null then 'org' else 'user' end, 'org_id', a.org_id));
  end if;
  if a.org_id is not null and a.has_limits and p_subject is not null then
    return private.take_limit(p_account, p_subject, p_amount);
  end if;
  return null;
end $$;
comment on function private.spend_check(uuid, text, bigint, boolean) is
  'Under the account''s lock: sweep what expired, check available (balance - held), count against the subject''s '
  'limit. Null to go ahead, a refusal body (spend_limit_reached) to answer; PT402 when short.';
revoke all on function private.spend_check(uuid, text, bigint, boolean) from public, anon, authenticated, service_role;

-- Defaults for new members and new service keys -----------------------------------------------------

create function private.apply_default_limit() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_row jsonb := to_jsonb(new);  -- org_members (user_id) or api_keys (id)
  v_org uuid := (v_row ->> 'org_id')::uuid;
  v_subject text := case when tg_table_name = 'org_members' then 'member:' || (v_row ->> 'user_id')
                         else 'key:' || (v_row ->> 'id') end;
  d public.spend_limits;
begin
  select * into d from public.spend_limits l
  where l.org_id = v_org and l.subject = case when tg_table_name = 'org_members' then 'default:member' else 'default:key' end;
  if d.org_id is null then
    return null;
  end if;
  insert into public.spend_limits (org_id, subject, credits, period, used, period_start)
  values (v_org, v_subject, d.credits, d.period, 0, private.period_start(d.period, now()))
  on conflict (org_id, subject) do nothing;
  update public.credit_accounts a set has_limits = true where a.id = v_org and not a.has_limits;
  perform private.audit_append(v_org, v_org, 'spend_limit_set', 'spend_limit', v_subject,
    jsonb_build_object('subject', v_subject, 'credits', d.credits, 'period', d.period, 'via', d.subject));
  return null;
end $$;
comment on function private.apply_default_limit() is
  'Trigger: a new member (or service key) of an org gets the org''s default:member (default:key) limit.';
revoke all on function private.apply_default_limit() from public, anon, authenticated, service_role;
create trigger org_members_default_limit after insert on public.org_members
  for each row execute function private.apply_default_limit();
create trigger api_keys_default_limit after insert on public.api_keys
  for each row when (new.kind = 'service' and new.org_id is not null) execute function private.apply_default_limit();
