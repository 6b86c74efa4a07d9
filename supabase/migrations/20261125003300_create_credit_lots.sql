-- Credit lots: every grant is a lot (amount, source, expires_at), spent in burn order (the lot that expires
-- soonest first, then the oldest).
--
-- The number line. An account's credits are laid out on a line in burn order: each unspent part of a lot is a
-- segment [seg_start, seg_end) of credit_lot_segments, and the segments are contiguous from the account's
-- drawn position D up to credit_accounts.line_end. D is not stored: D = line_end - balance. So a spend does not
-- touch any lot: taking x credits from the balance moves D forward by x, and the lots it drew from are the
-- segments under [D - x, D), which its ledger row records as line_to (D after it). Segments below D are
-- history and never change again. A grant, an expiry or a refund (rare, under the account's lock) re-lays out
-- what is left: the segments at or beyond D are cut off and laid out again, in burn order, from D.
--
-- Hence, for every account: balance = line_end - D = sum of the remaining of its lots; a lot's remaining is
-- the part of its segments beyond D; its amount = spent (segments below D) + remaining + expired + taken back.

alter table public.credit_accounts
  add column line_end bigint not null default 0,
  add column lots_expire_at timestamptz;
comment on column public.credit_accounts.line_end is
  'The end of the account''s number line (credit_lots): the drawn position is line_end - balance.';
comment on column public.credit_accounts.lots_expire_at is
  'When the next lot with credits left expires (null: none does). A spend on or after it takes the full path, '
  'which expires the lot first.';

create table public.credit_lots (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  amount bigint not null,
  source text not null,
  expires_at timestamptz,
  transaction_id uuid references public.credit_transactions (id) on delete restrict,
  payment_key text,
  expired bigint not null default 0,
  taken bigint not null default 0,
  expired_at timestamptz,
  expiring_noticed_at timestamptz,
  created_at timestamptz not null default now(),
  constraint credit_lots_amount_positive check (amount > 0),
  constraint credit_lots_source check (source in ('purchase', 'plan', 'admin', 'promo')),
  constraint credit_lots_expired_range check (expired >= 0 and taken >= 0 and expired + taken <= amount)
);
create index credit_lots_account_idx on public.credit_lots (account_id, created_at);
create index credit_lots_payment_idx on public.credit_lots (account_id, payment_key) where payment_key is not null;
comment on table public.credit_lots is
  'One lot per grant: amount, source (purchase, plan, admin, promo), expires_at (null: never). Spent in burn order '
  '(soonest expiry, then oldest) through the account''s number line (credit_lot_segments).';
comment on column public.credit_lots.expired is 'Credits that expired unspent (a ledger row with reason expired).';
comment on column public.credit_lots.taken is 'Credits a refund or a dispute took back from this lot.';
comment on column public.credit_lots.payment_key is 'The Stripe payment that bought it: refunds take back from it first.';
alter table public.credit_lots enable row level security;
revoke all on table public.credit_lots from anon, authenticated, service_role;
grant select on table public.credit_lots to service_role;

create table public.credit_lot_segments (
  account_id uuid not null references public.credit_accounts (id) on delete restrict,
  seg_start bigint not null,
  seg_end bigint not null,
  lot_id uuid not null references public.credit_lots (id) on delete restrict,
  primary key (account_id, seg_start),
  constraint credit_lot_segments_nonempty check (seg_end > seg_start)
);
create index credit_lot_segments_lot_idx on public.credit_lot_segments (lot_id);
comment on table public.credit_lot_segments is
  'The number line of each account: which lot covers [seg_start, seg_end). Below the drawn position: history '
  '(what was spent from which lot); beyond it: the lots'' remaining credits in burn order.';
alter table public.credit_lot_segments enable row level security;
revoke all on table public.credit_lot_segments from anon, authenticated, service_role;
grant select on table public.credit_lot_segments to service_role;

alter table public.credit_transactions add column line_to bigint;
comment on column public.credit_transactions.line_to is
  'For a spend: the account''s drawn position after it; it drew from the lots under [line_to + amount, line_to).';

-- Sources and positions -----------------------------------------------------------------------

create function private.lot_source(p_reason text, p_metadata jsonb) returns text
language plpgsql immutable set search_path = '' as $$
begin
  if p_metadata ->> 'lot_source' in ('purchase', 'plan', 'admin', 'promo') then
    return p_metadata ->> 'lot_source';
  end if;
  return case
    when p_reason in ('purchase', 'refund_reversal') then 'purchase'
    when p_reason = 'plan_grant' then 'plan'
    when p_reason in ('signup_bonus', 'promo') or p_reason like 'promo%' then 'promo'
    else 'admin' end;
end $$;
comment on function private.lot_source(text, jsonb) is
  'A grant''s lot source from its reason (purchase, plan_grant, signup_bonus/promo, else admin) or metadata.lot_source.';
revoke all on function private.lot_source(text, jsonb) from public, anon, authenticated, service_role;

create function private.lot_expiry(p_metadata jsonb) returns timestamptz
language plpgsql immutable set search_path = '' as $$
begin
  if p_metadata ->> 'expires_at' is null then
    return null;
  end if;
  begin
    return (p_metadata ->> 'expires_at')::timestamptz;
  exception when others then
    perform private.err(400, 'invalid_expires_at', 'expires_at is an ISO 8601 timestamp.',
                        '{"field": "expires_at"}');
  end;
  return null;
end $$;
comment on function private.lot_expiry(jsonb) is 'A grant''s metadata.expires_at as a timestamp (PT400 when it is not one).';
revoke all on function private.lot_expiry(jsonb) from public, anon, authenticated, service_role;

create function private.lot_remaining(p_lot uuid, p_drawn bigint) returns bigint
language sql stable security definer set search_path = '' as $$
  select coalesce(sum(s.seg_end - greatest(s.seg_start, p_drawn)), 0)::bigint
  from public.credit_lot_segments s where s.lot_id = p_lot and s.seg_end > p_drawn
$$;
comment on function private.lot_remaining(uuid, bigint) is 'A lot''s credits beyond the drawn position.';
revoke all on function private.lot_remaining(uuid, bigint) from public, anon, authenticated, service_role;

create function private.relayout(p_account uuid, p_drawn bigint, p_balance bigint, p_takes jsonb default '{}')
returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_ids uuid[];
  v_rem bigint[];
  v_next timestamptz;
  v_pos bigint := p_drawn;
begin
  -- The caller holds the account (private.lock_account or its balance row). Each live lot's remaining is read
  -- from its segments beyond p_drawn (less what p_takes takes back from it) before they are cut.
  select array_agg(x.id order by x.expires_at asc nulls last, x.created_at, x.id),
         array_agg(x.rem order by x.expires_at asc nulls last, x.created_at, x.id), min(x.expires_at)
  into v_ids, v_rem, v_next
  from (select l.id, l.expires_at, l.created_at,
               private.lot_remaining(l.id, p_drawn) - coalesce((p_takes ->> l.id::text)::bigint, 0) as rem
        from public.credit_lots l where l.account_id = p_account and l.expired_at is null) x
  where x.rem > 0;
  -- Cut the line at the drawn position: below it is history.
  delete from public.credit_lot_segments s where s.account_id = p_account and s.seg_start >= p_drawn;
  update public.credit_lot_segments s set seg_end = p_drawn
  where s.account_id = p_account and s.seg_start < p_drawn and s.seg_end > p_drawn;
  for i in 1 .. coalesce(array_length(v_ids, 1), 0) loop
    insert into public.credit_lot_segments (account_id, seg_start, seg_end, lot_id)
    values (p_account, v_pos, v_pos + v_rem[i], v_ids[i]);
    v_pos := v_pos + v_rem[i];
  end loop;
  if v_pos - p_drawn <> p_balance then
    raise exception 'account %: its lots hold % credits, its balance is %', p_account, v_pos - p_drawn, p_balance;
  end if;
  update public.credit_accounts a set line_end = v_pos, lots_expire_at = v_next where a.id = p_account;
end $$;
comment on function private.relayout(uuid, bigint, bigint, jsonb) is
  'Lay out an account''s live lots again from the drawn position, in burn order (soonest expiry, then oldest), '
  'less p_takes ({lot_id: credits taken back}); checks that they hold exactly the balance. The caller holds the '
  'account.';
revoke all on function private.relayout(uuid, bigint, bigint, jsonb) from public, anon, authenticated, service_role;

create function private.take_from_lots(p_account uuid, p_drawn bigint, p_amount bigint, p_first uuid) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  r record;
  v_left bigint := p_amount;
  v_take bigint;
  v_takes jsonb := '{}'::jsonb;
begin
  -- A take-back (refund, dispute) of p_amount: from lot p_first first, then in burn order. Recorded on each lot
  -- (taken); the answer is handed to the relayout that follows.
  for r in select l.id, private.lot_remaining(l.id, p_drawn) as remaining from public.credit_lots l
           where l.account_id = p_account and l.expired_at is null
           order by (l.id = p_first) desc, l.expires_at asc nulls last, l.created_at, l.id loop
    exit when v_left = 0;
    v_take := least(v_left, r.remaining);
    if v_take > 0 then
      update public.credit_lots l set taken = l.taken + v_take where l.id = r.id;
      v_takes := v_takes || jsonb_build_object(r.id::text, v_take);
      v_left := v_left - v_take;
    end if;
  end loop;
  return v_takes;
end $$;
comment on function private.take_from_lots(uuid, bigint, bigint, uuid) is
  'Take credits back from an account''s lots (the paying lot first, then in burn order); returns {lot_id: taken}.';
revoke all on function private.take_from_lots(uuid, bigint, bigint, uuid) from public, anon, authenticated, service_role;

-- Every grant makes a lot; a take-back takes from lots ----------------------------------------

create function private.ledger_lots() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_line_end bigint;
  v_drawn bigint;
  v_lot uuid;
  v_expires timestamptz;
  v_takes jsonb;
begin
  -- Only grants and take-backs reach here (the trigger's when clause): never a spend. The account is held by
  -- apply_credit_change (its conditional UPDATE, or lock_account for a sliced pool or a take-back).
  select a.line_end into v_line_end from public.credit_accounts a where a.id = new.account_id;
  v_drawn := v_line_end - (new.balance_after - new.amount);  -- the drawn position before this row
  if new.amount > 0 then
    v_expires := private.lot_expiry(new.metadata);
    if v_expires is not null and v_expires <= now() and new.reason <> 'plan_grant' then
      perform private.err(400, 'invalid_expires_at', 'expires_at must be in the future.', '{"field": "expires_at"}');
    end if;
    insert into public.credit_lots (account_id, amount, source, expires_at, transaction_id, payment_key)
    values (new.account_id, new.amount, private.lot_source(new.reason, new.metadata), v_expires, new.id,
            new.metadata ->> 'payment')
    returning id into v_lot;
    -- At the end of the line for now; the relayout puts it in its place.
    insert into public.credit_lot_segments (account_id, seg_start, seg_end, lot_id)
    values (new.account_id, v_line_end, v_line_end + new.amount, v_lot);
  else
    v_lot := (select l.id from public.credit_lots l where l.account_id = new.account_id
              and l.payment_key = new.metadata ->> 'payment' order by l.created_at limit 1);
    v_takes := private.take_from_lots(new.account_id, v_drawn, -new.amount, v_lot);
  end if;
  perform private.relayout(new.account_id, v_drawn, new.balance_after, coalesce(v_takes, '{}'));
  return null;
end $$;
comment on function private.ledger_lots() is
  'Trigger on credit_transactions (grants and take-backs only): a grant becomes a lot (metadata.expires_at, '
  'metadata.lot_source); a refund takes back from the paying lot first; then the line is laid out again.';
revoke all on function private.ledger_lots() from public, anon, authenticated, service_role;
create trigger credit_transactions_lots after insert on public.credit_transactions
  for each row when (new.amount > 0 or (new.reason = 'refund' and new.system_key is not null))
  execute function private.ledger_lots();

-- A spend's ledger row records where on the line it left the account --------------------------

create or replace function private.record_spend(p_tx uuid, p_account uuid, p_uid uuid, p_key_id uuid, p_amount bigint,
                                                p_balance bigint, p_reason text, p_key text, p_metadata jsonb,
                                                p_slug text)
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_tx public.credit_transactions;
begin
  -- The spend's ledger row, once its balance is taken (its event is already written: write_spend_event). line_to
  -- (the drawn position after it) names the lots it drew from: a read of the row this spend already holds.
  insert into public.credit_transactions
    (id, account_id, actor_user_id, service_key_id, amount, balance_after, reason, idempotency_key, metadata, line_to)
  values (p_tx, p_account, p_uid, p_key_id, -p_amount, p_balance, p_reason, p_key, p_metadata,
          (select a.line_end from public.credit_accounts a where a.id = p_account) - p_balance)
  returning * into v_tx;
  return private.tx_json(v_tx, false, p_slug);
end $$;

-- Existing balances become one lot each (source admin, no expiry) -----------------------------

insert into public.credit_lots (account_id, amount, source)
select a.id, private.account_balance(a.id), 'admin' from public.credit_accounts a where private.account_balance(a.id) > 0;
insert into public.credit_lot_segments (account_id, seg_start, seg_end, lot_id)
select l.account_id, 0, l.amount, l.id from public.credit_lots l;
update public.credit_accounts a set line_end = private.account_balance(a.id);

-- Reading lots ----------------------------------------------------------------------------------

create function private.lot_json(l public.credit_lots, p_drawn bigint) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  v_remaining bigint := case when l.expired_at is null then private.lot_remaining(l.id, p_drawn) else 0 end;
begin
  return jsonb_build_object('id', l.id, 'amount', l.amount, 'remaining', v_remaining,
    'spent', l.amount - v_remaining - l.expired - l.taken, 'expired', l.expired, 'taken_back', l.taken,
    'source', l.source, 'expires_at', l.expires_at, 'expired_at', l.expired_at, 'created_at', l.created_at,
    'transaction_id', l.transaction_id);
end $$;
comment on function private.lot_json(public.credit_lots, bigint) is 'A lot as the API answers it.';
revoke all on function private.lot_json(public.credit_lots, bigint) from public, anon, authenticated, service_role;

create function private.drawn(p_account uuid) returns bigint
language sql stable security definer set search_path = '' as $$
  select a.line_end - private.account_balance(a.id) from public.credit_accounts a where a.id = p_account
$$;
comment on function private.drawn(uuid) is 'An account''s drawn position on its number line (line_end - balance).';
revoke all on function private.drawn(uuid) from public, anon, authenticated, service_role;

create function public.list_credit_lots(org text default null, include_spent boolean default false) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(list_credit_lots.org, array['admin', 'member', 'viewer', 'service'],
                                           'forbidden', 'read its credit lots');
  v_account uuid := coalesce(c.org_id, (select auth.uid()));
  v_drawn bigint;
  v_lots jsonb;
begin
  if v_account is null then
    perform private.err(403, 'org_required', 'A service key reads its org''s lots only.');
  end if;
  v_drawn := private.drawn(v_account);
  select coalesce(jsonb_agg(x.j order by x.expires_at asc nulls last, x.created_at), '[]'::jsonb) into v_lots
  from (select private.lot_json(l, v_drawn) as j, l.expires_at, l.created_at from public.credit_lots l
        where l.account_id = v_account) x
  where list_credit_lots.include_spent or (x.j ->> 'remaining')::bigint > 0;
  return jsonb_build_object(
    'source', case when c.org_id is null then 'user' else 'org' end, 'org_id', c.org_id,
    'balance', private.account_balance(v_account),
    'expiring_soon', coalesce((select sum((j ->> 'remaining')::bigint) from jsonb_array_elements(v_lots) j
                               where (j ->> 'expires_at')::timestamptz <= now() + interval '7 days'), 0),
    'data', v_lots);
end $$;
comment on function public.list_credit_lots(text, boolean) is
  'The credit lots of the org context (or the caller''s personal account) in burn order, with expiring_soon: the '
  'credits that expire within 7 days. include_spent also lists the lots with nothing left.';
revoke all on function public.list_credit_lots(text, boolean) from public, anon, authenticated, service_role;
grant execute on function public.list_credit_lots(text, boolean) to authenticated;

create function public.lot_mismatches() returns table (account_id uuid, balance bigint, lots_remaining bigint,
                                                       ledger_sum bigint, bad_lots bigint)
language plpgsql stable security definer set search_path = '' as $$
begin
  perform private.require_backend('lot_mismatches');
  return query
    select a.id, private.account_balance(a.id),
           (select coalesce(sum(private.lot_remaining(l.id, private.drawn(a.id))), 0)::bigint
            from public.credit_lots l where l.account_id = a.id and l.expired_at is null),
           (select coalesce(sum(t.amount), 0)::bigint from public.credit_transactions t where t.account_id = a.id),
           (select count(*) from public.credit_lots l where l.account_id = a.id
              and (private.lot_remaining(l.id, private.drawn(a.id)) < 0
                   or private.lot_remaining(l.id, private.drawn(a.id)) > l.amount))
    from public.credit_accounts a
    where private.account_balance(a.id) <> (select coalesce(sum(private.lot_remaining(l.id, private.drawn(a.id))), 0)
                                           from public.credit_lots l where l.account_id = a.id and l.expired_at is null)
       or exists (select 1 from public.credit_lots l where l.account_id = a.id
                  and (private.lot_remaining(l.id, private.drawn(a.id)) < 0
                       or private.lot_remaining(l.id, private.drawn(a.id)) > l.amount));
end $$;
comment on function public.lot_mismatches() is
  'Accounts whose balance differs from the remaining of their unexpired lots, or with a lot outside 0..amount '
  '(should always be empty). Operator only.';
revoke all on function public.lot_mismatches() from public, anon, authenticated, service_role;
grant execute on function public.lot_mismatches() to service_role;  -- backend only
