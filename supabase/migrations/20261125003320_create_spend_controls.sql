-- Spend controls, part 2: where they are enforced and how they are managed.
--
-- debit_credits keeps its fast path (private.spend_fast) for a caller with no limit in a pool with nothing held
-- and nothing past its expiry; everything else takes the full path, which first runs private.spend_check under
-- the account's lock (sweep expired holds and lots, check available = balance - held, count against the
-- caller's limit). A limit refusal is an answer, not an exception: it commits its spend_limit_reached event
-- (PostgREST: response.status 402). Holds (hold_credits, capture_hold, release_hold), limits (set_spend_limit,
-- delete_spend_limit, list_spend_limits, my_spend_limits), billing_status with available, the scheduled job
-- (run_credit_jobs), and the Stripe grants that give lots their expiry.

create or replace function private.spend_fast(p_uid uuid, p_org text, p_amount bigint, p_reason text, p_key text,
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
  v_has_limits boolean;
  v_held bigint;
  v_due timestamptz;
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
  select o.slug, a.slices, a.access_version, pr.credits, coalesce(m.role, case when k.id is not null then 'service' end),
         a.has_limits, a.held, least(a.lots_expire_at, a.holds_expire_at)
  into v_slug, v_slices, v_version, v_price, v_role, v_has_limits, v_held, v_due
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
  -- Spend controls (spend_limits, credit_holds, credit_lots): a limited caller, a hold or lot past its expiry, or
  -- a sliced pool with credits held take the full path. Setting a limit or creating a hold bumps access_version.
  if v_due <= now() or (v_slices > 1 and v_held > 0) or (v_has_limits and exists (
       select 1 from public.spend_limits l where l.org_id = v_org and l.subject = private.limit_subject(p_uid, v_key_id)))
  then
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
    -- (available = balance - held; nothing may be past its expiry: the full path sweeps it first)
    update public.credit_accounts a set balance = a.balance - p_amount
    where a.id = v_org and a.slices = 1 and a.access_version = v_version and a.balance - a.held >= p_amount
      and not coalesce(least(a.lots_expire_at, a.holds_expire_at) <= now(), false)
    returning a.balance into v_balance;
  else
    -- A hold or a limit created meanwhile bumped access_version: give the slice back and take the full path.
    begin
      v_balance := private.take_slice(v_org, p_amount, hashtext(coalesce(p_uid, v_key_id)::text) & 65535);
      if v_balance is not null
         and (select a.access_version from public.credit_accounts a where a.id = v_org) <> v_version then
        raise exception using errcode = 'UPVER';
      end if;
    exception when sqlstate 'UPVER' then
      v_balance := null;
    end;
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

create or replace function public.debit_credits(amount bigint, reason text, org text default null,
                                     idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := auth.uid();
  v_meta jsonb := coalesce(debit_credits.metadata, '{}'::jsonb);
  v_price integer;
  v_roles text[] := array['admin', 'member', 'service'];
  v_result jsonb;
  v_refusal jsonb;
  v_account uuid;
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
  v_account := coalesce(c.org_id, v_uid);
  -- A replay answers first (it counts against nothing again); else the spend controls, under the account's lock.
  if debit_credits.idempotency_key is not null then
    perform private.lock_idempotency_key(v_account, false, debit_credits.idempotency_key);
  end if;
  if debit_credits.idempotency_key is null or not exists (
       select 1 from public.credit_transactions t
       where t.account_id = v_account and t.idempotency_key = debit_credits.idempotency_key) then
    v_refusal := private.spend_check(v_account,
      case when c.org_id is not null then private.limit_subject(v_uid, (select s.key_id from private.service_key() s)) end,
      debit_credits.amount, false);
    if v_refusal is not null then
      return private.refuse(v_refusal);
    end if;
  end if;
  return private.apply_credit_change(v_account, -debit_credits.amount, debit_credits.reason,
    debit_credits.idempotency_key, false, v_meta,
    p_spend_roles => case when c.org_id is not null then v_roles end);
end $$;
comment on function public.debit_credits(bigint, text, text, text, jsonb) is
  'Spend credits for an action (reason) at no less than its price (credit_prices): from the org context (org, '
  'else the API key''s org, else the default org; admin/member/service key) or the caller''s personal balance. '
  'PT402 when short (available = balance - active holds), PT403 when not allowed, PT409 on an idempotency key '
  'reused with other arguments. Over the caller''s spend limit: {error: spend_limit_reached, limit, used, period, '
  'resets_at} with response.status 402, committed (the spend_limit_reached event is recorded once per period). '
  'Returns {transaction_id, source, org_id, org_slug, balance, replayed, ...}.';
revoke all on function public.debit_credits(bigint, text, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function public.debit_credits(bigint, text, text, text, jsonb) to authenticated;


-- Holds: reserve, then capture or release ------------------------------------------------------------

create function public.hold_credits(amount bigint, reason text, ttl_seconds integer default 900, org text default null,
                                    idempotency_key text default null, metadata jsonb default '{}')
returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := auth.uid();
  v_key_id uuid := (select s.key_id from private.service_key() s);
  v_meta jsonb := coalesce(hold_credits.metadata, '{}'::jsonb);
  v_roles text[] := array['admin', 'member', 'service'];
  v_account uuid;
  v_subject text;
  v_refusal jsonb;
  h public.credit_holds;
  c private.org_context;
begin
  perform private.check_credit_args(hold_credits.amount, hold_credits.reason, hold_credits.idempotency_key, v_meta,
                                    1000000);
  if hold_credits.ttl_seconds is null or hold_credits.ttl_seconds not between 1 and 86400 then
    perform private.err(400, 'invalid_ttl_seconds', 'ttl_seconds is a whole number from 1 to 86400 (one day).',
                        '{"field": "ttl_seconds"}');
  end if;
  if v_uid is null and v_key_id is null then
    perform private.err(403, 'no_actor', 'Holding credits needs a signed-in user or an active org service key.');
  end if;
  if not exists (select 1 from public.credit_prices p where p.action = hold_credits.reason) then
    perform private.err(400, 'unknown_action',
      format('Unknown action %L; known actions: %s.', hold_credits.reason,
             (select string_agg(p.action, ', ' order by p.action) from public.credit_prices p)),
      jsonb_build_object('field', 'reason'));
  end if;
  c := private.context(hold_credits.org, v_roles, 'cannot_spend', 'hold its credits');
  if c.org_id is null and v_uid is null then
    perform private.err(403, 'org_required', 'A service key holds its org''s credits only.');
  end if;
  v_account := coalesce(c.org_id, v_uid);
  if c.org_id is not null then
    v_subject := private.limit_subject(v_uid, v_key_id);
  end if;
  if hold_credits.idempotency_key is not null then
    perform private.lock_idempotency_key(v_account, false, 'hold:' || hold_credits.idempotency_key);
    select * into h from public.credit_holds x
    where x.account_id = v_account and x.idempotency_key = hold_credits.idempotency_key;
    if h.id is not null then
      if h.amount <> hold_credits.amount or h.reason <> hold_credits.reason or h.metadata <> v_meta
         or h.actor_user_id is distinct from v_uid or h.service_key_id is distinct from v_key_id then
        perform private.err(409, 'idempotency_conflict',
          format('Idempotency key %s was already used with different arguments.', hold_credits.idempotency_key),
          jsonb_build_object('idempotency_key', hold_credits.idempotency_key));
      end if;
      return private.hold_json(h, true);
    end if;
  end if;
  -- The whole pool, locked: its available total must be exact. Then the re-read of the caller's right.
  v_refusal := private.spend_check(v_account, v_subject, hold_credits.amount, true);
  if v_refusal is not null then
    return private.refuse(v_refusal);
  end if;
  if c.org_id is not null and not coalesce(private.actor_role(c.org_id) = any (v_roles), false) then
    perform private.err(403, 'cannot_spend',
      'Your right to spend this org''s credits was withdrawn while the request was in flight.',
      jsonb_build_object('org_id', c.org_id));
  end if;
  insert into public.credit_holds (account_id, actor_user_id, service_key_id, amount, reason, expires_at,
                                   idempotency_key, limit_subject, limit_period_start, metadata)
  values (v_account, v_uid, v_key_id, hold_credits.amount, hold_credits.reason,
          now() + make_interval(secs => hold_credits.ttl_seconds), hold_credits.idempotency_key,
          case when exists (select 1 from public.spend_limits l where l.org_id = v_account and l.subject = v_subject)
               then v_subject end,
          (select l.period_start from public.spend_limits l where l.org_id = v_account and l.subject = v_subject),
          v_meta)
  returning * into h;
  -- A spend that read the pool before this hold takes the full path (access_version), which sees it.
  update public.credit_accounts a set held = a.held + h.amount, holds_expire_at = least(a.holds_expire_at, h.expires_at),
    access_version = a.access_version + 1
  where a.id = v_account;
  perform private.hold_ledger_row(h, 'hold', 'hold:' || h.id::text);
  perform private.audit_append(v_account, c.org_id, 'hold_created', 'credit_hold', h.id::text,
    jsonb_build_object('hold_id', h.id, 'amount', h.amount, 'reason', h.reason, 'expires_at', h.expires_at,
                       'idempotency_key', h.idempotency_key));
  return private.hold_json(h, false);
end $$;
comment on function public.hold_credits(bigint, text, integer, text, text, jsonb) is
  'Reserve credits for an action (reason: a priced action) for ttl_seconds (1-86400): from the org context (admin, '
  'member, service key) or the caller''s personal balance. Counts against available credits and the caller''s '
  'spend limit; PT402 (or a committed spend_limit_reached refusal) like debit_credits. Idempotent by key.';
revoke all on function public.hold_credits(bigint, text, integer, text, text, jsonb)
  from public, anon, authenticated, service_role;
grant execute on function public.hold_credits(bigint, text, integer, text, text, jsonb) to authenticated;

create function private.settle_hold(p_hold uuid, p_capture bigint, p_release boolean) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  v_uid uuid := (select auth.uid());
  v_key_id uuid := (select s.key_id from private.service_key() s);
  h public.credit_holds;
  v_org uuid;
  v_charge bigint;
  v_tx jsonb;
begin
  select * into h from public.credit_holds x where x.id = p_hold;
  -- The hold's own actor, an admin of its org, or the operator; anyone else learns nothing about it.
  if h.id is null or not (private.is_backend()
      or h.actor_user_id is not distinct from v_uid and h.service_key_id is not distinct from v_key_id
         and (v_uid is not null or v_key_id is not null)
      or coalesce(v_uid is not null and private.actor_role(h.account_id) = 'admin', false)) then
    perform private.err(404, 'hold_not_found', 'No such hold.', jsonb_build_object('hold_id', p_hold));
  end if;
  v_org := (select a.org_id from public.credit_accounts a where a.id = h.account_id);
  perform private.lock_account(h.account_id);
  perform private.sweep_account(h.account_id);  -- a hold past its expiry has released itself
  select * into h from public.credit_holds x where x.id = p_hold for update;
  if p_release then
    if h.status in ('released', 'expired') then
      return private.hold_json(h, true);
    elsif h.status <> 'active' then
      perform private.err(409, 'hold_not_active', format('The hold is %s; it can no longer be released.', h.status),
                          jsonb_build_object('hold_id', h.id, 'status', h.status));
    end if;
    update public.credit_holds x set status = 'released', settled_at = now() where x.id = h.id returning * into h;
    perform private.give_back_limit(h.account_id, h.limit_subject, h.amount, h.limit_period_start);
    perform private.refresh_holds(h.account_id);
    perform private.hold_ledger_row(h, 'hold_released', 'hold:' || h.id::text || ':released');
    perform private.audit_append(h.account_id, v_org, 'hold_released', 'credit_hold', h.id::text,
      jsonb_build_object('hold_id', h.id, 'amount', h.amount, 'reason', h.reason));
    return private.hold_json(h, false);
  end if;
  v_charge := coalesce(p_capture, h.amount);
  -- Charging needs the right to spend now (a member removed since the hold was made may only release it).
  if h.status = 'active' and v_org is not null and not private.is_backend()
     and not coalesce(private.actor_role(v_org) = any (array['admin', 'member', 'service']), false) then
    perform private.err(403, 'cannot_spend', 'Your right to spend this org''s credits was withdrawn; release the hold.',
                        jsonb_build_object('org_id', v_org, 'hold_id', h.id));
  end if;
  if h.status = 'captured' and h.captured = v_charge then
    return private.hold_json(h, true);
  elsif h.status <> 'active' then
    perform private.err(409, case when h.status = 'expired' then 'hold_expired' else 'hold_not_active' end,
      format('The hold is %s; it can no longer be captured%s.', h.status,
             case when h.status = 'captured' then format(' (it was captured for %s)', h.captured) else '' end),
      jsonb_build_object('hold_id', h.id, 'status', h.status, 'captured', h.captured));
  end if;
  if v_charge is null or v_charge < 1 or v_charge > h.amount then
    perform private.err(400, 'invalid_amount',
      format('amount is a whole number from 1 to the held %s (release the hold to charge nothing).', h.amount),
      jsonb_build_object('field', 'amount', 'held', h.amount));
  end if;
  update public.credit_holds x set status = 'captured', captured = v_charge, settled_at = now() where x.id = h.id;
  perform private.give_back_limit(h.account_id, h.limit_subject, h.amount - v_charge, h.limit_period_start);
  perform private.refresh_holds(h.account_id);
  v_tx := private.apply_credit_change(h.account_id, -v_charge, h.reason, 'hold:' || h.id::text || ':capture', true,
    jsonb_build_object('hold_id', h.id, 'held', h.amount, 'captured', v_charge,
                       'hold_user_id', h.actor_user_id, 'hold_service_key_id', h.service_key_id));
  update public.credit_transactions t set line_to = private.drawn(h.account_id)
  where t.id = (v_tx ->> 'transaction_id')::uuid;
  update public.credit_holds x set capture_transaction_id = (v_tx ->> 'transaction_id')::uuid where x.id = h.id
  returning * into h;
  perform private.audit_append(h.account_id, v_org, 'hold_captured', 'credit_hold', h.id::text,
    jsonb_build_object('hold_id', h.id, 'amount', h.amount, 'captured', v_charge, 'released', h.amount - v_charge,
                       'reason', h.reason, 'transaction_id', v_tx ->> 'transaction_id'));
  return private.hold_json(h, false);
end $$;
comment on function private.settle_hold(uuid, bigint, boolean) is
  'Capture (charge at most the held amount, release the rest) or release a hold; a repeat answers the same.';
revoke all on function private.settle_hold(uuid, bigint, boolean) from public, anon, authenticated, service_role;

create function public.capture_hold(hold_id uuid, amount bigint default null) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  return private.settle_hold(capture_hold.hold_id, capture_hold.amount, false);
end $$;
comment on function public.capture_hold(uuid, bigint) is
  'Charge a hold (amount: at most what it holds; null: all of it) and release the rest. By its actor or an org '
  'admin; a repeat with the same amount answers the same (replayed); PT409 when released, expired or captured '
  'for another amount.';
revoke all on function public.capture_hold(uuid, bigint) from public, anon, authenticated, service_role;
grant execute on function public.capture_hold(uuid, bigint) to authenticated, service_role;

create function public.release_hold(hold_id uuid) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
begin
  return private.settle_hold(release_hold.hold_id, null, true);
end $$;
comment on function public.release_hold(uuid) is
  'Release all of a hold (by its actor or an org admin); releasing a released or expired hold answers it again.';
revoke all on function public.release_hold(uuid) from public, anon, authenticated, service_role;
grant execute on function public.release_hold(uuid) to authenticated, service_role;

create function public.list_credit_holds(org text default null, status text default 'active') returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(list_credit_holds.org, array['admin', 'member', 'viewer', 'service', 'operator'],
                                           'forbidden', 'read its holds');
  v_uid uuid := (select auth.uid());
  v_key uuid := (select s.key_id from private.service_key() s);
  v_account uuid := coalesce(c.org_id, v_uid);
begin
  if list_credit_holds.status is not null then
    perform private.check_in(list_credit_holds.status, array['active', 'captured', 'released', 'expired'], 'status');
  end if;
  return jsonb_build_object('data', coalesce((
    select jsonb_agg(private.hold_json(h, false) order by h.created_at desc)
    from (select * from public.credit_holds h where h.account_id = v_account
            and (list_credit_holds.status is null or h.status = list_credit_holds.status)
            -- admins, viewers and the operator see every hold of the org; others their own
            and (c.role in ('admin', 'viewer', 'operator') or c.org_id is null
                 or (h.actor_user_id is not distinct from v_uid and h.service_key_id is not distinct from v_key))
          order by h.created_at desc limit 1000) h), '[]'::jsonb), 'next_cursor', null);
end $$;
comment on function public.list_credit_holds(text, text) is
  'Holds of the org context (admins and viewers: all; members and keys: their own) or the caller''s own, newest '
  'first (at most 1000), by status (null: all).';
revoke all on function public.list_credit_holds(text, text) from public, anon, authenticated, service_role;
grant execute on function public.list_credit_holds(text, text) to authenticated, service_role;

-- Limits: set, remove, list ------------------------------------------------------------------------

create function private.check_subject(p_org uuid, p_subject text) returns text
language plpgsql stable security definer set search_path = '' as $$
declare
  v text := lower(btrim(coalesce(p_subject, '')));
begin
  if v !~ '^((member|key):[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|default:(member|key))$' then
    perform private.err(400, 'invalid_subject',
      'subject is member:<user_id>, key:<service key id>, default:member or default:key.', '{"field": "subject"}');
  end if;
  if v like 'member:%' and not exists (select 1 from public.org_members m where m.org_id = p_org
                                       and m.user_id = substr(v, 8)::uuid) then
    perform private.err(404, 'member_not_found', 'No such member in this org.', jsonb_build_object('subject', v));
  end if;
  if v like 'key:%' and not exists (select 1 from public.api_keys k where k.org_id = p_org and k.kind = 'service'
                                    and k.id = substr(v, 5)::uuid) then
    perform private.err(404, 'key_not_found', 'No such service key in this org.', jsonb_build_object('subject', v));
  end if;
  return v;
end $$;
comment on function private.check_subject(uuid, text) is
  'A limit subject normalised and checked: member:<id> of the org, key:<id> of its service keys, or default:*.';
revoke all on function private.check_subject(uuid, text) from public, anon, authenticated, service_role;

create function public.set_spend_limit(org text, subject text, credits bigint, period text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
#variable_conflict use_column
declare
  c private.org_context := private.context(set_spend_limit.org, array['admin', 'operator'], 'forbidden',
                                           'change spend limits', true);
  v_subject text := private.check_subject(c.org_id, set_spend_limit.subject);
  v_period text := private.check_in(set_spend_limit.period, private.limit_periods(), 'period');
  v_start timestamptz := private.period_start(v_period, now());
  v_old public.spend_limits;
  v public.spend_limits;
begin
  if set_spend_limit.credits is null or set_spend_limit.credits not between 0 and 1000000000 then
    perform private.err(400, 'invalid_credits', 'credits is a whole number from 0 to 1000000000.',
                        '{"field": "credits"}');
  end if;
  -- The whole pool, so that every spend in flight has committed (and is counted in used) or waits for this.
  perform private.lock_account(c.org_id);
  if c.role = 'admin' then
    perform private.lock_membership(c.org_id, 'admin');  -- still an admin, now that the pool is held
  end if;
  select * into v_old from public.spend_limits l where l.org_id = c.org_id and l.subject = v_subject for update;
  insert into public.spend_limits as l (org_id, subject, credits, period, used, period_start)
  values (c.org_id, v_subject, set_spend_limit.credits, v_period,
          case when v_subject like 'default:%' then 0 else private.subject_usage(c.org_id, v_subject, v_start) end,
          v_start)
  on conflict (org_id, subject) do update set credits = excluded.credits, period = excluded.period,
    used = case when l.period = excluded.period and l.period_start = excluded.period_start then l.used
                else excluded.used end,
    period_start = excluded.period_start,
    reached_period = case when l.period = excluded.period and excluded.credits <= l.credits then l.reached_period end,
    updated_at = now()
  returning * into v;
  update public.credit_accounts a set has_limits = true, access_version = a.access_version + 1 where a.id = c.org_id;
  perform private.audit_append(c.org_id, c.org_id, 'spend_limit_set', 'spend_limit', v_subject,
    jsonb_strip_nulls(jsonb_build_object('subject', v_subject, 'credits', v.credits, 'period', v.period,
      'previous', case when v_old.org_id is not null then jsonb_build_object('credits', v_old.credits,
                                                                             'period', v_old.period) end,
      'via', case when c.role = 'operator' then 'operator' end)));
  return private.limit_json(v) || jsonb_build_object('org_id', c.org_id);
end $$;
comment on function public.set_spend_limit(text, text, bigint, text) is
  'Admin (or the operator): set a spend limit, credits per period (day, month, total; UTC), for member:<user_id>, '
  'key:<service key id>, or the org''s default for new members (default:member) or new service keys '
  '(default:key). A new limit''s usage counts what the subject already spent this period. Audited.';
revoke all on function public.set_spend_limit(text, text, bigint, text) from public, anon, authenticated, service_role;
grant execute on function public.set_spend_limit(text, text, bigint, text) to authenticated, service_role;

create function public.delete_spend_limit(org text, subject text) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  c private.org_context := private.context(delete_spend_limit.org, array['admin', 'operator'], 'forbidden',
                                           'change spend limits', true);
  v_subject text := lower(btrim(coalesce(delete_spend_limit.subject, '')));
  v public.spend_limits;
begin
  perform private.lock_account(c.org_id);
  if c.role = 'admin' then
    perform private.lock_membership(c.org_id, 'admin');
  end if;
  delete from public.spend_limits l where l.org_id = c.org_id and l.subject = v_subject returning * into v;
  if v.org_id is null then
    perform private.err(404, 'limit_not_found', format('No spend limit for %s.', v_subject),
                        jsonb_build_object('subject', v_subject));
  end if;
  update public.credit_accounts a set has_limits = exists (
    select 1 from public.spend_limits l where l.org_id = c.org_id and l.subject not like 'default:%')
  where a.id = c.org_id;
  perform private.audit_append(c.org_id, c.org_id, 'spend_limit_removed', 'spend_limit', v_subject,
    jsonb_strip_nulls(jsonb_build_object('subject', v_subject, 'credits', v.credits, 'period', v.period,
                                         'via', case when c.role = 'operator' then 'operator' end)));
  return jsonb_build_object('org_id', c.org_id, 'subject', v_subject, 'deleted', true);
end $$;
comment on function public.delete_spend_limit(text, text) is 'Admin (or the operator): remove a spend limit. Audited.';
revoke all on function public.delete_spend_limit(text, text) from public, anon, authenticated, service_role;
grant execute on function public.delete_spend_limit(text, text) to authenticated, service_role;

create function public.list_spend_limits(org text) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(list_spend_limits.org, null, 'forbidden', 'read spend limits', true);
  v_mine text := private.limit_subject((select auth.uid()), (select s.key_id from private.service_key() s));
begin
  -- Admins, viewers and the operator see every limit; a member or a service key its own.
  return jsonb_build_object('data', coalesce((
    select jsonb_agg(private.limit_json(l) order by l.subject like 'default:%' desc, l.subject)
    from public.spend_limits l where l.org_id = c.org_id
      and (c.role in ('admin', 'viewer', 'operator') or l.subject = v_mine)), '[]'::jsonb), 'next_cursor', null);
end $$;
comment on function public.list_spend_limits(text) is
  'An org''s spend limits with used and resets_at in the current period (admins and viewers: all; members and '
  'service keys: their own).';
revoke all on function public.list_spend_limits(text) from public, anon, authenticated, service_role;
grant execute on function public.list_spend_limits(text) to authenticated, service_role;

create function public.my_spend_limits() returns jsonb
language sql stable security definer set search_path = '' as $$
  select coalesce(jsonb_agg(private.limit_json(l) || jsonb_build_object('org_id', l.org_id) order by l.org_id), '[]'::jsonb)
  from public.spend_limits l
  where l.subject = private.limit_subject((select auth.uid()), (select s.key_id from private.service_key() s))
    and (l.org_id in (select m.org_id from public.org_members m where m.user_id = (select auth.uid()))
         or l.org_id in (select s.org_id from private.service_key() s))
$$;
comment on function public.my_spend_limits() is 'The caller''s own spend limits, one per org (GET /api/me).';
revoke all on function public.my_spend_limits() from public, anon, authenticated, service_role;
grant execute on function public.my_spend_limits() to authenticated;

-- Balance as the CLI reads it, with what holds reserve -----------------------------------------------

create or replace function public.billing_status(org text default null) returns jsonb
language plpgsql stable security definer set search_path = '' as $$
declare
  c private.org_context := private.context(billing_status.org);
  v_profile public.profiles;
  v_org public.orgs;
  v_account uuid;
  v_balance bigint;
begin
  select * into v_profile from public.profiles p where p.id = (select auth.uid());
  select * into v_org from public.orgs o where o.id = c.org_id;
  v_account := coalesce(c.org_id, v_profile.id);
  v_balance := coalesce(private.account_balance(v_account), 0);
  return jsonb_build_object(
    'tier', case when v_org.plan = 'team' then 'team' when v_profile.plan = 'pro' then 'pro' else 'free' end,
    'balance', v_balance,
    -- active holds only: one past its expiry is ignored even before the job sweeps it
    'held', coalesce((select sum(h.amount) from public.credit_holds h where h.account_id = v_account
                      and h.status = 'active' and h.expires_at > now()), 0),
    'available', v_balance - coalesce((select sum(h.amount) from public.credit_holds h where h.account_id = v_account
                                       and h.status = 'active' and h.expires_at > now()), 0),
    'source', case when c.org_id is null then 'user' else 'org' end,
    'org', case when c.org_id is not null then jsonb_build_object(
      'id', v_org.id, 'slug', v_org.slug, 'name', v_org.name, 'role', c.role, 'plan', v_org.plan) end,
    'personal_balance', private.account_balance(v_profile.id),
    'plan', v_profile.plan);
end $$;
comment on function public.billing_status(text) is
  'What the next consume would draw from: tier, balance, held and available (balance - active holds), source, org '
  'and the personal balance.';

-- The scheduled job ----------------------------------------------------------------------------------

create function public.run_credit_jobs(max_accounts integer default 1000) returns jsonb
language plpgsql volatile security definer set search_path = '' as $$
declare
  r record;
  l record;
  v jsonb;
  v_accounts integer := 0;
  v_holds integer := 0;
  v_lots integer := 0;
  v_credits bigint := 0;
  v_notices integer := 0;
begin
  perform private.require_backend('run_credit_jobs');
  if run_credit_jobs.max_accounts is null or run_credit_jobs.max_accounts not between 1 and 100000 then
    perform private.err(400, 'invalid_max_accounts', 'max_accounts is 1-100000.', '{"field": "max_accounts"}');
  end if;
  -- Accounts with a hold or a lot past its expiry: each swept under its lock (the same sweep every spend runs).
  for r in select a.id from public.credit_accounts a
           where a.lots_expire_at <= now() or a.holds_expire_at <= now()
           order by least(a.lots_expire_at, a.holds_expire_at) limit run_credit_jobs.max_accounts loop
    perform private.lock_account(r.id);
    v := private.sweep_account(r.id);
    v_accounts := v_accounts + 1;
    v_holds := v_holds + (v ->> 'holds_expired')::integer;
    v_lots := v_lots + (v ->> 'lots_expired')::integer;
    v_credits := v_credits + (v ->> 'credits_expired')::bigint;
  end loop;
  -- Lots that will expire within 7 days with credits left: credits_expiring, once per lot.
  for l in select x.id, x.account_id, x.expires_at, x.source, x.amount, a.org_id,
                  private.lot_remaining(x.id, private.drawn(x.account_id)) as remaining
           from public.credit_lots x join public.credit_accounts a on a.id = x.account_id
           where x.expired_at is null and x.expiring_noticed_at is null and x.expires_at > now()
             and x.expires_at <= now() + interval '7 days'
           order by x.expires_at limit 10000 loop
    if l.remaining > 0 then
      perform private.audit_append(l.account_id, l.org_id, 'credits_expiring', 'credit_lot', l.id::text,
        jsonb_build_object('lot_id', l.id, 'credits', l.remaining, 'amount', l.amount, 'source', l.source,
                           'expires_at', l.expires_at));
      v_notices := v_notices + 1;
    end if;
    update public.credit_lots x set expiring_noticed_at = now() where x.id = l.id;
  end loop;
  return jsonb_build_object('accounts_swept', v_accounts, 'holds_expired', v_holds, 'lots_expired', v_lots,
                            'credits_expired', v_credits, 'expiring_notices', v_notices);
end $$;
comment on function public.run_credit_jobs(integer) is
  'Backend only (the scheduled job): expire holds and lots past their expiry (at most max_accounts accounts), and '
  'record credits_expiring once for each lot that expires within 7 days with credits left.';
revoke all on function public.run_credit_jobs(integer) from public, anon, authenticated, service_role;
grant execute on function public.run_credit_jobs(integer) to service_role;  -- backend only

-- Stripe grants: plan credits expire at the end of their period; packs after the operator's lifetime, if any.

create or replace function private.stripe_invoice_paid(o jsonb, p_config jsonb) returns text
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
    jsonb_strip_nulls(jsonb_build_object('invoice', o ->> 'id', 'subscription', v_sub_id, 'tier', v_tier,
                       'billing_reason', o ->> 'billing_reason',
                       -- plan credits expire at the end of the period they were granted for (credit_lots)
                       'expires_at', to_timestamp(coalesce(o #>> '{lines,data,0,period,end}', o ->> 'period_end',
                                                           extract(epoch from v_sub.current_period_end)::text)::double precision))));
  perform private.audit_append(v_account, (select a.org_id from public.credit_accounts a where a.id = v_account),
    'credits_purchased', 'stripe_invoice', o ->> 'id', jsonb_build_object('credits', v_credits, 'tier', v_tier,
      'subscription', v_sub_id, 'billing_reason', o ->> 'billing_reason', 'amount_paid', o -> 'amount_paid'));
  return 'plan_credits_granted';
end $$;
comment on function private.stripe_invoice_paid(jsonb, jsonb) is
  'A paid subscription invoice (creation or renewal): grant the plan''s credits once per invoice.';
revoke all on function private.stripe_invoice_paid(jsonb, jsonb) from public, anon, authenticated, service_role;

create or replace function private.stripe_payment_paid(o jsonb, p_config jsonb) returns text
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
    jsonb_strip_nulls(jsonb_build_object('checkout_session', o ->> 'id', 'payment', v_key, 'pack', v_meta ->> 'pack',
      -- packs never expire unless the operator configured a lifetime (UPSHIFT_PACK_LIFETIME_DAYS)
      'expires_at', now() + make_interval(days => nullif(p_config ->> 'pack_lifetime_days', '')::integer))));
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

