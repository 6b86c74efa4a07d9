-- Usage rollup: org_usage reads pre-summed hours and days for the closed part of the ledger, and the ledger
-- itself only for what is not closed yet, so its cost no longer grows with the spends inside the range (a
-- 1,000,000-spend month: docs/benchmarks.md). Exact, not approximate: every spend is counted once.
--
-- The rule. A spend's ledger row carries created_at = now(), the start of its transaction, but becomes
-- visible only when that transaction commits, which can be much later. So "everything before T is in the
-- ledger" is only true once every transaction that started before T has ended. private.usage_state holds
-- closed_through (W): every ledger row with created_at < W is committed (or never will be) and summed into
-- private.usage_hours / private.usage_days; rows at or after W are read live from the ledger. W only moves
-- forward, in public.usage_rollup (a job, off the spend path), and only to a time T - margin such that every
-- transaction in progress at T has since ended: it lists them by their virtual transaction ids (pg_locks,
-- which every transaction holds from its first statement, before it can write, even with no xid yet; the same
-- test CREATE INDEX CONCURRENTLY waits on) and prepared transactions, and closes T - margin once none of them
-- is still running. (The margin covers the microseconds between a transaction taking its timestamp and
-- registering its id.) Spends pay nothing for this: no trigger fires, no index is added to their insert.
--
-- Writes that do not follow the rule (a row inserted with a created_at before its transaction's start, an
-- UPDATE or DELETE, TRUNCATE: none of our RPCs does them; migrations and the superuser can) are folded in by
-- a trigger when they land below W, serialized with the job on the state row, so they are exact too.
--
-- Reading [from, to): closed hours and days come from the rollup (whole UTC days from usage_days, the hours at
-- either end from usage_hours, the bucket that contains W holds exactly [its start, W)); the ledger is read
-- for the part of the first hour before from's hour ends, the part of the last hour up to `to` when `to` is
-- before W, and [W, to). So a 30-day window reads about 30 x actors day rows, up to 2 x 23 x actors hour rows,
-- and at most two partial hours plus the time since the job last ran from the ledger.

create table private.usage_state (
  id boolean primary key default true,
  closed_through timestamptz not null default '-infinity',
  updated_at timestamptz not null default now(),
  constraint usage_state_one_row check (id)
);
comment on table private.usage_state is
  'closed_through (W): every ledger row with created_at < W is committed and summed into usage_hours and '
  'usage_days; org_usage reads the rest live. Moved forward only by public.usage_rollup.';
revoke all on table private.usage_state from public, anon, authenticated, service_role;
insert into private.usage_state default values;

create table private.usage_candidates (
  through timestamptz primary key,
  waiting_for text[] not null,
  created_at timestamptz not null default clock_timestamp()
);
comment on table private.usage_candidates is
  'Times W may move to: "through" becomes closed once none of the transactions in waiting_for (virtual '
  'transaction ids, "xid:N" for prepared ones), in progress when it was taken, is still running.';
revoke all on table private.usage_candidates from public, anon, authenticated, service_role;

create table private.usage_hours (
  account_id uuid not null,
  hour timestamptz not null,
  actor_user_id uuid,
  service_key_id uuid,
  spent bigint not null,
  spends bigint not null,
  constraint usage_hours_key unique nulls not distinct (account_id, hour, actor_user_id, service_key_id),
  constraint usage_hours_whole_hour check (hour = date_trunc('hour', hour, 'UTC'))
);
comment on table private.usage_hours is
  'Credits spent from an org''s pool per UTC hour and actor (user, service key, or neither: the system), over the '
  'ledger rows before usage_state.closed_through.';
revoke all on table private.usage_hours from public, anon, authenticated, service_role;

create table private.usage_days (
  account_id uuid not null,
  day timestamptz not null,
  actor_user_id uuid,
  service_key_id uuid,
  spent bigint not null,
  spends bigint not null,
  constraint usage_days_key unique nulls not distinct (account_id, day, actor_user_id, service_key_id),
  constraint usage_days_whole_day check (day = date_trunc('day', day, 'UTC'))
);
comment on table private.usage_days is
  'Credits spent from an org''s pool per UTC day (its midnight) and actor, over the ledger rows before '
  'usage_state.closed_through.';
revoke all on table private.usage_days from public, anon, authenticated, service_role;

-- Folding ledger rows into the rollup ---------------------------------------------------------------

create function private.usage_add(p_rows jsonb) returns void
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_negative bigint;
begin
  -- p_rows: [{account_id, hour, actor_user_id, service_key_id, spent, spends}] per hour, signed (a removal is
  -- negative). Adds them to the hour and day buckets; a bucket that reaches zero spends is deleted.
  -- (No CHECK (spends >= 0) on the tables: INSERT ... ON CONFLICT checks the row it proposes, a removal's negative
  -- one, before it finds the bucket. The sums after the change are checked here instead.)
  with r as (
    select x.account_id, x.hour, x.actor_user_id, x.service_key_id, sum(x.spent) as spent, sum(x.spends) as spends
    from jsonb_to_recordset(p_rows) as x(account_id uuid, hour timestamptz, actor_user_id uuid, service_key_id uuid,
                                         spent bigint, spends bigint)
    group by 1, 2, 3, 4
  ), h as (
    insert into private.usage_hours as u (account_id, hour, actor_user_id, service_key_id, spent, spends)
    select r.account_id, r.hour, r.actor_user_id, r.service_key_id, r.spent, r.spends from r
    on conflict (account_id, hour, actor_user_id, service_key_id)
      do update set spent = u.spent + excluded.spent, spends = u.spends + excluded.spends
    returning u.spent, u.spends
  ), d as (
    insert into private.usage_days as u (account_id, day, actor_user_id, service_key_id, spent, spends)
    select r.account_id, date_trunc('day', r.hour, 'UTC'), r.actor_user_id, r.service_key_id, sum(r.spent),
           sum(r.spends)
    from r
    group by 1, 2, 3, 4
    on conflict (account_id, day, actor_user_id, service_key_id)
      do update set spent = u.spent + excluded.spent, spends = u.spends + excluded.spends
    returning u.spent, u.spends
  )
  select (select count(*) from h where h.spent < 0 or h.spends < 0) + (select count(*) from d where d.spent < 0 or d.spends < 0)
  into v_negative;
  if v_negative > 0 then
    raise exception 'usage rollup: a bucket went below zero (a removal of a row it never held)'
      using errcode = 'XX000', hint = 'Rebuild it: private.usage_rebuild().';
  end if;
  delete from private.usage_hours u where u.spends = 0;
  delete from private.usage_days u where u.spends = 0;
end $$;
comment on function private.usage_add(jsonb) is
  'Add signed per-hour sums [{account_id, hour, actor_user_id, service_key_id, spent, spends}] to the hour and day '
  'buckets (removing empty buckets).';
revoke all on function private.usage_add(jsonb) from public, anon, authenticated, service_role;

create function private.usage_fold(p_from timestamptz, p_to timestamptz) returns bigint
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_rows jsonb;
  v_spends bigint;
begin
  -- The spends of every org pool with created_at in [p_from, p_to), summed per hour and actor. The caller has
  -- proved that no transaction that could still add such a row is running, and reads in a fresh snapshot.
  select jsonb_agg(jsonb_build_object('account_id', f.account_id, 'hour', f.hour, 'actor_user_id', f.actor_user_id,
                                      'service_key_id', f.service_key_id, 'spent', f.spent, 'spends', f.spends)),
         sum(f.spends)
  into v_rows, v_spends
  from (
    select t.account_id, date_trunc('hour', t.created_at, 'UTC') as hour, t.actor_user_id, t.service_key_id,
           -sum(t.amount) as spent, count(*) as spends
    from public.credit_accounts a
    join public.credit_transactions t on t.account_id = a.id
    where a.org_id is not null and t.amount < 0 and t.created_at >= p_from and t.created_at < p_to
    group by 1, 2, 3, 4
  ) f;
  if v_rows is not null then
    perform private.usage_add(v_rows);
  end if;
  return coalesce(v_spends, 0);
end $$;
comment on function private.usage_fold(timestamptz, timestamptz) is
  'Sum the org pools'' spends with created_at in [p_from, p_to) into the rollup; returns how many were folded.';
revoke all on function private.usage_fold(timestamptz, timestamptz) from public, anon, authenticated, service_role;

create function private.usage_rebuild() returns void
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- Forget the rollup: W back to -infinity, every bucket gone; the next usage_rollup folds the whole ledger again.
  perform 1 from private.usage_state s for update;
  delete from private.usage_hours;
  delete from private.usage_days;
  delete from private.usage_candidates;
  update private.usage_state s set closed_through = '-infinity', updated_at = now() where s.id;
end $$;
comment on function private.usage_rebuild() is
  'Empty the usage rollup and move closed_through back to -infinity (the next usage_rollup refolds the ledger). For '
  'the database owner: after a bulk change to the ledger made with triggers off.';
revoke all on function private.usage_rebuild() from public, anon, authenticated, service_role;

-- Who is still running ------------------------------------------------------------------------------

create function private.running_transactions() returns text[]
language plpgsql volatile security definer set search_path = '' as $$
begin
  -- Every transaction of this database in progress now, but ours: its virtual transaction id (held from its first
  -- statement to its end, xid or not; released only after its commit is visible), and prepared transactions
  -- (which keep their rows pending with no backend). A backend of another database cannot write our ledger; a
  -- backend whose database we cannot tell is kept.
  perform pg_catalog.pg_stat_clear_snapshot();
  return coalesce((
    select array_agg(x.id order by x.id) from (
      select l.virtualxid as id
      from pg_catalog.pg_locks l
      left join pg_catalog.pg_stat_activity s on s.pid = l.pid
      where l.locktype = 'virtualxid' and l.mode = 'ExclusiveLock' and l.granted
        and l.pid is distinct from pg_catalog.pg_backend_pid()
        and (s.datid is null or s.datid = (select d.oid from pg_catalog.pg_database d
                                           where d.datname = pg_catalog.current_database()))
      union all
      select 'xid:' || p.transaction::text from pg_catalog.pg_prepared_xacts p
      where p.database = pg_catalog.current_database()) x), '{}');
end $$;
comment on function private.running_transactions() is
  'The virtual transaction ids of this database''s transactions in progress (ours excepted), and "xid:N" for its '
  'prepared transactions.';
revoke all on function private.running_transactions() from public, anon, authenticated, service_role;

-- The job -------------------------------------------------------------------------------------------

create function public.usage_rollup(wait_ms integer default 200, up_to timestamptz default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  c_margin constant interval := interval '5 seconds';
  v_state private.usage_state;
  v_now timestamptz;
  v_deadline timestamptz;
  v_running text[];
  v_close timestamptz;
  v_folded bigint := 0;
begin
  perform private.require_backend('usage_rollup');
  if usage_rollup.wait_ms is null or usage_rollup.wait_ms not between 0 and 10000 then
    perform private.err(400, 'invalid_wait_ms', 'wait_ms is a whole number of milliseconds from 0 to 10000.',
                        '{"field": "wait_ms"}');
  end if;
  if pg_catalog.current_setting('transaction_isolation') <> 'read committed' then
    -- What this proves is about rows committed after our transaction began: each statement must see them.
    perform private.err(400, 'read_committed_only',
      'usage_rollup must run in a READ COMMITTED transaction (each statement needs a fresh snapshot).');
  end if;
  -- One job at a time, and never beside a write that folds itself in (private.usage_ledger_changed holds the
  -- state row FOR SHARE): that run is skipped, the next one goes ahead.
  select * into v_state from private.usage_state s for update skip locked;
  if not found then
    return jsonb_build_object('skipped', true, 'closed_through',
                              (select s.closed_through from private.usage_state s), 'folded', 0);
  end if;

  -- A new candidate: now - margin, once everything running now has ended.
  v_now := clock_timestamp();
  v_deadline := v_now + make_interval(secs => usage_rollup.wait_ms / 1000.0);
  insert into private.usage_candidates (through, waiting_for)
  values (v_now - c_margin, private.running_transactions())
  on conflict (through) do nothing;
  -- The latest candidate whose transactions have all ended (if an earlier one still waits for a transaction, so
  -- does every later one: it was running then too). Short transactions end within the wait.
  loop
    v_running := private.running_transactions();
    select max(c.through) into v_close from private.usage_candidates c where not (c.waiting_for && v_running);
    exit when v_close >= v_now - c_margin or clock_timestamp() >= v_deadline;
    perform pg_catalog.pg_sleep(0.005);
  end loop;
  if v_close is not null and usage_rollup.up_to is not null then  -- (least() would turn a null into up_to)
    v_close := least(v_close, usage_rollup.up_to);
  end if;

  if v_close > v_state.closed_through then
    -- A fresh snapshot (this statement's): every row with created_at < v_close is committed, or never will be.
    v_folded := private.usage_fold(v_state.closed_through, v_close);
    update private.usage_state s set closed_through = v_close, updated_at = now() where s.id;
    v_state.closed_through := v_close;
  end if;
  delete from private.usage_candidates c where c.through <= v_state.closed_through;
  -- A long transaction holds every later candidate back; keep the newest 1000 (W still moves once it ends).
  delete from private.usage_candidates c
  where c.through < (select x.through from private.usage_candidates x order by x.through desc offset 999 limit 1);
  return jsonb_build_object('skipped', false, 'closed_through', v_state.closed_through, 'folded', v_folded,
                            'waiting', (select count(*) from private.usage_candidates));
end $$;
comment on function public.usage_rollup(integer, timestamptz) is
  'Backend only (a job, every few seconds): move usage_state.closed_through to the latest time before which every '
  'transaction has ended (waiting up to wait_ms for the ones running now; never past up_to), folding the ledger '
  'rows in between into the usage rollup. Returns {skipped, closed_through, folded, waiting}. Skipped when another '
  'run holds it.';
revoke all on function public.usage_rollup(integer, timestamptz) from public, anon, authenticated, service_role;
grant execute on function public.usage_rollup(integer, timestamptz) to service_role;  -- backend only

-- Writes that land below W fold themselves in --------------------------------------------------------

create function private.usage_ledger_changed() returns trigger
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_w timestamptz;
  v_rows jsonb := '[]'::jsonb;
begin
  -- Held FOR SHARE until this transaction ends: the job cannot move W meanwhile, and once it has moved W, this
  -- reads the new W (and so folds what the job could not see).
  select s.closed_through into v_w from private.usage_state s for share;
  if tg_op = 'TRUNCATE' then
    delete from private.usage_hours;
    delete from private.usage_days;
    return null;
  end if;
  if tg_op in ('UPDATE', 'DELETE') and old.amount < 0 and old.created_at < v_w
     and exists (select 1 from public.credit_accounts a where a.id = old.account_id and a.org_id is not null) then
    v_rows := v_rows || jsonb_build_object('account_id', old.account_id,
      'hour', date_trunc('hour', old.created_at, 'UTC'), 'actor_user_id', old.actor_user_id,
      'service_key_id', old.service_key_id, 'spent', old.amount, 'spends', -1);
  end if;
  if tg_op in ('UPDATE', 'INSERT') and new.amount < 0 and new.created_at < v_w
     and exists (select 1 from public.credit_accounts a where a.id = new.account_id and a.org_id is not null) then
    v_rows := v_rows || jsonb_build_object('account_id', new.account_id,
      'hour', date_trunc('hour', new.created_at, 'UTC'), 'actor_user_id', new.actor_user_id,
      'service_key_id', new.service_key_id, 'spent', -new.amount, 'spends', 1);
  end if;
  if jsonb_array_length(v_rows) > 0 then
    perform private.usage_add(v_rows);
  end if;
  return null;
end $$;
comment on function private.usage_ledger_changed() is
  'Trigger: a ledger row inserted with a created_at before its transaction began, updated, deleted (or the '
  'ledger truncated) changes the usage rollup in the same transaction when it lies before closed_through.';
revoke all on function private.usage_ledger_changed() from public, anon, authenticated, service_role;

-- A spend's row has created_at = now() exactly: its WHEN is false and nothing is called.
create trigger credit_transactions_usage_backdated after insert on public.credit_transactions
  for each row when (new.created_at < now()) execute function private.usage_ledger_changed();
create trigger credit_transactions_usage_changed
  after update of account_id, amount, created_at, actor_user_id, service_key_id or delete
  on public.credit_transactions for each row execute function private.usage_ledger_changed();
create trigger credit_transactions_usage_truncated after truncate on public.credit_transactions
  for each statement execute function private.usage_ledger_changed();

-- The partial covering index is no longer read (the live part is short and uses the ledger's own
-- (account_id, created_at desc, id desc) index); it was one more index entry on every spend.
drop index public.credit_transactions_spends_idx;
